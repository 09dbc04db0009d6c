"""POST /v1/completions: one engine request per prompt (a list of prompts is a batch), each with n
samples; choice index = prompt index * n + sample index (vLLM's numbering).

Requests run with DELTA outputs: a stream sends each step's new text as one chunk per choice; the
non-streamed answer is the same deltas joined.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from jpaged.entrypoints.async_engine import EngineDeadError, EngineStepError, QueueFullError
from jpaged.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest,
                                                CompletionResponse, CompletionResponseChoice,
                                                CompletionResponseStreamChoice,
                                                CompletionStreamResponse, UsageInfo, random_id)
from jpaged.entrypoints.openai.serving_engine import (SSE_DONE, EventStream, OpenAIError,
                                                     OpenAIServing, error_body, make_sampling_params,
                                                     merge_async_iterators, sse)
from jpaged.outputs import CompletionOutput
from jpaged.sampling_params import RequestOutputKind


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest
                                ) -> CompletionResponse | EventStream:
        self.check_model(request.model)
        self._refuse_unsupported(request)
        prompts = self._prompts(request.prompt)
        base_id = random_id("cmpl")
        added = self.add_requests(base_id, [
            (prompt, self.sampling_params(
                request, logprobs=request.logprobs,
                max_tokens=self.check_length(len(prompt["prompt_token_ids"]), request.max_tokens,
                                             "prompt")))
            for prompt in prompts])
        iterators = [self.engine.outputs(request_id, stream) for request_id, stream in added]
        state = _Choices(self, request, prompts, base_id)
        if request.stream:
            return EventStream(state.stream(merge_async_iterators(*iterators)),
                               [request_id for request_id, _ in added])
        return await state.collect(merge_async_iterators(*iterators))

    async def generate(self, body: dict) -> dict | EventStream:
        """vLLM's simple `POST /generate`: `{"prompt", "stream", **SamplingParams fields}` ->
        `{"text": [prompt + output for each of the n outputs]}`; streamed, one such JSON object
        per line, each with the text so far."""
        fields = dict(body)
        prompt, stream = fields.pop("prompt", None), fields.pop("stream", False)
        if not isinstance(prompt, str) or not prompt:
            raise OpenAIError(f"prompt must be a non-empty string, got {prompt!r}", param="prompt")
        if not isinstance(stream, bool):
            raise OpenAIError(f"stream must be a bool, got {stream!r}", param="stream")
        if "output_kind" in fields:
            raise OpenAIError("output_kind is chosen by the server; leave it out",
                              param="output_kind")
        engine_prompt = {"prompt": prompt, "prompt_token_ids": self.encode(prompt)}
        params = make_sampling_params(**fields, output_kind=RequestOutputKind.DELTA)
        if params.n > self.llm_engine.config.max_num_seqs:
            raise OpenAIError(f"n must be at most max_num_seqs "
                              f"({self.llm_engine.config.max_num_seqs}) on this server, got "
                              f"{params.n}", param="n")
        params.max_tokens = self.check_length(len(engine_prompt["prompt_token_ids"]),
                                              params.max_tokens, "prompt")
        request_id = random_id("generate")
        [(request_id, handle)] = self.add_requests(request_id, [(engine_prompt, params)])
        outputs = merge_async_iterators(self.engine.outputs(request_id, handle))
        texts = [""] * params.n

        async def updates() -> AsyncIterator[None]:
            async with contextlib.aclosing(outputs):
                async for _, request_output in outputs:
                    for output in request_output.outputs:
                        texts[output.index] += output.text
                    yield

        async def lines() -> AsyncIterator[str]:
            try:
                async for _ in updates():
                    yield json.dumps({"text": [prompt + t for t in texts]}) + "\n"
            except (EngineStepError, EngineDeadError) as exc:
                yield error_body(str(exc), 500).model_dump_json() + "\n"

        if stream:
            return EventStream(lines(), [request_id], media_type="application/x-ndjson")
        try:
            async for _ in updates():
                pass
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(str(exc), 500 if isinstance(exc, EngineStepError) else 503) from exc
        return {"text": [prompt + t for t in texts]}

    def add_requests(self, base_id: str, prompts_and_params) -> list:
        """Add every sub-request, or none: a refusal aborts those already added."""
        added = []
        try:
            for i, (prompt, params) in enumerate(prompts_and_params):
                request_id = f"{base_id}-{i}"
                added.append((request_id, self.engine.add_request(request_id, prompt, params)))
        except BaseException as exc:
            for request_id, _ in added:
                self.engine.abort(request_id)
            raise as_openai_error(exc, "prompt") from exc
        return added

    @staticmethod
    def _refuse_unsupported(request: CompletionRequest) -> None:
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported by jpaged; leave it out", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError(f"best_of is not supported by jpaged (got {request.best_of}); leave "
                              f"it out or set it equal to n", param="best_of")
        if request.echo and request.logprobs is not None:
            raise OpenAIError("echo with logprobs needs prompt logprobs, which jpaged does not "
                              "compute; drop one of them", param="echo")
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("Stream options can only be defined when `stream=True`.",
                              param="stream_options")

    def _prompts(self, prompt) -> list[dict]:
        """The request's prompt(s) as engine prompts {"prompt", "prompt_token_ids"}."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("prompt must not be empty: give a string, a list of strings, a list "
                              "of token ids or a list of such lists", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise OpenAIError("prompt must not be an empty string", param="prompt")
                out.append({"prompt": p, "prompt_token_ids": self.encode(p)})
            else:
                if not p:
                    raise OpenAIError("prompt must not be an empty list of token ids",
                                      param="prompt")
                self.check_token_ids(p)
                out.append({"prompt": None, "prompt_token_ids": list(p)})
        return out

    def check_token_ids(self, token_ids: list[int]) -> None:
        vocab = self.llm_engine.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"Token id {bad[0]} is out of vocabulary (vocab size {vocab}); "
                              f"give ids in [0, {vocab})", param="prompt")


def as_openai_error(exc: BaseException, param: str) -> BaseException:
    """The engine's refusals as HTTP errors: ValueError 400, a full queue or a dead engine 503."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValueError):
        return OpenAIError(str(exc), param=param)
    if isinstance(exc, (QueueFullError, EngineDeadError)):
        return OpenAIError(str(exc), 503)
    return exc


class _Choices:
    """The choices of one completion request as DELTA outputs arrive."""

    def __init__(self, serving: OpenAIServingCompletion, request: CompletionRequest,
                 prompts: list[dict], request_id: str):
        self.serving, self.request, self.prompts = serving, request, prompts
        self.id, self.created = request_id, int(time.time())
        self.n = request.n
        self.num_completion_tokens = 0
        self.text_offsets: dict[int, int] = {}

    def choice_index(self, prompt_index: int, output: CompletionOutput) -> int:
        return prompt_index * self.n + output.index

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=self.num_completion_tokens,
                         total_tokens=prompt_tokens + self.num_completion_tokens)

    def text(self, prompt_index: int, output: CompletionOutput, first: bool) -> str:
        if not (self.request.echo and first):
            return output.text
        prompt = self.prompts[prompt_index]
        echo = prompt["prompt"]
        if echo is None:
            with self.serving.tokenizer_lock:
                echo = self.serving.tokenizer.decode(prompt["prompt_token_ids"])
        return echo + output.text

    def logprobs(self, index: int, output: CompletionOutput) -> CompletionLogProbs | None:
        if self.request.logprobs is None or output.logprobs is None:
            return None
        token_text = self.serving.token_text
        out = CompletionLogProbs()
        offset = self.text_offsets.get(index, 0)
        for token_id, entry in zip(output.token_ids, output.logprobs):
            text = token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(max(entry[token_id].logprob, -9999.0))
            out.top_logprobs.append({token_text(t): max(lp.logprob, -9999.0)
                                     for t, lp in entry.items()})
            out.text_offset.append(offset)
            offset += len(text)
        self.text_offsets[index] = offset
        return out

    async def collect(self, outputs) -> CompletionResponse:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, CompletionLogProbs] = {}
        finish: dict[int, tuple] = {}
        try:
            async for prompt_index, request_output in outputs:
                for output in request_output.outputs:
                    index = self.choice_index(prompt_index, output)
                    texts.setdefault(index, []).append(self.text(prompt_index, output,
                                                                 index not in texts))
                    self.num_completion_tokens += len(output.token_ids)
                    step = self.logprobs(index, output)
                    if step is not None:
                        total = logprobs.setdefault(index, CompletionLogProbs())
                        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                            getattr(total, name).extend(getattr(step, name))
                    if output.finish_reason is not None:
                        finish[index] = (output.finish_reason, output.stop_reason)
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(str(exc), 500 if isinstance(exc, EngineStepError) else 503) from exc
        choices = [CompletionResponseChoice(index=i, text="".join(texts[i]),
                                            logprobs=logprobs.get(i),
                                            finish_reason=finish.get(i, (None, None))[0],
                                            stop_reason=finish.get(i, (None, None))[1])
                   for i in sorted(texts)]
        return CompletionResponse(id=self.id, created=self.created,
                                  model=self.serving.model_name, choices=choices,
                                  usage=self.usage())

    async def stream(self, outputs) -> AsyncIterator[str]:
        started: set[int] = set()
        try:
            async for prompt_index, request_output in outputs:
                for output in request_output.outputs:
                    index = self.choice_index(prompt_index, output)
                    self.num_completion_tokens += len(output.token_ids)
                    text = self.text(prompt_index, output, index not in started)
                    started.add(index)
                    if not text and not output.token_ids and output.finish_reason is None:
                        continue
                    chunk = CompletionStreamResponse(
                        id=self.id, created=self.created, model=self.serving.model_name,
                        choices=[CompletionResponseStreamChoice(
                            index=index, text=text, logprobs=self.logprobs(index, output),
                            finish_reason=output.finish_reason, stop_reason=output.stop_reason)])
                    yield sse(chunk)
        except (EngineStepError, EngineDeadError) as exc:
            yield sse(error_body(str(exc), 500))
            yield SSE_DONE
            return
        finally:
            await outputs.aclose()
        if self.request.stream_options and self.request.stream_options.include_usage:
            yield sse(CompletionStreamResponse(id=self.id, created=self.created,
                                               model=self.serving.model_name, choices=[],
                                               usage=self.usage()))
        yield SSE_DONE
