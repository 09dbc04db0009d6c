"""SamplingParams with vLLM's names and defaults, validated up front."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers

class RequestOutputKind(enum.Enum):
    """vLLM's names: what `LLMEngine.step` returns for a request (see engine/output_processor.py)."""
    CUMULATIVE = 0     # every step: everything so far
    DELTA = 1          # every step: only what is new
    FINAL_ONLY = 2     # once, at the end


# Temperatures below this are greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
MAX_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_list_of(check):
    return lambda x: isinstance(x, (list, tuple)) and all(check(v) for v in x)


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_TYPES = {
    "n": (_is_int, "an int"),
    **{name: (_is_number, "a number") for name in _FLOAT_FIELDS},
    "top_k": (_is_int, "an int"),
    "seed": (lambda x: x is None or _is_int(x), "an int or None"),
    "max_tokens": (lambda x: x is None or _is_int(x), "an int or None"),
    "min_tokens": (_is_int, "an int"),
    "stop": (lambda x: x is None or isinstance(x, str) or _is_list_of(lambda v: isinstance(v, str))(x),
             "a string, a list of strings or None"),
    "stop_token_ids": (lambda x: x is None or _is_list_of(_is_int)(x), "a list of ints or None"),
    "ignore_eos": (lambda x: isinstance(x, bool), "a bool"),
    "logprobs": (lambda x: x is None or _is_int(x), "an int or None"),
    "prompt_logprobs": (lambda x: x is None or _is_int(x), "an int or None"),
    "include_stop_str_in_output": (lambda x: isinstance(x, bool), "a bool"),
    "skip_special_tokens": (lambda x: isinstance(x, bool), "a bool"),
    "output_kind": (lambda x: isinstance(x, RequestOutputKind), "a RequestOutputKind"),
    "structured_outputs": (lambda x: x is None or isinstance(x, StructuredOutputsParams),
                           "a StructuredOutputsParams or None"),
    "logit_bias": (lambda x: x is None or (isinstance(x, dict) and all(
        _is_int(t) and _is_number(b) for t, b in x.items())),
                   "a dict of token id (int) -> bias (number), or None"),
}


@dataclasses.dataclass
class StructuredOutputsParams:
    """vLLM's (>= 0.12) constraint on what a request may generate: exactly one of `json` (a JSON
    schema, dict or string), `regex`, `choice` (a list of strings), `grammar` (Lark/EBNF, or
    llama.cpp's GBNF), `json_object=True` (any JSON object) or `structural_tag` (a JSON string).
    Compiled by the grammar engine (jpaged/core/structured.py) when the request is added; one it
    cannot compile is a ValueError naming the field and the reason."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False              # accepted: llguidance is the only engine
    disable_any_whitespace: bool = False        # JSON: no whitespace between tokens
    disable_additional_properties: bool = False  # JSON: additionalProperties false by default
    whitespace_pattern: str | None = None       # JSON: the whitespace allowed between tokens

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self):
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams: set exactly one of {list(self.KINDS)}, "
                             f"got {given or 'none'}")
        checks = {
            "json": isinstance(self.json, (str, dict)),
            "regex": isinstance(self.regex, str) and self.regex != "",
            "choice": isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                      and all(isinstance(c, str) and c for c in self.choice),
            "grammar": isinstance(self.grammar, str) and self.grammar.strip() != "",
            "json_object": self.json_object is True,
            "structural_tag": isinstance(self.structural_tag, str),
        }
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StructuredOutputsParams: {name} must be a bool, got "
                                 f"{getattr(self, name)!r}")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ValueError(f"StructuredOutputsParams: whitespace_pattern must be a regex string, "
                             f"got {self.whitespace_pattern!r}")
        kind = given[0]
        if not checks[kind]:
            expected = {"json": "a JSON schema (dict or string)", "regex": "a non-empty string",
                        "choice": "a non-empty list of non-empty strings",
                        "grammar": "a non-empty grammar string", "json_object": "True",
                        "structural_tag": "a JSON string"}[kind]
            raise ValueError(f"StructuredOutputsParams: {kind} must be {expected}, got "
                             f"{getattr(self, kind)!r}")
        if self.choice is not None:
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16         # None: up to the model's max length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None         # number of top logprobs to return per token (plus the sampled one)
    # per prompt token after the first: its log-prob given the tokens before it and the top k
    # (vLLM's prompt_logprobs; RequestOutput.prompt_logprobs). Such a prompt is always computed:
    # it reads nothing from the prefix cache.
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # vLLM's name: constrain the output to a JSON schema, regex, choice or grammar
    structured_outputs: StructuredOutputsParams | None = None
    # token id -> a number added to its logit before penalties, bans and sampling (vLLM's and
    # OpenAI's logit_bias; the returned log-probs stay the model's own, as vLLM's)
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        for name in ("n", "top_k", "min_tokens", "seed", "max_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if self.logit_bias is not None:
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _check_types(self) -> None:
        """Wrong types get an error naming the field, the value and what is expected (not a
        TypeError from a comparison deep inside the checks)."""
        for name, (ok, expected) in _TYPES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"SamplingParams: {name} must be {expected}, got {value!r} "
                                 f"({type(value).__name__})")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def uses_filters(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)

    def _validate(self) -> None:
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be at least 1, got {self.max_tokens!r}"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             f"min_tokens must be >= 0, got {self.min_tokens!r}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got "
             f"{self.prompt_logprobs!r}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop),
             f"stop must be non-empty strings, got {self.stop!r}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}"),
            (all(t >= 0 and math.isfinite(b) for t, b in (self.logit_bias or {}).items()),
             f"logit_bias must map non-negative token ids to finite numbers, got "
             f"{self.logit_bias!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")


@dataclasses.dataclass
class BeamSearchParams:
    """vLLM's beam-search parameters, validated up front.

    temperature is accepted for vLLM compatibility; as in vLLM and in HF's beam search without
    sampling, beams are ranked by the model's own log-probabilities.
    """
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self):
        checks = [
            (_is_int(self.beam_width) and 1 <= self.beam_width <= MAX_LOGPROBS // 2,
             f"beam_width must be an int in 1..{MAX_LOGPROBS // 2} (candidates come from the top "
             f"{MAX_LOGPROBS} log-probs), got {self.beam_width!r}"),
            (_is_int(self.max_tokens) and self.max_tokens >= 1,
             f"max_tokens must be an int >= 1, got {self.max_tokens!r}"),
            (isinstance(self.ignore_eos, bool), f"ignore_eos must be a bool, got {self.ignore_eos!r}"),
            (_is_number(self.temperature) and self.temperature >= 0,
             f"temperature must be a number >= 0, got {self.temperature!r}"),
            (_is_number(self.length_penalty),
             f"length_penalty must be a number, got {self.length_penalty!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"BeamSearchParams: {message}")
