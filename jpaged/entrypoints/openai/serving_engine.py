"""What the completion, chat and /generate handlers share: errors in OpenAI's shape, the model-name
check, sampling parameters from a request, the context-length check, token strings for logprobs,
and server-sent events.

Errors follow vLLM's wording where vLLM has one (e.g. "The model `x` does not exist.", the
max-context message), and always name the offending field in `param`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from http import HTTPStatus

from pydantic import BaseModel

from jpaged.entrypoints.async_engine import AsyncEngine
from jpaged.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from jpaged.outputs import Logprob
from jpaged.sampling_params import RequestOutputKind, SamplingParams

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "RequestTooLargeError", 500: "InternalServerError",
                503: "ServiceUnavailableError"}
_SAMPLING_FIELD = re.compile(r"^SamplingParams: (\w+)")


class OpenAIError(Exception):
    """A request the server refuses: becomes `{"error": {message, type, param, code}}`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

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
        self._token_texts: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(f"The model `{model}` does not exist. This server serves "
                              f"{self.served_model_names}.", HTTPStatus.NOT_FOUND, "model")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer, so text prompts cannot be encoded; "
                              "send token ids instead", param="prompt")
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

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

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
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
                f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {num_prompt_tokens} input "
                f"tokens ({max_tokens} > {self.max_model_len} - {num_prompt_tokens}).",
                param="max_tokens")
        return max_tokens

    def sampling_params(self, request, *, max_tokens: int, logprobs: int | None,
                        output_kind: RequestOutputKind = RequestOutputKind.DELTA) -> SamplingParams:
        """SamplingParams from the request's fields (OpenAI's defaults where it says None);
        a range error names the field."""
        if request.logit_bias:
            raise OpenAIError("logit_bias is not supported by jpaged; leave it out",
                              param="logit_bias")
        fields = dict(n=request.n, temperature=request.temperature, top_p=request.top_p,
                      top_k=request.top_k, min_p=request.min_p,
                      presence_penalty=request.presence_penalty,
                      frequency_penalty=request.frequency_penalty,
                      repetition_penalty=request.repetition_penalty, seed=request.seed,
                      stop=request.stop, stop_token_ids=request.stop_token_ids,
                      min_tokens=request.min_tokens, ignore_eos=request.ignore_eos,
                      include_stop_str_in_output=request.include_stop_str_in_output,
                      skip_special_tokens=request.skip_special_tokens)
        fields = {k: v for k, v in fields.items() if v is not None}
        if request.n > self.llm_engine.config.max_num_seqs:
            raise OpenAIError(f"n must be at most max_num_seqs ({self.llm_engine.config.max_num_seqs})"
                              f" on this server, got {request.n}", param="n")
        return make_sampling_params(max_tokens=max_tokens, logprobs=logprobs,
                                    output_kind=output_kind, **fields)


def make_sampling_params(**fields) -> SamplingParams:
    """SamplingParams(**fields), its ValueError (or an unknown field) as a 400 naming the field."""
    unknown = sorted(set(fields) - set(SamplingParams.__dataclass_fields__))
    if unknown:
        raise OpenAIError(f"unknown sampling parameter(s) {unknown}; the fields are "
                          f"{sorted(SamplingParams.__dataclass_fields__)}", param=unknown[0])
    try:
        return SamplingParams(**fields)
    except ValueError as exc:
        match = _SAMPLING_FIELD.match(str(exc))
        raise OpenAIError(str(exc).removeprefix("SamplingParams: "),
                          param=match.group(1) if match else None) from exc


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
