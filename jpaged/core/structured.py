"""Structured outputs on the host: grammars compiled by llguidance, one matcher per sequence.

    StructuredOutputsParams --GrammarCompiler.compile--> llguidance grammar (cached, validated)
    GrammarCompiler.matcher(spec) -> GrammarMatcher, one per sequence (Sequence.grammar)
    each step: fill_bitmasks(rows, bitmask [B, ceil(V/32)] int32)  (runner, while the device runs)
               GrammarMatcher.accept(token) for each accepted token (Scheduler.update_from_output)

Bit j of word w of a row allows token 32 * w + j; the sampler unpacks it on device and sets the
logits of the disallowed tokens to -inf (engine/sampler.py).
NOTE: why llguidance. It is one small wheel with no dependencies (xgrammar pulls torch and
triton; outlines-core builds a full token-level index of a regex's automaton up front, seconds
for a large JSON schema), builds a mask in ~1 ms for SmolLM2's 49,152 tokens lazily from the
parser state (no per-schema precompilation), rolls back consumed tokens (speculative decoding)
and compiles JSON schemas, regexes, Lark and llama.cpp's GBNF. vLLM ships it as its "guidance"
backend; its grammar strings below are the ones vLLM's backend builds.
Imports only the standard library, NumPy and llguidance (transformers when the tokenizer is
wrapped): no jax.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import numpy as np

from jpaged.sampling_params import StructuredOutputsParams

logger = logging.getLogger("jpaged")
_CACHE_SIZE = 256
# NOTE: JSON whitespace. vLLM's guidance backend allows any run of whitespace between JSON
# tokens; a sampled model (SmolLM2 at temperature 1.0 does) can then emit newlines until
# max_tokens and never close the object. jpaged's default bounds each run to 20 characters
# (pretty-printing four levels deep still fits); whitespace_pattern overrides it and
# disable_any_whitespace allows none.
BOUNDED_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,20}"


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask: ceil(V / 32)."""
    return (vocab_size + 31) // 32


def grammar_source(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for `spec` (not validated yet); ValueError names the field for a
    value llguidance cannot even read (a JSON schema that is not JSON)."""
    import llguidance
    from llguidance.gbnf_to_lark import any_to_lark

    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"structured_outputs.json: not valid JSON ({exc}); pass a JSON "
                                 f"schema object") from None
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.json: a JSON schema must be an object, got "
                             f"{type(schema).__name__}")
        options = {"whitespace_flexible": not spec.disable_any_whitespace, "coerce_one_of": True}
        if spec.whitespace_pattern is not None or not spec.disable_any_whitespace:
            options["whitespace_pattern"] = spec.whitespace_pattern or BOUNDED_WHITESPACE
        if spec.disable_additional_properties:
            options["allow_additional_properties"] = False
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choice))
    if kind == "grammar":
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
        except Exception as exc:      # the GBNF converter's own errors
            raise ValueError(f"structured_outputs.grammar: cannot read the grammar ({exc}); "
                             f"pass a Lark grammar or llama.cpp's GBNF") from None
    return _structural_tag(spec.structural_tag)


def _structural_tag(text: str) -> str:
    """vLLM's structural_tag: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}:
    free text in which each trigger starts a tagged JSON value (begin, schema, end)."""
    import llguidance
    try:
        tag = json.loads(text)
        structures = tag["structures"]
        triggers = tag["triggers"]
        tags = [llguidance.StructTag(trigger=next(t for t in triggers if s["begin"].startswith(t)),
                                     begin=s["begin"], grammar=s["schema"], end=s["end"])
                for s in structures]
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ValueError(f"structured_outputs.structural_tag: expected a JSON string "
                         f'{{"structures": [{{"begin", "schema", "end"}}], "triggers": [...]}} '
                         f"whose begins start with a trigger ({type(exc).__name__}: {exc})") from None
    return llguidance.LLMatcher.grammar_from_lark(
        llguidance.StructTag.to_grammar(tags, assume_special=False))


class GrammarMatcher:
    """One sequence's position in its grammar (an llguidance LLMatcher).

    `accept` advances it by a sampled token, `rollback(k)` undoes the last k (speculative
    decoding's rejected drafts); `is_stopped` once the grammar is complete and only EOS could
    follow (the scheduler then finishes the sequence with "stop").
    """

    def __init__(self, matcher, kind: str):
        self._matcher = matcher
        self.kind = kind
        self.num_tokens = 0                     # tokens accepted so far
        # the grammar completed on a text token and stopped the sequence (its text is output)
        self.completed_by_text = False

    def accept(self, token: int) -> bool:
        """Advance by `token`; False (and the matcher in its error state) if the grammar does
        not allow it."""
        ok = self._matcher.consume_token(token)
        self.num_tokens += ok
        return ok

    def validate(self, tokens: list[int]) -> int:
        """How many of `tokens` the grammar allows from here, in order (nothing consumed)."""
        return self._matcher.validate_tokens(tokens)

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"rollback({num_tokens}): the matcher holds {self.num_tokens} tokens")
        self._matcher.rollback(num_tokens)
        self.num_tokens -= num_tokens

    @property
    def is_stopped(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] ([B, ceil(V/32)] int32)."""
        from llguidance.numpy import fill_next_token_bitmask
        fill_next_token_bitmask(self._matcher, bitmask, row)


class GrammarCompiler:
    """Compiles StructuredOutputsParams against one tokenizer and hands out matchers.

    The llguidance tokenizer is built on first use (~0.3 s for SmolLM2); compiled grammars are
    cached by their spec (an LRU of 256). Thread-safe: a server validates on its own threads.
    """

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._tokenizer = None
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                if self._hf_tokenizer is None:
                    raise ValueError("structured_outputs: this model has no tokenizer; load one "
                                     "with the checkpoint to constrain its output")
                import llguidance.hf
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size,
                    eos_token=list(self.eos_token_ids) or None)
            return self._tokenizer

    def compile(self, spec: StructuredOutputsParams) -> str:
        """The validated llguidance grammar of `spec`; ValueError naming the field
        (structured_outputs.json, .regex, ...) and llguidance's reason when it cannot compile."""
        import llguidance
        key = _spec_key(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = grammar_source(spec)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer)
        except ValueError:
            raise
        except BaseException as exc:      # a TypeError, or a panic of the Rust side
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"structured_outputs.{spec.kind}: the grammar engine failed on it "
                             f"({type(exc).__name__}: {exc})") from None
        if is_error:
            reason = messages[0].strip() if messages else "unknown error"
            raise ValueError(f"structured_outputs.{spec.kind}: the grammar engine cannot compile "
                             f"it: {reason}")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar."""
        import llguidance
        matcher = llguidance.LLMatcher(self.tokenizer, self.compile(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: the grammar engine cannot compile "
                             f"it: {matcher.get_error()}")
        return GrammarMatcher(matcher, spec.kind)


def fill_bitmasks(rows: list[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
    """Fill bitmask[row] for each (matcher, row); llguidance computes them in parallel on its own
    threads, without the GIL. Rows not listed are left as they are (all ones: no constraint)."""
    if not rows:
        return
    from llguidance import LLExecutor
    from llguidance.numpy import fill_next_token_bitmask_par
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = LLExecutor()
    fill_next_token_bitmask_par(_EXECUTOR, [(m._matcher, row) for m, row in rows], bitmask)


_EXECUTOR = None


def _spec_key(spec: StructuredOutputsParams) -> str:
    fields = {k: v for k, v in vars(spec).items() if v not in (None, False)}
    return json.dumps(fields, sort_keys=True, default=str)
