"""Chat templates for the server: HF's `apply_chat_template` rendering, with limits.

    renderer = ChatTemplateRenderer(tokenizer, max_chars=max_model_len * longest_token_chars)
    text = await renderer.render(messages, add_generation_prompt=True, ...)   # off the event loop

The output equals `tokenizer.apply_chat_template(..., tokenize=False)` for the same inputs (the
same sandbox, globals and filters, None-valued message keys dropped, the special tokens as
variables, `continue_final_message` cut after the final message) but the rendering is bounded:
  - it runs on two worker threads, never on the event loop, so a slow template cannot stall
    `/health` or the engine, nor every other chat request; further renders queue;
  - the output is produced piece by piece and stops with `TemplateLimitError` once it passes
    `max_chars` (the server passes the most text that could fit in max_model_len tokens), so a
    huge render is refused before anything is tokenized;
  - in the sandbox, `*`, `**` and `+` refuse results past `max_chars` (`{{ 'x' * 10**9 }}`),
    `range` is capped at 100,000 items (Jinja's) and checks the clock while it runs, and the whole
    render stops after `TIMEOUT_S`;
  - Jinja's `lipsum` is removed (it makes arbitrary amounts of text).
NOTE: trust. The server renders its tokenizer's template unless it was started with
`--trust-request-chat-template` (vLLM's flag), which lets a request bring its own. The limits above
stop the blow-ups a short template can cause (huge strings, long loops through `range`) but not
every one: a trusted request template can still make large intermediate values with other string
methods or filters, or spin through nested loops over its own data until the timeout. Like vLLM,
only turn the flag on for clients you trust.
"""

from __future__ import annotations

import asyncio
import collections.abc
import functools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

TIMEOUT_S = 5.0
# apply_chat_template's own parameters: a request's chat_template_kwargs may set these even when the
# template does not name them (vLLM's rule); other keys the template does not use are dropped.
_APPLY_PARAMS = frozenset({"tools", "documents", "add_generation_prompt", "continue_final_message"})
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "     # HF's marker for continue_final_message


class TemplateLimitError(Exception):
    """The render passed its size or time bound."""


_state = threading.local()             # the running render's size bound and deadline


def _check_size(size: int) -> None:
    if size > _state.max_chars:
        raise TemplateLimitError(f"the chat template built a value of {size} characters, more "
                                 f"than the {_state.max_chars} that can fit in the context")


def _check_clock() -> None:
    if time.monotonic() > _state.deadline:
        raise TemplateLimitError(f"the chat template ran for more than {TIMEOUT_S:g} s")


class _Range(collections.abc.Sequence):
    """Jinja's sandboxed range (at most MAX_RANGE items) that checks the clock as it is walked."""

    def __init__(self, *args: int):
        self._range = range(*args)
        if len(self._range) > MAX_RANGE:
            raise OverflowError(f"range too big: the sandbox allows at most {MAX_RANGE} items")

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index):
        item = self._range[index]
        return _Range(item.start, item.stop, item.step) if isinstance(item, range) else item

    def __iter__(self):
        for i, item in enumerate(self._range):
            if i % 1024 == 1023:
                _check_clock()
            yield item


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant turns with it): renders its
    body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore-prefixed attributes (as HF's)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold underscore-prefixed attributes ({name!r})")


class _TemplateDict:
    """`dict()` and `dict.fromkeys()` and nothing else of the type (as HF's)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """HF's chat-template environment with size-checked `*`, `**`, `+` and a clock-checked range.
    NOTE: intercepting these operators also keeps Jinja from folding them at compile time."""
    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.globals.pop("lipsum", None)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_TemplateDict(), namespace=_Namespace, range=_Range)

    def call_binop(self, context, operator, left, right):
        sized = (str, list, tuple)
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, sized) and isinstance(times, int):
                    _check_size(len(seq) * max(times, 0))
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            _check_size(len(left) + len(right))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                abs(left) > 1 and right > 0:
            _check_size(abs(left).bit_length() * right // 3)       # ~ its decimal digits
        return super().call_binop(context, operator, left, right)


class ChatTemplateRenderer:
    """Renders chat templates for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, *, max_chars: int):
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self.env = BoundedSandbox()
        self.special_tokens = dict(getattr(tokenizer, "special_tokens_map", None) or {})
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="jpaged-chat-template")

    def default_template(self, with_tools: bool) -> str | None:
        """The tokenizer's template (of a dict of named ones: "tool_use" with tools, else
        "default", as transformers picks)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            name = "tool_use" if with_tools and "tool_use" in template else "default"
            template = template.get(name)
        return template or None

    @functools.lru_cache(maxsize=16)
    def compile(self, source: str) -> tuple[jinja2.Template, frozenset[str]]:
        """(the compiled template, the variables it reads); TemplateError if it does not parse."""
        return self.env.from_string(source), frozenset(
            jinja2.meta.find_undeclared_variables(self.env.parse(source)))

    def template_kwargs(self, source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The request's extra template variables that the template reads (vLLM's filter)."""
        _, variables = self.compile(source)
        return {k: v for k, v in kwargs.items() if k in variables or k in _APPLY_PARAMS}

    async def render(self, source: str, messages: list[dict], **kwargs) -> str:
        """`render_sync` on a worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(self.render_sync, source, messages,
                                                            **kwargs))

    def render_sync(self, source: str, messages: list[dict], *, add_generation_prompt: bool,
                    continue_final_message: bool = False, tools: list | None = None,
                    documents: list | None = None, **kwargs) -> str:
        """The template's text for `messages` (plain JSON data). ValueError for inputs the
        template cannot take (as HF's), TemplateError from the template, TemplateLimitError."""
        template, _ = self.compile(source)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        final = None
        if continue_final_message:
            final = messages[-1].get("content") if messages else None
            if not isinstance(final, str):
                raise ValueError("continue_final_message needs a final message with text content")
            messages[-1] = {**messages[-1], "content": final + _CONTINUE_TAG}
        _state.max_chars = self.max_chars
        _state.deadline = time.monotonic() + TIMEOUT_S
        pieces, size = [], 0
        for piece in template.generate(messages=messages, tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt,
                                       **{**self.special_tokens, **kwargs}):
            size += len(piece)
            pieces.append(piece)
            if size > self.max_chars + len(_CONTINUE_TAG):
                raise TemplateLimitError(f"the rendered prompt is longer than {self.max_chars} "
                                         f"characters, more than can fit in the context")
            _check_clock()
        text = "".join(pieces)
        return text if final is None else _cut_after_final(text, final)


def _cut_after_final(text: str, final: str) -> str:
    """HF's continue_final_message: the text up to the end of the final message."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in "
                         "the rendered chat (the chat template drops part of it)")
    at = text.rindex(tag)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
