"""What the completion, chat and /generate handlers share: errors in OpenAI's shape, the model-name
check, sampling parameters from a request (vLLM's bounds, the fields refused), tokenization off
the event loop, the context-length check, token strings for logprobs, and server-sent events.

Errors follow vLLM's wording where vLLM has one (e.g. "The model `x` does not exist.", the
max-context message), and always name the offending field in `param`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
from collections.abc import AsyncIterator
from http import HTTPStatus

from pydantic import BaseModel

from jpaged.entrypoints.async_engine import (AsyncEngine, EngineDeadError, QueueFullError,
                                             ShuttingDownError)
from jpaged.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from jpaged.outputs import Logprob
from jpaged.lora import LoRARequest
from jpaged.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "RequestTooLargeError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}
_SAMPLING_FIELD = re.compile(r"^SamplingParams: (\w+)")
RETRY_AFTER_S = 1                   # the Retry-After of a 503 (a full queue, a restart)
MAX_N = 16384                       # vLLM's VLLM_MAX_N_SEQUENCES default
MAX_TEMPERATURE = 2.0               # vLLM's bound
# vLLM request fields jpaged does not implement: refused when set to anything but their default
# (value), so that no option is silently ignored. Unknown fields that are not vLLM's are ignored.
UNSUPPORTED_FIELDS = {
    "use_beam_search": (False, "beam search runs offline only (LLM.beam_search)"),
    "allowed_token_ids": (None, "the sampler has no token allow-list yet"),
    "bad_words": ([], "the sampler has no banned words yet"),
    **{f"guided_{kind}": (None, f"vLLM 0.12 replaced it: send structured_outputs: "
                                f"{{\"{kind}\": ...}}") for kind in ("json", "regex", "choice",
                                                                      "grammar")},
    "logprob_token_ids": (None, "log-probs of chosen token ids are not implemented"),
    "truncate_prompt_tokens": (None, "prompts are not truncated; shorten the prompt"),
    "prompt_embeds": (None, "jpaged takes text or token ids, not embeddings"),
    "priority": (0, "the scheduler is first come, first served"),
    "cache_salt": (None, "the prefix cache has no salts"),
    "return_token_ids": (False, "token ids are not returned"),
    "return_tokens_as_token_ids": (False, "tokens are returned as text"),
    "spaces_between_special_tokens": (True, "special tokens are detokenized as the tokenizer does"),
    "length_penalty": (1.0, "it applies to beam search only"),
    "repetition_detection": (None, "repetition detection is not implemented"),
    "thinking_token_budget": (None, "thinking budgets are not implemented"),
    "vllm_xargs": (None, "there are no sampling extensions"),
    "kv_transfer_params": (None, "disaggregated serving is not implemented"),
}


class OpenAIError(Exception):
    """A request the server refuses: becomes `{"error": {message, type, param, code}}` (with
    `headers` on the response, e.g. Retry-After)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.headers = headers or {}

    def response(self) -> ErrorResponse:
        return error_body(self.message, self.status, self.param)


def error_body(message: str, status: int, param: str | None = None) -> ErrorResponse:
    kind = _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event carrying a JSON object."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclasses.dataclass
class EventStream:
    """A streamed answer: its body and the engine requests behind it, which the server aborts
    once the response ends however it ends (a body never started runs no cleanup of its own)."""
    body: AsyncIterator[str]
    request_ids: list[str]
    media_type: str = "text/event-stream"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str]):
        self.engine = engine
        self.llm_engine = engine.engine
        self.served_model_names = served_model_names
        self.max_model_len = self.llm_engine.max_model_len
        self.tokenizer = self.llm_engine.tokenizer
        self.tokenizer_lock = self.llm_engine.output_processor.tokenizer_lock
        self.vocab_size = self.llm_engine.model_config.vocab_size
        self.max_num_seqs = self.llm_engine.config.max_num_seqs
        # NOTE: no text longer than this can fit in max_model_len tokens (each token covers at most
        # its longest vocabulary entry's characters): longer prompts are refused untokenized.
        longest = max(map(len, self.tokenizer.get_vocab()), default=1) if self.tokenizer else 1
        self.max_prompt_chars = self.max_model_len * max(longest, 1)
        self._token_texts: dict[int, str] = {}
        # LoRA adapters a request's `model` may name (--lora-modules, /v1/load_lora_adapter)
        self.lora_modules: dict[str, LoRARequest] = {}

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names and \
                model not in self.lora_modules:
            raise OpenAIError(f"The model `{model}` does not exist. This server serves "
                              f"{self.served_model_names + list(self.lora_modules)}.",
                              HTTPStatus.NOT_FOUND, "model")

    def response_model(self, model: str | None) -> str:
        """The `model` a response names: the adapter's for a LoRA request, else the served one."""
        return model if model in self.lora_modules else self.model_name

    def lora_request(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the base model)."""
        return self.lora_modules.get(model) if model is not None else None

    async def encode(self, texts: list[str], *, add_special_tokens: bool = True,
                     param: str = "prompt") -> list[list[int]]:
        """Token ids of each text, tokenized on a worker thread (not the event loop); a text too
        long to fit the context is refused before tokenization."""
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer, so text prompts cannot be encoded; "
                              "send token ids instead", param=param)
        for text in texts:
            if len(text) > self.max_prompt_chars:
                raise OpenAIError(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, "
                    f"your {param} has {len(text)} characters, more than {self.max_model_len} "
                    f"tokens can hold (at most {self.max_prompt_chars}). Please reduce the length "
                    f"of the {param}.", param=param)
        try:
            return await asyncio.to_thread(self._encode_batch, texts, add_special_tokens)
        except (TypeError, ValueError, UnicodeError) as exc:     # e.g. text that is not Unicode
            raise OpenAIError(f"the {param} could not be tokenized: {exc}", param=param) from exc

    def _encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        with self.tokenizer_lock:
            return [list(ids) for ids in self.tokenizer(
                texts, add_special_tokens=add_special_tokens).input_ids]

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs), as the tokenizer decodes it alone (cached)."""
        text = self._token_texts.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                with self.tokenizer_lock:
                    text = self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str,
                     max_tokens_param: str = "max_tokens") -> int:
        """max_tokens to use; a prompt that leaves no room, or a max_tokens past the context, is
        a 400 with vLLM's message."""
        if num_prompt_tokens >= self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your request has {num_prompt_tokens} input tokens, which leaves no room to "
                f"generate. Please reduce the length of the {param}.", param=param)
        room = self.max_model_len - num_prompt_tokens
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise OpenAIError(
                f"'{max_tokens_param}' is too large: {max_tokens}. This model's maximum context "
                f"length is {self.max_model_len} tokens and your request has {num_prompt_tokens} "
                f"input tokens ({max_tokens} > {self.max_model_len} - {num_prompt_tokens}).",
                param=max_tokens_param)
        return max_tokens

    def check_request(self, request) -> None:
        """What any completion or chat request must pass before its prompt is looked at: the
        model, vLLM fields jpaged does not implement, response_format, stream_options."""
        self.check_model(request.model)
        for name, value in (request.model_extra or {}).items():
            if name in UNSUPPORTED_FIELDS and value not in (None, UNSUPPORTED_FIELDS[name][0]):
                raise OpenAIError(f"{name} is not supported by jpaged ({UNSUPPORTED_FIELDS[name][1]}"
                                  f"); leave it out", param=name)
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("Stream options can only be defined when `stream=True`.",
                              param="stream_options")
        if request.prompt_logprobs is not None and request.stream:
            raise OpenAIError("`prompt_logprobs` are not available when `stream=True`.",
                              param="prompt_logprobs")

    def sampling_params(self, request, *, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        output_kind: RequestOutputKind = RequestOutputKind.DELTA,
                        tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        """SamplingParams from the request's fields (OpenAI's defaults where it says None); a
        range error names the field. `n` may exceed max_num_seqs (see `split_samples`). Its
        structured outputs (response_format, structured_outputs or the chat's tool_choice:
        tool_calls.py) are compiled here, so one that cannot compile is a 400 naming its field."""
        fields = dict(n=request.n, temperature=request.temperature, top_p=request.top_p,
                      top_k=request.top_k, min_p=request.min_p,
                      presence_penalty=request.presence_penalty,
                      frequency_penalty=request.frequency_penalty,
                      repetition_penalty=request.repetition_penalty, seed=request.seed,
                      stop=request.stop, stop_token_ids=request.stop_token_ids,
                      min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
                      include_stop_str_in_output=request.include_stop_str_in_output,
                      skip_special_tokens=request.skip_special_tokens,
                      prompt_logprobs=prompt_logprobs)
        fields = {k: v for k, v in fields.items() if v is not None}
        bad = [t for t in request.stop_token_ids or () if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError(f"stop_token_ids has id {bad[0]}, outside the vocabulary (vocab size "
                              f"{self.vocab_size}); give ids in [0, {self.vocab_size})",
                              param="stop_token_ids")
        if request.logit_bias:
            fields["logit_bias"] = self.logit_bias(request.logit_bias)
        structured = self.structured_outputs(request, tool_constraint)
        return make_sampling_params(max_tokens=max_tokens, logprobs=logprobs,
                                    output_kind=output_kind, structured_outputs=structured,
                                    **fields)

    def logit_bias(self, given: dict[str, float]) -> dict[int, float]:
        """OpenAI's logit_bias (token id strings -> bias) as vLLM reads it: ids as ints inside
        the vocabulary, each bias clamped to [-100, 100]; a 400 naming logit_bias otherwise."""
        out = {}
        for key, bias in given.items():
            try:
                token = int(key)
            except ValueError:
                raise OpenAIError(f"logit_bias has key {key!r}, which is not a token id; give "
                                  f"token ids as strings of integers", param="logit_bias") from None
            if not 0 <= token < self.vocab_size or not math.isfinite(bias):
                raise OpenAIError(f"logit_bias has {key!r}: {bias!r}; token ids must be in [0, "
                                  f"{self.vocab_size}) and biases finite numbers",
                                  param="logit_bias")
            out[token] = min(100.0, max(-100.0, float(bias)))
        return out

    def compiled_structured_outputs(self, fields) -> StructuredOutputsParams:
        """/generate's `structured_outputs` dict as compiled params (a 400 naming the field)."""
        from jpaged.entrypoints.openai.tool_calls import structured_outputs_params
        structured = structured_outputs_params(fields)
        try:
            self.llm_engine.structured.compile(structured)
        except (ValueError, TypeError) as exc:
            raise OpenAIError(f"structured_outputs: {exc}", param="structured_outputs") from exc
        return structured

    def structured_outputs(self, request, tool_constraint=None) -> StructuredOutputsParams | None:
        from jpaged.entrypoints.openai.tool_calls import structured_outputs_of
        structured = structured_outputs_of(request, tool_constraint)
        if structured is None:
            return None
        field = "structured_outputs" if "structured_outputs" in (request.model_extra or {}) \
            else "response_format" if tool_constraint is None else "tool_choice"
        try:
            self.llm_engine.structured.compile(structured)
        except (ValueError, TypeError) as exc:
            raise OpenAIError(f"{field}: {exc}", param=field) from exc
        return structured

    def split_samples(self, params: SamplingParams) -> list[tuple[int, SamplingParams]]:
        """(first sample index, params) of the engine requests that make `params.n` samples: one,
        or with n above max_num_seqs (whose samples all run together) several of at most
        max_num_seqs each, which queue like any request.
        NOTE: with a seed, part k gets the seed that sample `first` would have had in one request
        (core/request.py: sample i draws with seed + i * 0x9E3779B9), so the samples do not depend
        on how n was split."""
        if params.n <= self.max_num_seqs:
            return [(0, params)]
        parts = []
        for first in range(0, params.n, self.max_num_seqs):
            seed = None if params.seed is None else (params.seed + first * 0x9E3779B9) % 2**32
            parts.append((first, dataclasses.replace(
                params, n=min(self.max_num_seqs, params.n - first), seed=seed)))
        return parts


def make_sampling_params(**fields) -> SamplingParams:
    """SamplingParams(**fields) within vLLM's server bounds (finite numbers, temperature in
    [0, 2], n at most 16384, n = 1 when greedy), every error a 400 naming the field."""
    unknown = sorted(set(fields) - set(SamplingParams.__dataclass_fields__))
    if unknown:
        raise OpenAIError(f"unknown sampling parameter(s) {unknown}; the fields are "
                          f"{sorted(SamplingParams.__dataclass_fields__)}", param=unknown[0])
    for name, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise OpenAIError(f"{name} must be a finite number, got {value}", param=name)
    temperature, n = fields.get("temperature", 1.0), fields.get("n", 1)
    if isinstance(temperature, (int, float)) and temperature > MAX_TEMPERATURE:
        raise OpenAIError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}.",
                          param="temperature")
    if isinstance(n, int) and n > MAX_N:
        raise OpenAIError(f"n must be at most {MAX_N}, got {n}.", param="n")
    try:
        params = SamplingParams(**fields)
    except ValueError as exc:
        raise as_openai_error(exc, None) from exc
    if params.greedy and params.n > 1:
        raise OpenAIError(f"n must be 1 when using greedy sampling, got {params.n}.", param="n")
    return params


def as_openai_error(exc: BaseException, param: str | None) -> BaseException:
    """The engine's refusals as HTTP errors: ValueError 400 (naming the SamplingParams field
    when it is one, else `param`), a full queue or a stopping server 503 with Retry-After, a dead
    engine 500 (no retry helps: restart it)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValueError):
        match = _SAMPLING_FIELD.match(str(exc))
        return OpenAIError(str(exc).removeprefix("SamplingParams: "),
                           param=match.group(1) if match else param)
    if isinstance(exc, (QueueFullError, ShuttingDownError)):
        return OpenAIError(str(exc), 503, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return OpenAIError(str(exc), 500)
    return exc


def top_logprobs_of(entry: dict[int, Logprob], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one step (the sampled one is in `entry` whatever its rank)."""
    ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)
    return [(token_id, lp.logprob) for token_id, lp in ranked[:k]]


async def merge_async_iterators(*iterators: AsyncIterator) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several async iterators as items arrive. Closing the merged iterator
    (or an error in one) cancels the others, so each runs its own cleanup (an abort)."""
    if len(iterators) == 1:
        async with contextlib.aclosing(iterators[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(index: int, iterator: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(iterator):
                async for item in iterator:
                    await queue.put((index, item))
        except Exception as exc:                          # noqa: BLE001 - forwarded to the reader
            await queue.put((index, exc))
        await queue.put((index, done))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
