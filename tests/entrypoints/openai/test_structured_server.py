"""Structured outputs and tool calls (issue #21) through `jpaged serve` on SmolLM2 with the official
`openai` client, at temperature 1.0 so the constraint does the work: response_format json_schema
and json_object, `chat.completions.parse` with a pydantic model, vLLM's `structured_outputs` in
the body, tool_choice "required" and a named function (arguments parse against the schema),
streamed tool-call deltas assembling to the non-streamed call, a schema that cannot compile
answered 400 naming the field while the server keeps serving. The hermes and llama3_json parsers
and the streaming of their calls are checked on text, without the server."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_utils import RemoteServer

from jpaged.entrypoints.openai.tool_calls import (HermesToolParser, Llama3JsonToolParser,
                                                  ToolCallStream)

MODEL = "smol"
CHAT = [{"role": "user", "content": "What is the weather like in Paris? Use the tools."}]
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]


class City(BaseModel):
    name: str = Field(max_length=12)
    country: Literal["FR", "DE", "IT", "ES"]
    population_millions: int = Field(ge=0, le=40)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = RemoteServer([str(smollm2_path), "--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", "448", "--num-pages", "64", "--max-num-seqs", "8",
                        "--max-num-batched-tokens", "256", "--warmup", "none",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                       tmp_path_factory.mktemp("structured") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def create(client, **kwargs):
    kwargs = {"messages": CHAT, "temperature": 1.0, "max_tokens": 120, **kwargs}
    return client.chat.completions.create(model=MODEL, **kwargs)


def test_response_format_json_schema_and_json_object(client):
    out = create(client, seed=1, n=3, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), WEATHER)
    out = create(client, temperature=0.0, response_format={"type": "json_object"},
                 messages=[{"role": "user", "content": "Return a JSON object with the keys name and age of a person."}])
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_parse_with_a_pydantic_model(client):
    out = client.chat.completions.parse(
        model=MODEL, temperature=1.0, max_tokens=120, seed=3, response_format=City,
        messages=[{"role": "user", "content": "Describe a European city as JSON."}])
    city = out.choices[0].message.parsed
    assert isinstance(city, City) and 0 <= city.population_millions <= 40


def test_structured_outputs_in_the_body(client, server):
    out = create(client, seed=4, extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert out.choices[0].message.content in ("sunny", "rainy")
    out = client.completions.create(model=MODEL, prompt="The code is", temperature=1.0,
                                    max_tokens=20, seed=5,
                                    extra_body={"structured_outputs": {"regex": r" [A-Z]{3}-\d{3}"}})
    assert re.fullmatch(r" [A-Z]{3}-\d{3}", out.choices[0].text)
    body = {"prompt": "The answer is", "temperature": 1.0, "seed": 5,
            "structured_outputs": {"choice": [" yes", " no"]}}
    r = httpx.post(f"{server.url}/generate", json=body, timeout=120)
    assert r.json()["text"][0] in ("The answer is yes", "The answer is no")
    r = httpx.post(f"{server.url}/generate", json={**body, "structured_outputs": {"regex": "("}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"


def test_a_schema_that_cannot_compile_is_a_400_naming_the_field(client):
    for body, param in [({"response_format": {"type": "json_schema", "json_schema": {
                            "name": "x", "schema": {"type": "strin"}}}}, "response_format"),
                        ({"extra_body": {"structured_outputs": {"regex": "[a-"}}},
                         "structured_outputs"),
                        ({"extra_body": {"structured_outputs": {"json": {}, "regex": "a"}}},
                         "structured_outputs")]:
        with pytest.raises(openai.BadRequestError) as info:
            create(client, **body)
        assert info.value.body["param"] == param
    assert create(client, seed=6, max_tokens=4).choices[0].message.content   # still serving


def test_tool_choice_required_and_named(client):
    # one call (OpenAI's parallel_tool_calls=false): an open array runs on at temperature 1.0
    out = create(client, seed=7, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = create(client, seed=8, tools=TOOLS, tool_choice=named)
    [call] = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("tool_choice", ["required",
                                         {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_call_deltas_assemble_to_the_same_call(client, tool_choice):
    kwargs = dict(seed=9, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                  logprobs=True)
    whole = create(client, **kwargs).choices[0]
    calls: dict[int, dict] = {}
    finish, logprobs = None, []
    for chunk in create(client, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            logprobs += choice.logprobs.content if choice.logprobs else []
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["id"] = delta.id or call.get("id")
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"] for c in calls.values()) and finish == whole.finish_reason
    # every token's log-prob arrives, also those of text held back until its call was complete
    assert [lp.token for lp in logprobs] == [lp.token for lp in whole.logprobs.content]


def test_auto_tool_choice_answers_and_the_template_gets_the_tools(client, smollm2_path):
    """SmolLM2 rarely writes <tool_call> blocks itself: "auto" must still answer (content or
    parsed calls); the prompt is apply_chat_template(tools=...)'s."""
    out = create(client, seed=10, tools=TOOLS, max_tokens=16)
    message = out.choices[0].message
    assert message.content or message.tool_calls
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    expected = tokenizer.apply_chat_template(CHAT, tools=TOOLS, add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert out.usage.prompt_tokens == len(expected)     # (SmolLM2's template shows no tools)


# ---- the parsers, on text -----------------------------------------------------------------------
def test_hermes_parser_and_its_stream():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    content, calls = HermesToolParser().extract(text)
    assert content == "Let me check. "
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                     {"name": "get_time", "arguments": '{"zone": "CET"}'}]
    stream = ToolCallStream("auto", parser=HermesToolParser())
    sent_content, sent_calls = "", []
    for i in range(0, len(text), 7):
        piece = text[i:i + 7]
        out = stream.feed(piece, finished=i + 7 >= len(text))
        sent_content += out.get("content", "")
        sent_calls += out.get("tool_calls", [])
        assert "<" not in sent_content           # a tag's start is held back
    assert sent_content == content and [c["function"] for c in sent_calls] == calls
    assert [c["index"] for c in sent_calls] == [0, 1]
    assert HermesToolParser().extract("no calls <tool_call>{broken") == \
        ("no calls <tool_call>{broken", [])


def test_llama3_json_parser():
    parser = Llama3JsonToolParser()
    text = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; ' \
           '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    assert parser.extract(text) == (None, [
        {"name": "get_time", "arguments": '{"zone": "UTC"}'},
        {"name": "get_weather", "arguments": '{"city": "Rome"}'}])
    assert parser.extract("Hello there") == ("Hello there", [])
    assert parser.streamable(' {"na') == (0, []) and parser.streamable("Hi") == (2, [])
