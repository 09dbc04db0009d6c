"""`jpaged serve` on SmolLM2 as a real subprocess, driven by the official `openai` client and raw
httpx: greedy answers equal offline `LLM.generate` token for token, streams assemble to the same
text, errors come back in OpenAI's shape, cancelled requests free their pages, a failing step fails
only its requests. One server for the whole module (small KV pool, short context)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_utils import RemoteServer

from jpaged import LLM, SamplingParams

API_KEY = "test-key-123"
MODEL = "smol"
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 8
MAX_WAITING = 24
FAIL_MARKER = "KABOOM"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Why is the sky blue?", "Write a haiku about the sea.",
             "How many legs does a spider have?", "Say hello in Spanish."]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "The three laws of robotics are"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = RemoteServer([str(smollm2_path), "--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", str(MAX_MODEL_LEN), "--num-pages", "160",
                        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests",
                        str(MAX_WAITING), "--max-body-bytes", "65536", "--warmup", "none"],
                       tmp_path_factory.mktemp("server") / "server.log", api_key=API_KEY,
                       fail_marker=FAIL_MARKER)
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def offline(smollm2_path):
    """Greedy answers from the offline LLM, the reference every server answer must equal."""
    llm = LLM(str(smollm2_path), dtype="float32", max_model_len=MAX_MODEL_LEN, num_pages=64,
              max_num_seqs=MAX_NUM_SEQS)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    chats = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], greedy, use_tqdm=False)
    texts = llm.generate(PROMPTS, greedy, use_tqdm=False)
    return {"chat": {q: o.outputs[0].text for q, o in zip(QUESTIONS, chats)},
            "text": {p: o.outputs[0].text for p, o in zip(PROMPTS, texts)},
            "chat_ids": {q: o.outputs[0].token_ids for q, o in zip(QUESTIONS, chats)},
            "text_ids": {p: o.outputs[0].token_ids for p, o in zip(PROMPTS, texts)},
            "tokenizer": llm.llm_engine.tokenizer}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                              timeout=120)


def chat(client, question, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}],
        max_tokens=kwargs.pop("max_tokens", MAX_TOKENS), temperature=kwargs.pop("temperature", 0.0),
        **kwargs)


# ---- the OpenAI API through the official client -----------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200           # no key needed


def test_completion_greedy_equals_offline(client, offline):
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                    temperature=0.0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == \
        [offline["text"][p] for p in PROMPTS]
    assert out.usage.completion_tokens == sum(len(offline["text_ids"][p]) for p in PROMPTS)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_logit_bias_moves_the_greedy_choice(client, offline):
    """OpenAI's logit_bias as vLLM applies it: +100 on a token makes greedy pick it every step,
    -100 on the offline answer's first token removes it; log-probs stay the model's own."""
    prompt = PROMPTS[0]
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0.0,
                                       logit_bias={"1000": 100}, logprobs=1)
    assert forced.choices[0].text == offline["tokenizer"].decode([1000] * 3)
    assert max(forced.choices[0].logprobs.token_logprobs) < -1.0      # not the biased logits
    first = offline["text_ids"][prompt][0]
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0,
                                       logit_bias={str(first): -100})
    unbiased = offline["tokenizer"].decode([first])
    assert banned.choices[0].text and banned.choices[0].text != unbiased


def test_chat_greedy_and_stream_equal_offline(client, offline):
    question = QUESTIONS[0]
    full = chat(client, question)
    assert full.choices[0].message.content == offline["chat"][question]
    assert full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == len(offline["chat_ids"][question])
    chunks = list(chat(client, question, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline["chat"][question]
    # the role chunk, then one chunk per sampled token, each sent as soon as it is sampled
    assert len([c for c in chunks if c.choices]) == 1 + len(offline["chat_ids"][question])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens


def test_n_samples_and_seed(client):
    kwargs = dict(n=2, temperature=1.0, seed=1234, max_tokens=MAX_TOKENS)
    a = chat(client, QUESTIONS[1], **kwargs)
    b = chat(client, QUESTIONS[1], **kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 2 * MAX_TOKENS
    assert a.choices[0].message.content != a.choices[1].message.content


def test_stop_string_cuts_the_text(client, offline):
    prompt = PROMPTS[0]
    greedy = offline["text"][prompt]
    stop = greedy.strip().split()[1]                       # the second word of the greedy text
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                    temperature=0.0, stop=[stop])
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == greedy[:greedy.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0.0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_logprobs(client, offline):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                    temperature=0.0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == offline["text"][PROMPTS[0]]
    assert len(lp.tokens) == len(lp.token_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and logprob <= 0.0
        assert top[token] == pytest.approx(max(top.values()))   # greedy picks the top token
    full = chat(client, QUESTIONS[0], logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    if content[-1].token == "<|im_end|>":                  # the EOS token has a logprob, no text
        content.pop()
    assert "".join(c.token for c in content) == full.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob


def test_api_key(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.post(f"{server.url}/v1/completions", json=body,
                      headers=server.headers).status_code == 200


# ---- vLLM's /generate, /metrics ---------------------------------------------------------------------
def test_generate_endpoint(server, offline):
    prompt = PROMPTS[2]
    body = {"prompt": prompt, "n": 1, "temperature": 0.0, "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{server.url}/generate", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json() == {"text": [prompt + offline["text"][prompt]]}
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True},
                      headers=server.headers, timeout=60) as s:
        lines = [json.loads(line) for line in s.iter_lines() if line]
    assert len(lines) == len(offline["text_ids"][prompt])      # one line per step
    assert lines[-1] == r.json()
    assert all(line["text"][0].startswith(prompt) for line in lines)


def test_metrics_count_tokens_and_latency(server, client):
    before = server.metrics()
    out = chat(client, QUESTIONS[3])
    after = server.wait_idle()
    assert after["jpaged:generation_tokens_total"] - before["jpaged:generation_tokens_total"] == \
        out.usage.completion_tokens
    assert after["jpaged:prompt_tokens_total"] - before["jpaged:prompt_tokens_total"] == \
        out.usage.prompt_tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"jpaged:{name}_count"] == before[f"jpaged:{name}_count"] + 1
    assert after["jpaged:inter_token_latency_seconds_count"] > \
        before["jpaged:inter_token_latency_seconds_count"]
    assert after["jpaged:kv_pages_total"] == 159
    # the same prompt again is served by the prefix cache (its 2 full pages of 16)
    chat(client, QUESTIONS[3])
    again = server.wait_idle()
    assert again["jpaged:prefix_cache_hits_total"] >= after["jpaged:prefix_cache_hits_total"] + 2
    assert 0 < again["jpaged:prefix_cache_hit_rate"] <= 1


# ---- failures, cancellation, back-pressure ----------------------------------------------------------
def test_failing_step_fails_only_its_requests(server, client, offline):
    with pytest.raises(openai.InternalServerError, match="injected step failure"):
        chat(client, f"Say {FAIL_MARKER}")
    assert chat(client, QUESTIONS[4]).choices[0].message.content == offline["chat"][QUESTIONS[4]]
    server.wait_idle()
    assert httpx.get(f"{server.url}/health").status_code == 200


async def _cancel_after(aclient, n_chunks: int, max_tokens: int):
    stream = await aclient.completions.create(model=MODEL, prompt=PROMPTS[3], stream=True,
                                              max_tokens=max_tokens, temperature=0.0)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == n_chunks:
            break
    await stream.close()


def test_cancelled_stream_aborts_and_frees_pages(server, aclient):
    before = server.metrics()["jpaged:generation_tokens_total"]
    asyncio.run(_cancel_after(aclient, 2, max_tokens=100))
    server.wait_idle(timeout=5)
    generated = server.metrics()["jpaged:generation_tokens_total"] - before
    assert 2 <= generated < 60            # aborted long before its 100 tokens


def test_full_queue_answers_503(server):
    """A full batch of long requests, then MAX_WAITING more that must wait: the next is refused."""
    async def until(running: int, waiting: int) -> None:
        for _ in range(200):
            m = await asyncio.to_thread(server.metrics)
            if (m["jpaged:num_requests_running"], m["jpaged:num_requests_waiting"]) == \
                    (running, waiting):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never reached {running} running, {waiting} waiting: {m}")

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers,
                                     timeout=120) as http:
            long = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 100,
                    "ignore_eos": True, "temperature": 0.0}
            post = lambda: asyncio.create_task(http.post("/v1/completions", json=long))  # noqa
            tasks = [post() for _ in range(MAX_NUM_SEQS)]
            await until(MAX_NUM_SEQS, 0)
            tasks += [post() for _ in range(MAX_WAITING)]
            await until(MAX_NUM_SEQS, MAX_WAITING)
            extra = await http.post("/v1/completions", json=long)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return extra

    extra = asyncio.run(run())
    assert extra.status_code == 503, extra.text
    assert "waiting queue is full (24 requests waiting" in extra.json()["error"]["message"]
    server.wait_idle(timeout=10)


def test_concurrent_clients_batch_cancel_and_free_every_page(server, aclient, offline):
    """64 requests, 16 at a time, half streamed, every 8th cancelled mid-stream: the rest equal
    the offline greedy answers; afterwards no page is used."""
    async def one(i: int, limit: asyncio.Semaphore):
        async with limit:
            question = QUESTIONS[i % len(QUESTIONS)]
            if i % 8 == 7:
                await _cancel_after(aclient, 2, max_tokens=MAX_TOKENS)
                return None
            messages = [{"role": "user", "content": question}]
            if i % 2:
                stream = await aclient.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,
                    stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream
                                if c.choices])
            else:
                out = await aclient.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0)
                text = out.choices[0].message.content
            return question, text

    async def run():
        limit = asyncio.Semaphore(16)
        return await asyncio.gather(*(one(i, limit) for i in range(64)))

    results = [r for r in asyncio.run(run()) if r is not None]
    assert len(results) == 56
    assert [text for _, text in results] == [offline["chat"][q] for q, _ in results]
    server.wait_idle(timeout=10)


# ---- bad requests -----------------------------------------------------------------------------------
LONG_PROMPT = "word " * 300
BAD_REQUESTS = [
    # (path, body (dict, or raw bytes), status, message fragment, param)
    ("/v1/completions", b'{"model": "smol", "prompt": ', 400, "not valid JSON", "body"),
    ("/v1/completions", b"[1, 2, 3]", 400, "must be a JSON object", "body"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt: Field required", "prompt"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "valid number", "temperature"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature must be >= 0",
     "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens must be at least 1",
     "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n must be an integer >= 1", "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 20000}, 400, "n must be at most 16384", "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs must be between 0 and 20",
     "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 3}, 400,
     "presence_penalty must be in [-2, 2]", "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**70}, 400, "less than or equal", "seed"),
    ("/v1/completions", {"prompt": "Hi", "stop": 5}, 400, "stop", "stop.str"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, 400, "valid boolean", "stream"),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 9, "max_tokens": 4}, 400,
     "min_tokens (9) must be <= max_tokens (4)", "min_tokens"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"99999999": 5}}, 400,
     "token ids must be in [0, ", "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"one": 5}}, 400, "not a token id",
     "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400,
     "only be defined when `stream=True`", "stream_options"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "The model `gpt-4` does not exist",
     "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt must not be an empty string", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt must not be empty", "prompt"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "maximum context length is 128 tokens",
     "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1000}, 400, "'max_tokens' is too large",
     "max_tokens"),
    ("/v1/completions", {"prompt": [5, 999999]}, 400, "Token id 999999 is out of vocabulary",
     "prompt"),
    ("/v1/completions", {"prompt": "x" * 70000}, 413, "larger than this server's limit", "body"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must not be empty", "messages"),
    ("/v1/chat/completions", {"messages": "Hi"}, 400, "valid list", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "messages[0].role must be one of", "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400,
     "messages[0].content must be a string", "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
     400, "`logprobs` must be set to true", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "frequency_penalty": -3}, 400, "frequency_penalty must be in [-2, 2]",
     "frequency_penalty"),
    ("/generate", {"n": 1}, 400, "prompt must be a non-empty string", "prompt"),
    ("/generate", {"prompt": "Hi", "bogus": 1}, 400, "unknown sampling parameter(s) ['bogus']",
     "bogus"),
    ("/generate", {"prompt": "Hi", "temperature": -1}, 400, "temperature must be >= 0",
     "temperature"),
    ("/v1/nothing-here", {}, 404, "Not Found", None),
]


def test_bad_requests_get_openai_errors_and_leave_no_trace(server, client, offline):
    for path, body, status, fragment, param in BAD_REQUESTS:
        kwargs = {"content": body, "headers": {**server.headers, "Content-Type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body, "headers": server.headers}
        r = httpx.post(f"{server.url}{path}", timeout=60, **kwargs)
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert fragment in error["message"], (body, error)
        assert error["param"] == param and error["code"] == status, (body, error)
        assert set(error) == {"message", "type", "param", "code"}
    r = httpx.get(f"{server.url}/v1/completions", headers=server.headers)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    assert chat(client, QUESTIONS[5]).choices[0].message.content == offline["chat"][QUESTIONS[5]]
    server.wait_idle()
