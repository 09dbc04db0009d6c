"""Structured outputs and tool calls in the server (vLLM's semantics).

What constrains a request (at most one of them; StructuredOutputsParams, compiled by the engine):
  - OpenAI's `response_format`: {"type": "json_object"}, {"type": "json_schema", "json_schema":
    {"name", "schema", "strict"}}, {"type": "structural_tag", ...};
  - vLLM's `structured_outputs` in the body: {"json" | "regex" | "choice" | "grammar" |
    "json_object" | "structural_tag": ..., options};
  - chat `tool_choice`: a named function constrains the answer to that function's parameters
    (the answer is its arguments); "required" to vLLM's JSON array of {"name", "parameters"}
    with at least one call, each name one of the tools' and its parameters that tool's schema.
`tool_choice: "auto"` does not constrain: with `--enable-auto-tool-choice --tool-call-parser
NAME` the parser finds the calls in the free text (hermes: `<tool_call>{"name", "arguments"}
</tool_call>` blocks; llama3_json: `{"name", "parameters"}` objects, optionally after
`<|python_tag|>`, separated by ";").

A stream sends tool calls as OpenAI deltas: a named function's arguments as they are generated
(the first delta with the call's id, type and name), and for "required" and "auto" each call once
it is complete (id, type, name and its whole arguments in one delta); text that may still turn
into a call is held back until it is known.
"""

from __future__ import annotations

import json
import re

from jpaged.entrypoints.openai.protocol import random_id
from jpaged.entrypoints.openai.serving_engine import OpenAIError
from jpaged.sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


def tool_call_id() -> str:
    return random_id("chatcmpl-tool")


# ---- what constrains a request ------------------------------------------------------------------
def structured_outputs_of(request, tool_choice=None) -> StructuredOutputsParams | None:
    """The request's constraint (see the module docstring), or None; a 400 naming the field for
    one that is malformed or for two at once."""
    found = []
    body = (request.model_extra or {}).get("structured_outputs")
    if body is not None:
        found.append(("structured_outputs", structured_outputs_params(body)))
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        found.append(("response_format", _from_response_format(fmt)))
    if tool_choice is not None:
        found.append(("tool_choice", tool_choice))
    if len(found) > 1:
        raise OpenAIError(f"{found[0][0]} and {found[1][0]} both constrain the output; give one",
                          param=found[1][0])
    return found[0][1] if found else None


def structured_outputs_params(body) -> StructuredOutputsParams:
    """vLLM's `structured_outputs` request field (a dict) as params; a 400 naming the field."""
    if not isinstance(body, dict):
        raise OpenAIError(f"structured_outputs must be an object such as {{\"json\": {{...}}}}, "
                          f"got {type(body).__name__}", param="structured_outputs")
    return _params(body, "structured_outputs")


def _params(fields: dict, param: str) -> StructuredOutputsParams:
    known = set(StructuredOutputsParams.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise OpenAIError(f"{param}: unknown field(s) {unknown}; the fields are {sorted(known)}",
                          param=f"{param}.{unknown[0]}")
    try:
        return StructuredOutputsParams(**fields)
    except (ValueError, TypeError) as exc:
        raise OpenAIError(f"{param}: {str(exc).removeprefix('StructuredOutputsParams: ')}",
                          param=param) from exc


def _from_response_format(fmt) -> StructuredOutputsParams:
    extra = fmt.model_extra or {}
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.type == "json_schema":
        spec = extra.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise OpenAIError("response_format.json_schema must be an object {\"name\": ..., "
                              "\"schema\": {...}}", param="response_format.json_schema")
        # OpenAI's schema is optional: none means any JSON object
        return StructuredOutputsParams(json=spec.get("schema") or {"type": "object"})
    # structural_tag: vLLM's {"type": "structural_tag", "structures": [...], "triggers": [...]}
    return StructuredOutputsParams(structural_tag=json.dumps(
        {k: v for k, v in extra.items() if k in ("structures", "triggers")}))


def tool_choice_constraint(tools, choice, parallel: bool = True
                           ) -> StructuredOutputsParams | None:
    """The constraint of a named function or "required" (vLLM's schemas; with OpenAI's
    `parallel_tool_calls: false`, at most one call); None otherwise."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next(t for t in tools if t.function.name == name)
        return StructuredOutputsParams(json=tool.function.parameters or {"type": "object"})
    if choice != "required":
        return None
    calls = [{"properties": {"name": {"type": "string", "enum": [t.function.name]},
                             "parameters": t.function.parameters or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def parse_required(text: str) -> list[dict]:
    """The calls of a "required" answer (a JSON array of {"name", "parameters"})."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [_call(c.get("name"), c.get("parameters")) for c in calls
            if isinstance(c, dict) and isinstance(c.get("name"), str)] \
        if isinstance(calls, list) else []


def _call(name: str, arguments) -> dict:
    """One call as OpenAI's `function`: arguments as a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"name": name, "arguments": arguments}


# ---- parsers of free text ("auto") ----------------------------------------------------------------
class HermesToolParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen); the
    text before the first block is the content."""
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, calls) of a finished answer; an unreadable call leaves it all content."""
        if self.START not in text:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text):
            try:
                call = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return text, []
            calls.append(_call(call["name"], call.get("arguments", call.get("parameters"))))
        content = text[:text.index(self.START)]
        return content or None, calls

    def streamable(self, text: str) -> tuple[int, list[dict]]:
        """(characters of `text` that are content for sure, the calls complete so far)."""
        start = text.find(self.START)
        if start < 0:
            return len(text) - _partial_suffix(text, self.START), []
        calls = []
        for match in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.DOTALL):
            try:
                call = json.loads(match.group(1))
                calls.append(_call(call["name"], call.get("arguments", call.get("parameters"))))
            except (json.JSONDecodeError, KeyError, TypeError):
                break
        return start, calls


class Llama3JsonToolParser:
    """Llama 3's JSON tool calls: the answer is `{"name": ..., "parameters": {...}}` (or
    "arguments"), optionally after `<|python_tag|>`, several separated by ";"."""
    TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls, decoder, i = [], json.JSONDecoder(), 0
        while i < len(body):
            try:
                call, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return text, []
            calls.append(_call(call["name"], call.get("parameters", call.get("arguments"))))
            while i < len(body) and body[i] in "; \n\t":
                i += 1
        return None, calls

    def streamable(self, text: str) -> tuple[int, list[dict]]:
        body = text.lstrip()
        if not body or body.startswith("{") or self.TAG.startswith(body[:len(self.TAG)]):
            return 0, []                       # may be a call: known at the end
        return len(text), []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that starts `marker` (held back while streaming)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def make_parser(name: str):
    if name == "hermes":
        return HermesToolParser()
    if name == "llama3_json":
        return Llama3JsonToolParser()
    raise ValueError(f"--tool-call-parser {name!r} is not one of {list(TOOL_CALL_PARSERS)}")


class ToolCallStream:
    """One streamed choice's text turned into OpenAI deltas: `feed(text, finished)` returns the
    delta fields to send now ({"content": ...} and/or {"tool_calls": [...]}).

    mode: "named" (the text is the arguments of `name`), "required" (a JSON array of calls,
    sent when complete) or "auto" (a parser finds calls in the text)."""

    def __init__(self, mode: str, *, name: str | None = None, parser=None):
        self.mode, self.name, self.parser = mode, name, parser
        self.text = ""
        self.sent_content = 0
        self.sent_calls = 0

    @property
    def called(self) -> bool:
        return self.sent_calls > 0

    def feed(self, delta: str, finished: bool) -> dict:
        self.text += delta
        if self.mode == "named":
            if not delta and self.sent_calls:
                return {}
            call = {"index": 0, "function": {"arguments": delta}}
            if not self.sent_calls:
                call.update(id=tool_call_id(), type="function")
                call["function"]["name"] = self.name
                self.sent_calls = 1
            return {"tool_calls": [call]}
        if self.mode == "required":
            calls = parse_required(self.text) if finished else []
            content_end = 0
        elif finished:
            content, calls = self.parser.extract(self.text)
            content_end = len(content or "") if calls else len(self.text)
        else:
            content_end, calls = self.parser.streamable(self.text)
        out = {}
        if content_end > self.sent_content:
            out["content"] = self.text[self.sent_content:content_end]
            self.sent_content = content_end
        new = [{"index": i, "id": tool_call_id(), "type": "function", "function": call}
               for i, call in enumerate(calls) if i >= self.sent_calls]
        if new:
            out["tool_calls"] = new
            self.sent_calls = len(calls)
        return out
