"""POST /v1/chat/completions: the tokenizer's chat template turns the messages into one prompt
(as `LLM.chat` does), which runs as one engine request with n samples.

A stream sends, per choice, a first chunk with `{"role": "assistant", "content": ""}`, then each
step's new text, then the finish reason; with `stream_options.include_usage` a last chunk with no
choices carries the usage; `data: [DONE]` ends it (OpenAI's and vLLM's order).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from jinja2 import TemplateError

from jpaged.entrypoints.async_engine import EngineDeadError, EngineStepError
from jpaged.entrypoints.openai.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                                ChatCompletionLogProbsContent,
                                                ChatCompletionRequest, ChatCompletionResponse,
                                                ChatCompletionResponseChoice,
                                                ChatCompletionResponseStreamChoice,
                                                ChatCompletionStreamResponse, ChatResponseMessage,
                                                DeltaMessage, UsageInfo, random_id)
from jpaged.entrypoints.openai.serving_completion import OpenAIServingCompletion
from jpaged.entrypoints.openai.serving_engine import (SSE_DONE, EventStream, OpenAIError, error_body,
                                                     merge_async_iterators, sse, top_logprobs_of)
from jpaged.outputs import CompletionOutput

ROLES = ("system", "developer", "user", "assistant", "tool")


class OpenAIServingChat(OpenAIServingCompletion):
    async def create_chat_completion(self, request: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | EventStream:
        self.check_model(request.model)
        self._refuse_unsupported_chat(request)
        prompt = self.render(request)
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = self.sampling_params(
            request, logprobs=request.top_logprobs or 0 if request.logprobs else None,
            max_tokens=self.check_length(len(prompt["prompt_token_ids"]), max_tokens, "messages"))
        request_id = random_id("chatcmpl")
        [(_, stream)] = self.add_requests(request_id, [(prompt, params)])
        outputs = merge_async_iterators(self.engine.outputs(f"{request_id}-0", stream))
        chat = _ChatChoices(self, request, prompt, request_id)
        if request.stream:
            return EventStream(chat.stream(outputs), [f"{request_id}-0"])
        return await chat.collect(outputs)

    @staticmethod
    def _refuse_unsupported_chat(request: ChatCompletionRequest) -> None:
        if request.tools:
            raise OpenAIError("tools are not supported by jpaged; leave them out", param="tools")
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError("when using `top_logprobs`, `logprobs` must be set to true.",
                              param="top_logprobs")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
            raise OpenAIError(f"top_logprobs must be between 0 and 20, got "
                              f"{request.top_logprobs}", param="top_logprobs")
        if request.stream_options is not None and not request.stream:
            raise OpenAIError("Stream options can only be defined when `stream=True`.",
                              param="stream_options")

    def render(self, request: ChatCompletionRequest) -> dict:
        """Messages -> {"prompt": templated text, "prompt_token_ids": its ids}."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise OpenAIError("this model's tokenizer has no chat template; use /v1/completions",
                              param="messages")
        messages = [self._message(i, m) for i, m in enumerate(request.messages)]
        if not messages:
            raise OpenAIError("messages must not be empty: give at least one message",
                              param="messages")
        try:
            with self.tokenizer_lock:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=request.add_generation_prompt,
                    **(request.chat_template_kwargs or {}))
        except (TemplateError, ValueError, TypeError) as exc:
            raise OpenAIError(f"the chat template rejected the messages: {exc}",
                              param="messages") from exc
        return {"prompt": text, "prompt_token_ids": self.encode(text, add_special_tokens=False)}

    @staticmethod
    def _message(i: int, message: dict) -> dict:
        """One message with its content flattened to text (text parts joined by newlines)."""
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise OpenAIError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}",
                              param=f"messages[{i}].role")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise OpenAIError(f"messages[{i}].content[{j}] must be a text part "
                                      f"{{'type': 'text', 'text': ...}}; jpaged serves text "
                                      f"models only", param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "\n".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise OpenAIError(f"messages[{i}].content must be a string or a list of text parts, "
                              f"got {type(content).__name__}", param=f"messages[{i}].content")
        return {"role": role, "content": content}


class _ChatChoices:
    def __init__(self, serving: OpenAIServingChat, request: ChatCompletionRequest, prompt: dict,
                 request_id: str):
        self.serving, self.request = serving, request
        self.num_prompt_tokens = len(prompt["prompt_token_ids"])
        self.id, self.created = request_id, int(time.time())
        self.num_completion_tokens = 0

    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.num_prompt_tokens,
                         completion_tokens=self.num_completion_tokens,
                         total_tokens=self.num_prompt_tokens + self.num_completion_tokens)

    def logprobs(self, output: CompletionOutput) -> list[ChatCompletionLogProbsContent] | None:
        if not self.request.logprobs or output.logprobs is None:
            return None
        text_of = self.serving.token_text
        k = self.request.top_logprobs or 0
        return [ChatCompletionLogProbsContent(
            token=text_of(token_id), logprob=max(entry[token_id].logprob, -9999.0),
            bytes=list(text_of(token_id).encode()),
            top_logprobs=[ChatCompletionLogProb(token=text_of(t), logprob=max(lp, -9999.0),
                                                bytes=list(text_of(t).encode()))
                          for t, lp in top_logprobs_of(entry, k)])
            for token_id, entry in zip(output.token_ids, output.logprobs)]

    async def collect(self, outputs) -> ChatCompletionResponse:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        finish: dict[int, tuple] = {}
        try:
            async for _, request_output in outputs:
                for output in request_output.outputs:
                    texts.setdefault(output.index, []).append(output.text)
                    self.num_completion_tokens += len(output.token_ids)
                    step = self.logprobs(output)
                    if step is not None:
                        logprobs.setdefault(output.index, []).extend(step)
                    if output.finish_reason is not None:
                        finish[output.index] = (output.finish_reason, output.stop_reason)
        except (EngineStepError, EngineDeadError) as exc:
            raise OpenAIError(str(exc), 500 if isinstance(exc, EngineStepError) else 503) from exc
        choices = [ChatCompletionResponseChoice(
            index=i, message=ChatResponseMessage(role="assistant", content="".join(texts[i])),
            logprobs=ChatCompletionLogProbs(content=logprobs[i]) if i in logprobs else None,
            finish_reason=finish.get(i, (None, None))[0], stop_reason=finish.get(i, (None, None))[1])
            for i in sorted(texts)]
        return ChatCompletionResponse(id=self.id, created=self.created,
                                      model=self.serving.model_name, choices=choices,
                                      usage=self.usage())

    def chunk(self, choice: ChatCompletionResponseStreamChoice) -> str:
        return sse(ChatCompletionStreamResponse(id=self.id, created=self.created,
                                                model=self.serving.model_name, choices=[choice]))

    async def stream(self, outputs) -> AsyncIterator[str]:
        try:
            for index in range(self.request.n):
                yield self.chunk(ChatCompletionResponseStreamChoice(
                    index=index, delta=DeltaMessage(role="assistant", content="")))
            async for _, request_output in outputs:
                for output in request_output.outputs:
                    self.num_completion_tokens += len(output.token_ids)
                    if not output.text and not output.token_ids and output.finish_reason is None:
                        continue
                    step = self.logprobs(output)
                    yield self.chunk(ChatCompletionResponseStreamChoice(
                        index=output.index, delta=DeltaMessage(content=output.text),
                        logprobs=None if step is None else ChatCompletionLogProbs(content=step),
                        finish_reason=output.finish_reason, stop_reason=output.stop_reason))
        except (EngineStepError, EngineDeadError) as exc:
            yield sse(error_body(str(exc), 500))
            yield SSE_DONE
            return
        finally:
            await outputs.aclose()
        if self.request.stream_options and self.request.stream_options.include_usage:
            yield sse(ChatCompletionStreamResponse(id=self.id, created=self.created,
                                                   model=self.serving.model_name, choices=[],
                                                   usage=self.usage()))
        yield SSE_DONE
