"""POST /v1/completions: one engine request per prompt (a list of prompts is a batch), each with n
samples (split into several engine requests past max_num_seqs); choice index = prompt index * n +
sample index (vLLM's numbering). The whole batch is admitted, or refused, as one request.

Requests run with DELTA outputs: a stream sends each step's new text as one chunk per choice; the
non-streamed answer is the same deltas joined. `echo` puts the prompt before each choice's text
(with `logprobs`, its tokens' log-probs first, the first one None: vLLM's shape); `echo` with
`max_tokens: 0` returns the prompt alone (lm-eval's log-likelihood request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator

from jpaged.entrypoints.async_engine import EngineDeadError, EngineStepError
from jpaged.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest,
                                                CompletionResponse, CompletionResponseChoice,
                                                CompletionResponseStreamChoice,
                                                CompletionStreamResponse, PromptLogprob,
                                                UsageInfo, random_id)
from jpaged.entrypoints.openai.serving_engine import (SSE_DONE, EventStream, OpenAIError,
                                                     OpenAIServing, as_openai_error, error_body,
                                                     make_sampling_params,
                                                     merge_async_iterators, sse)
from jpaged.outputs import CompletionOutput
from jpaged.sampling_params import RequestOutputKind


@dataclasses.dataclass
class _Part:
    """One engine request of a completion: its prompt and the samples it makes."""
    prompt_index: int
    first_sample: int
    prompt: dict


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest
                                ) -> CompletionResponse | EventStream:
        self.check_request(request)
        self._refuse_unsupported(request)
        prompts = await self._prompts(request.prompt, request.add_special_tokens)
        echo_only = request.echo and request.max_tokens == 0
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo and request.logprobs is not None:
            prompt_logprobs = request.logprobs          # vLLM's: echo brings the prompt's too
        parts, engine_requests = [], []
        for i, prompt in enumerate(prompts):
            max_tokens = self.check_length(len(prompt["prompt_token_ids"]),
                                           1 if echo_only else request.max_tokens, "prompt")
            params = self.sampling_params(request, logprobs=request.logprobs,
                                          prompt_logprobs=prompt_logprobs, max_tokens=max_tokens)
            for first, part_params in self.split_samples(params):
                parts.append(_Part(i, first, prompt))
                engine_requests.append((prompt, part_params))
        base_id = random_id("cmpl")
        added = self.add_requests(base_id, engine_requests, self.lora_request(request.model))
        iterators = [self.engine.outputs(request_id, stream) for request_id, stream in added]
        state = _Choices(self, request, prompts, parts, base_id, echo_only)
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
        if fields.get("structured_outputs") is not None:     # vLLM's dict, compiled up front
            fields["structured_outputs"] = self.compiled_structured_outputs(
                fields["structured_outputs"])
        [token_ids] = await self.encode([prompt])
        engine_prompt = {"prompt": prompt, "prompt_token_ids": token_ids}
        params = make_sampling_params(**fields, output_kind=RequestOutputKind.DELTA)
        params.max_tokens = self.check_length(len(token_ids), params.max_tokens, "prompt")
        parts = self.split_samples(params)
        added = self.add_requests(random_id("generate"), [(engine_prompt, p) for _, p in parts])
        outputs = merge_async_iterators(*(self.engine.outputs(request_id, handle)
                                          for request_id, handle in added))
        texts = [""] * params.n

        async def updates() -> AsyncIterator[None]:
            async with contextlib.aclosing(outputs):
                async for k, request_output in outputs:
                    for output in request_output.outputs:
                        texts[parts[k][0] + output.index] += output.text
                    yield

        async def lines() -> AsyncIterator[str]:
            try:
                async for _ in updates():
                    yield json.dumps({"text": [prompt + t for t in texts]}) + "\n"
            except (EngineStepError, EngineDeadError) as exc:
                error = engine_error(exc)
                yield error_body(error.message, error.status).model_dump_json() + "\n"

        if stream:
            return EventStream(lines(), [request_id for request_id, _ in added],
                               media_type="application/x-ndjson")
        try:
            async for _ in updates():
                pass
        except (EngineStepError, EngineDeadError) as exc:
            raise engine_error(exc) from exc
        return {"text": [prompt + t for t in texts]}

    def add_requests(self, base_id: str, prompts_and_params, lora_request=None) -> list:
        """[(request_id, stream)]: every engine request of one client request, admitted as one, or
        none (AsyncEngine.add_requests); all with `lora_request`'s adapter, if one."""
        requests = [(f"{base_id}-{i}", prompt, params, lora_request)
                    for i, (prompt, params) in enumerate(prompts_and_params)]
        try:
            streams = self.engine.add_requests(requests)
        except BaseException as exc:
            raise as_openai_error(exc, "prompt") from exc
        return [(request_id, stream) for (request_id, *_), stream in zip(requests, streams)]

    @staticmethod
    def _refuse_unsupported(request: CompletionRequest) -> None:
        if request.suffix is not None:
            raise OpenAIError("suffix is not supported by jpaged; leave it out", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise OpenAIError(f"best_of is not supported by jpaged (got {request.best_of}); leave "
                              f"it out or set it equal to n", param="best_of")

    async def _prompts(self, prompt, add_special_tokens: bool = True) -> list[dict]:
        """The request's prompt(s) as engine prompts {"prompt", "prompt_token_ids"}."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("prompt must not be empty: give a string, a list of strings, a list "
                              "of token ids or a list of such lists", param="prompt")
        texts = [p for p in prompt if isinstance(p, str)]
        if any(not p for p in prompt):
            raise OpenAIError("prompt must not be an empty string" if "" in texts else
                              "prompt must not be an empty list of token ids", param="prompt")
        for p in prompt:
            if not isinstance(p, str):
                self.check_token_ids(p)
        encoded = iter(await self.encode(texts, add_special_tokens=add_special_tokens)
                       if texts else [])
        return [{"prompt": p, "prompt_token_ids": next(encoded)} if isinstance(p, str) else
                {"prompt": None, "prompt_token_ids": list(p)} for p in prompt]

    def check_token_ids(self, token_ids: list[int]) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError(f"Token id {bad[0]} is out of vocabulary (vocab size "
                              f"{self.vocab_size}); give ids in [0, {self.vocab_size})",
                              param="prompt")


def engine_error(exc: BaseException) -> OpenAIError:
    """A request that failed while running: its step failed (500), the engine died (500) or the
    server is stopping (503)."""
    return as_openai_error(exc, None) if isinstance(exc, EngineDeadError) else \
        OpenAIError(str(exc), 500)


class _Choices:
    """The choices of one completion request as DELTA outputs arrive from its engine requests
    (`parts[k]` is engine request k)."""

    def __init__(self, serving: OpenAIServingCompletion, request: CompletionRequest,
                 prompts: list[dict], parts: list[_Part], request_id: str, echo_only: bool):
        self.serving, self.request, self.prompts, self.parts = serving, request, prompts, parts
        self.id, self.created = request_id, int(time.time())
        self.model_name = serving.response_model(request.model)   # an adapter's name (vLLM's)
        self.echo_only = echo_only
        self.num_completion_tokens = 0
        self.text_offsets: dict[int, int] = {}
        self.prompt_logprobs: dict[int, list] = {}      # engine request -> its prompt's

    def choice_index(self, k: int, output: CompletionOutput) -> int:
        part = self.parts[k]
        return part.prompt_index * self.request.n + part.first_sample + output.index

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=self.num_completion_tokens,
                         total_tokens=prompt_tokens + self.num_completion_tokens)

    def delta(self, k: int, output: CompletionOutput, first: bool
              ) -> tuple[str, list[int], list | None]:
        """(text, token ids, their log-prob entries) a choice adds with this output: with echo,
        its first one brings the prompt (and, echo_only, nothing else)."""
        if self.echo_only:
            output = dataclasses.replace(output, text="", token_ids=[], logprobs=[])
        if not (self.request.echo and first):
            return output.text, output.token_ids, output.logprobs
        prompt = self.parts[k].prompt
        text = prompt["prompt"]
        if text is None:
            with self.serving.tokenizer_lock:
                text = self.serving.tokenizer.decode(prompt["prompt_token_ids"])
        logprobs = None
        if self.request.logprobs is not None:
            prompt_lps = self.prompt_logprobs.get(k) or [None] * len(prompt["prompt_token_ids"])
            logprobs = [*prompt_lps, *(output.logprobs or [])]
        return text + output.text, [*prompt["prompt_token_ids"], *output.token_ids], logprobs

    def logprobs(self, index: int, token_ids: list[int], entries: list | None
                 ) -> CompletionLogProbs | None:
        """OpenAI's completion logprobs of these tokens (None entries: the prompt's first)."""
        if self.request.logprobs is None or entries is None:
            return None
        token_text = self.serving.token_text
        out = CompletionLogProbs()
        offset = self.text_offsets.get(index, 0)
        for token_id, entry in zip(token_ids, entries):
            text = token_text(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(None if entry is None else max(entry[token_id].logprob,
                                                                     -9999.0))
            out.top_logprobs.append(None if entry is None else {
                token_text(t): max(lp.logprob, -9999.0) for t, lp in entry.items()})
            out.text_offset.append(offset)
            offset += len(text)
        self.text_offsets[index] = offset
        return out

    def prompt_logprobs_of(self, k: int) -> list | None:
        """vLLM's `prompt_logprobs` of engine request k (None when not asked for)."""
        entries = self.prompt_logprobs.get(k)
        if entries is None:
            return None
        text = self.serving.token_text
        return [None if e is None else {t: PromptLogprob(logprob=max(lp.logprob, -9999.0),
                                                         rank=lp.rank, decoded_token=text(t))
                                        for t, lp in e.items()} for e in entries]

    def _note(self, k: int, request_output) -> None:
        if request_output.prompt_logprobs is not None:
            self.prompt_logprobs[k] = request_output.prompt_logprobs

    async def collect(self, outputs) -> CompletionResponse:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, CompletionLogProbs] = {}
        finish: dict[int, tuple] = {}
        engine_request: dict[int, int] = {}
        try:
            async for k, request_output in outputs:
                self._note(k, request_output)
                for output in request_output.outputs:
                    index = self.choice_index(k, output)
                    first = index not in texts
                    engine_request[index] = k
                    text, token_ids, entries = self.delta(k, output, first)
                    texts.setdefault(index, []).append(text)
                    if not self.echo_only:
                        self.num_completion_tokens += len(output.token_ids)
                    step = self.logprobs(index, token_ids, entries)
                    if step is not None:
                        total = logprobs.setdefault(index, CompletionLogProbs())
                        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                            getattr(total, name).extend(getattr(step, name))
                    if output.finish_reason is not None:
                        finish[index] = (output.finish_reason, output.stop_reason)
        except (EngineStepError, EngineDeadError) as exc:
            raise engine_error(exc) from exc
        choices = [CompletionResponseChoice(
            index=i, text="".join(texts[i]), logprobs=logprobs.get(i),
            finish_reason=finish.get(i, (None, None))[0],
            stop_reason=finish.get(i, (None, None))[1],
            prompt_logprobs=self.prompt_logprobs_of(engine_request[i])) for i in sorted(texts)]
        return CompletionResponse(id=self.id, created=self.created,
                                  model=self.model_name, choices=choices,
                                  usage=self.usage())

    async def stream(self, outputs) -> AsyncIterator[str]:
        started: set[int] = set()
        try:
            async for k, request_output in outputs:
                self._note(k, request_output)
                for output in request_output.outputs:
                    index = self.choice_index(k, output)
                    if not self.echo_only:
                        self.num_completion_tokens += len(output.token_ids)
                    text, token_ids, entries = self.delta(k, output, index not in started)
                    started.add(index)
                    if not text and not token_ids and output.finish_reason is None:
                        continue
                    chunk = CompletionStreamResponse(
                        id=self.id, created=self.created, model=self.model_name,
                        choices=[CompletionResponseStreamChoice(
                            index=index, text=text,
                            logprobs=self.logprobs(index, token_ids, entries),
                            finish_reason=output.finish_reason, stop_reason=output.stop_reason)])
                    yield sse(chunk)
        except (EngineStepError, EngineDeadError) as exc:
            error = engine_error(exc)
            yield sse(error_body(error.message, error.status))
            yield SSE_DONE
            return
        finally:
            await outputs.aclose()
        if self.request.stream_options and self.request.stream_options.include_usage:
            yield sse(CompletionStreamResponse(id=self.id, created=self.created,
                                               model=self.model_name, choices=[],
                                               usage=self.usage()))
        yield SSE_DONE
