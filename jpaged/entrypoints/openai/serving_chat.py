"""POST /v1/chat/completions: the chat template turns the messages into one prompt (as
`LLM.chat` does, rendered by chat_template.py off the event loop and within the context's size),
which runs as one engine request with n samples (several past max_num_seqs).

The template is the tokenizer's; a request's own (`chat_template`, or in `chat_template_kwargs`)
only with `--trust-request-chat-template` (vLLM's flag). `add_generation_prompt`,
`continue_final_message`, `documents` and `tools` reach the template as in vLLM; when a request
sets one only inside `chat_template_kwargs`, that value is used. Tools are shown to the model
with `tool_choice: "none"`; a named function and "required" constrain the answer to the tools'
schemas and "auto" (with `--enable-auto-tool-choice --tool-call-parser NAME`) parses calls out of
free text; the calls come back as OpenAI `tool_calls`, streamed as deltas (tool_calls.py).

A stream sends, per choice, a first chunk with `{"role": "assistant", "content": ""}`, then each
step's new text, then the finish reason; with `stream_options.include_usage` a last chunk with no
choices carries the usage; `data: [DONE]` ends it (OpenAI's and vLLM's order).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from jinja2 import TemplateError

from jpaged.entrypoints.async_engine import EngineDeadError, EngineStepError
from jpaged.entrypoints.openai.chat_template import ChatTemplateRenderer, TemplateLimitError
from jpaged.entrypoints.openai.protocol import (ChatCompletionLogProb, ChatCompletionLogProbs,
                                                ChatCompletionLogProbsContent,
                                                ChatCompletionRequest, ChatCompletionResponse,
                                                ChatCompletionResponseChoice,
                                                ChatCompletionResponseStreamChoice,
                                                ChatCompletionStreamResponse, ChatResponseMessage,
                                                DeltaMessage, PromptLogprob, ToolCall, UsageInfo,
                                                random_id)
from jpaged.entrypoints.openai.serving_completion import OpenAIServingCompletion, engine_error
from jpaged.entrypoints.openai.serving_engine import (SSE_DONE, EventStream, OpenAIError, error_body,
                                                     merge_async_iterators, sse, top_logprobs_of)
from jpaged.entrypoints.openai.tool_calls import (ToolCallStream, make_parser, parse_required,
                                                  tool_choice_constraint)
from jpaged.outputs import CompletionOutput

ROLES = ("system", "developer", "user", "assistant", "tool")
_TOOL_CHOICE_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


class OpenAIServingChat(OpenAIServingCompletion):
    def __init__(self, engine, served_model_names: list[str], *,
                 trust_request_chat_template: bool = False, enable_auto_tool_choice: bool = False,
                 tool_call_parser: str | None = None):
        super().__init__(engine, served_model_names)
        self.trust_request_chat_template = trust_request_chat_template
        if enable_auto_tool_choice and tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (hermes or "
                             "llama3_json)")
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.tool_parser = make_parser(tool_call_parser) if tool_call_parser else None
        self.templates = None if self.tokenizer is None else \
            ChatTemplateRenderer(self.tokenizer, max_chars=self.max_prompt_chars)

    async def create_chat_completion(self, request: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | EventStream:
        self.check_request(request)
        self._refuse_unsupported_chat(request)
        tool_choice = self._check_tools(request)
        prompt, messages, add_generation_prompt = await self.render(request)
        max_tokens, param = (request.max_completion_tokens, "max_completion_tokens") \
            if request.max_completion_tokens is not None else (request.max_tokens, "max_tokens")
        if max_tokens is not None and max_tokens < 1:
            raise OpenAIError(f"{param} must be at least 1, got {max_tokens}.", param=param)
        params = self.sampling_params(
            request, logprobs=request.top_logprobs or 0 if request.logprobs else None,
            prompt_logprobs=request.prompt_logprobs,
            max_tokens=self.check_length(len(prompt["prompt_token_ids"]), max_tokens, "messages",
                                         param),
            tool_constraint=tool_choice_constraint(
                request.tools, tool_choice,
                (request.model_extra or {}).get("parallel_tool_calls") is not False))
        parts = self.split_samples(params)
        request_id = random_id("chatcmpl")
        added = self.add_requests(request_id, [(prompt, part) for _, part in parts],
                                  self.lora_request(request.model))
        outputs = merge_async_iterators(*(self.engine.outputs(rid, stream)
                                          for rid, stream in added))
        # vLLM's: the answer's role is the assistant's, or without a generation prompt the last
        # message's; `echo` starts the answer with the last message's text if it has that role
        role = "assistant" if add_generation_prompt else messages[-1]["role"]
        echo = messages[-1]["content"] if request.echo and messages[-1]["role"] == role else ""
        chat = _ChatChoices(self, request, prompt, request_id, [first for first, _ in parts],
                            role, echo, self._tool_mode(request, tool_choice))
        if request.stream:
            return EventStream(chat.stream(outputs), [rid for rid, _ in added])
        return await chat.collect(outputs)

    @staticmethod
    def _refuse_unsupported_chat(request: ChatCompletionRequest) -> None:
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError("when using `top_logprobs`, `logprobs` must be set to true.",
                              param="top_logprobs")
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
            raise OpenAIError(f"top_logprobs must be between 0 and 20, got "
                              f"{request.top_logprobs}", param="top_logprobs")

    def _tool_mode(self, request: ChatCompletionRequest, choice) -> dict | None:
        """How the answer's tool calls are found (ToolCallStream's arguments), or None."""
        if isinstance(choice, dict):
            return {"mode": "named", "name": choice["function"]["name"]}
        if choice == "required":
            return {"mode": "required"}
        if choice == "auto" and request.tools:
            return {"mode": "auto", "parser": self.tool_parser}
        return None

    def _check_tools(self, request: ChatCompletionRequest):
        """vLLM's checks of `tools` and `tool_choice`; returns the effective choice. "auto" needs
        --enable-auto-tool-choice and a --tool-call-parser (vLLM's refusal otherwise); a named
        function and "required" are enforced by structured outputs, parser or not."""
        tools = request.tools
        if tools == []:
            raise OpenAIError("`tools` must not be an empty array. Either provide at least one "
                              "tool or omit the field entirely.", param="tools")
        choice = request.tool_choice if "tool_choice" in request.model_fields_set else \
            ("auto" if tools else "none")
        if choice in ("none", None):
            return "none"
        if tools is None:
            raise OpenAIError("When using `tool_choice`, `tools` must be set.",
                              param="tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            if not isinstance(function, dict):
                raise OpenAIError(f"Invalid value for `function`: `{function}` in `tool_choice`! "
                                  f"{_TOOL_CHOICE_USAGE}", param="tool_choice.function")
            name = function.get("name")
            if not isinstance(name, str) or not name:
                raise OpenAIError(f"Invalid `name` in `function`: `{name}` in `tool_choice`! "
                                  f"{_TOOL_CHOICE_USAGE}", param="tool_choice.function.name")
            if all(tool.function.name != name for tool in tools):
                raise OpenAIError("The tool specified in `tool_choice` does not match any of the "
                                  "specified `tools`", param="tool_choice")
            return choice
        if choice not in ("auto", "required"):
            raise OpenAIError(f'Invalid value for `tool_choice`: {choice}! Only named tools, '
                              f'"none", "auto" or "required" are supported.', param="tool_choice")
        if choice == "auto" and not (self.enable_auto_tool_choice and self.tool_parser):
            raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and '
                              '--tool-call-parser to be set (or send tool_choice "required", a '
                              'named function, or "none")', param="tool_choice")
        return choice

    async def render(self, request: ChatCompletionRequest) -> tuple[dict, list[dict], bool]:
        """({"prompt": templated text, "prompt_token_ids": its ids}, the messages as rendered,
        add_generation_prompt as used)."""
        kwargs = dict(request.chat_template_kwargs or {})
        source = request.chat_template if request.chat_template is not None else \
            kwargs.pop("chat_template", None)
        kwargs.pop("chat_template", None)
        if source is not None and not self.trust_request_chat_template:
            raise OpenAIError("Chat template is passed with request, but "
                              "--trust-request-chat-template is not set. Refused request with "
                              "untrusted chat template.", param="chat_template")
        if "tokenize" in kwargs:
            raise OpenAIError("Found unexpected chat template kwargs from request: {'tokenize'}",
                              param="chat_template_kwargs")
        if self.templates is not None and source is None:
            source = self.templates.default_template(with_tools=bool(request.tools))
        if not source:
            raise OpenAIError("this model's tokenizer has no chat template; use /v1/completions",
                              param="messages")
        messages = [self._message(i, m) for i, m in enumerate(request.messages)]
        if not messages:
            raise OpenAIError("messages must not be empty: give at least one message",
                              param="messages")
        options = {name: getattr(request, name) if name in request.model_fields_set or
                   name not in kwargs else kwargs[name]
                   for name in ("add_generation_prompt", "continue_final_message", "documents")}
        if options["add_generation_prompt"] and options["continue_final_message"]:
            raise OpenAIError("Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.", param="continue_final_message")
        if "reasoning_effort" in (request.model_extra or {}):
            kwargs.setdefault("reasoning_effort", request.model_extra["reasoning_effort"])
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] \
            if request.tools else kwargs.get("tools")
        try:
            extra = self.templates.template_kwargs(source, kwargs)
            for name in (*options, "tools"):
                extra.pop(name, None)
            text = await self.templates.render(source, messages, tools=tools, **options, **extra)
        except TemplateLimitError as exc:
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} "
                              f"tokens; rendering the messages stopped: {exc}. Please reduce the "
                              f"length of the messages.", param="messages") from exc
        except (TemplateError, ValueError, TypeError, ArithmeticError, LookupError) as exc:
            raise OpenAIError(f"the chat template rejected the messages: "
                              f"{type(exc).__name__}: {exc}", param="messages") from exc
        [ids] = await self.encode([text], add_special_tokens=request.add_special_tokens,
                                  param="messages")
        return ({"prompt": text, "prompt_token_ids": ids}, messages,
                options["add_generation_prompt"])

    @staticmethod
    def _message(i: int, message: dict) -> dict:
        """One message with its content flattened to text (text parts joined by newlines), and
        its tool fields (`name`, `tool_call_id`, `tool_calls`) kept."""
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
        out = {"role": role, "content": content}
        for name, kind in (("name", str), ("tool_call_id", str), ("tool_calls", list)):
            value = message.get(name)
            if value is not None and not isinstance(value, kind):
                raise OpenAIError(f"messages[{i}].{name} must be a {kind.__name__}, got "
                                  f"{type(value).__name__}", param=f"messages[{i}].{name}")
            if value is not None:
                out[name] = value
        return out


class _ChatChoices:
    """The choices of one chat request as DELTA outputs arrive from its engine requests (engine
    request k makes samples firsts[k] ...)."""

    def __init__(self, serving: OpenAIServingChat, request: ChatCompletionRequest, prompt: dict,
                 request_id: str, firsts: list[int], role: str, echo: str,
                 tools: dict | None = None):
        self.serving, self.request, self.firsts = serving, request, firsts
        self.tools = tools                # ToolCallStream's arguments when tool calls are parsed
        self.tool_streams: dict[int, ToolCallStream] = {}
        self.held_logprobs: dict[int, list] = {}   # per choice, of text not sent yet
        self.role, self.echo = role, echo
        self.num_prompt_tokens = len(prompt["prompt_token_ids"])
        self.id, self.created = request_id, int(time.time())
        self.model_name = serving.response_model(request.model)   # an adapter's name (vLLM's)
        self.num_completion_tokens = 0
        self.prompt_logprobs = None

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

    def _note(self, request_output) -> None:
        if request_output.prompt_logprobs is not None and self.prompt_logprobs is None:
            text = self.serving.token_text
            self.prompt_logprobs = [
                None if e is None else {t: PromptLogprob(logprob=max(lp.logprob, -9999.0),
                                                         rank=lp.rank, decoded_token=text(t))
                                        for t, lp in e.items()}
                for e in request_output.prompt_logprobs]

    async def collect(self, outputs) -> ChatCompletionResponse:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        finish: dict[int, tuple] = {}
        try:
            async for k, request_output in outputs:
                self._note(request_output)
                for output in request_output.outputs:
                    index = self.firsts[k] + output.index
                    texts.setdefault(index, [self.echo]).append(output.text)
                    self.num_completion_tokens += len(output.token_ids)
                    step = self.logprobs(output)
                    if step is not None:
                        logprobs.setdefault(index, []).extend(step)
                    if output.finish_reason is not None:
                        finish[index] = (output.finish_reason, output.stop_reason)
        except (EngineStepError, EngineDeadError) as exc:
            raise engine_error(exc) from exc
        choices = []
        for i in sorted(texts):
            reason, stop_reason = finish.get(i, (None, None))
            message, called = self.message("".join(texts[i]))
            choices.append(ChatCompletionResponseChoice(
                index=i, message=message,
                logprobs=ChatCompletionLogProbs(content=logprobs[i]) if i in logprobs else None,
                finish_reason=self.finish_reason(reason, called), stop_reason=stop_reason))
        return ChatCompletionResponse(id=self.id, created=self.created,
                                      model=self.model_name, choices=choices,
                                      usage=self.usage(), prompt_logprobs=self.prompt_logprobs)

    def message(self, text: str) -> tuple[ChatResponseMessage, bool]:
        """The answer as a message with its tool calls (tool_calls.py), and whether it has any."""
        mode = (self.tools or {}).get("mode")
        if mode is None:
            return ChatResponseMessage(role=self.role, content=text), False
        if mode == "named":
            content, calls = "", [{"name": self.tools["name"], "arguments": text}]
        elif mode == "required":
            content, calls = "", parse_required(text)
        else:
            content, calls = self.tools["parser"].extract(text)
        return ChatResponseMessage(role=self.role, content=content,
                                   tool_calls=[ToolCall(function=c) for c in calls]), bool(calls)

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """vLLM's: "tool_calls" when "auto" or "required" called tools and the answer ended."""
        mode = (self.tools or {}).get("mode")
        return "tool_calls" if reason == "stop" and called and mode in ("auto", "required") \
            else reason

    def delta(self, index: int, output: CompletionOutput) -> DeltaMessage | None:
        """This step's delta of choice `index`: its text, or with tool calls what
        ToolCallStream releases (None: nothing to send yet)."""
        if self.tools is None:
            return DeltaMessage(content=output.text)
        stream = self.tool_streams.setdefault(index, ToolCallStream(**self.tools))
        fields = stream.feed(output.text, finished=output.finish_reason is not None)
        if not fields and output.finish_reason is None:
            return None
        return DeltaMessage(content=fields.get("content"), tool_calls=fields.get("tool_calls"))

    def chunk(self, choice: ChatCompletionResponseStreamChoice) -> str:
        return sse(ChatCompletionStreamResponse(id=self.id, created=self.created,
                                                model=self.model_name, choices=[choice]))

    async def stream(self, outputs) -> AsyncIterator[str]:
        try:
            for index in range(self.request.n):
                yield self.chunk(ChatCompletionResponseStreamChoice(
                    index=index, delta=DeltaMessage(role=self.role, content=self.echo)))
            async for k, request_output in outputs:
                for output in request_output.outputs:
                    self.num_completion_tokens += len(output.token_ids)
                    if not output.text and not output.token_ids and output.finish_reason is None:
                        continue
                    index = self.firsts[k] + output.index
                    delta, step = self.delta(index, output), self.logprobs(output)
                    if step is not None:      # a held-back tool call's tokens: sent with it
                        step = self.held_logprobs.pop(index, []) + step
                    if delta is None:
                        if step is not None:
                            self.held_logprobs[index] = step
                        continue
                    called = index in self.tool_streams and self.tool_streams[index].called
                    yield self.chunk(ChatCompletionResponseStreamChoice(
                        index=index, delta=delta,
                        logprobs=None if step is None else ChatCompletionLogProbs(content=step),
                        finish_reason=self.finish_reason(output.finish_reason, called),
                        stop_reason=output.stop_reason))
        except (EngineStepError, EngineDeadError) as exc:
            error = engine_error(exc)
            yield sse(error_body(error.message, error.status))
            yield SSE_DONE
            return
        finally:
            await outputs.aclose()
        if self.request.stream_options and self.request.stream_options.include_usage:
            yield sse(ChatCompletionStreamResponse(id=self.id, created=self.created,
                                                   model=self.model_name, choices=[],
                                                   usage=self.usage()))
        yield SSE_DONE
