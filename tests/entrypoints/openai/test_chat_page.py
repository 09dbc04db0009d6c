"""The chat page at `/` of a real `jpaged serve` (SmolLM2, float32, started with an API key), in
headless Chromium driven by Playwright: the key is asked once and sent on every API call, a typed
message streams back in several updates equal to the non-streamed greedy answer of the same
request, the stop button aborts the answer and the server's running requests and used pages go
back to 0, a completion holding HTML markup is shown as text, and the controls follow the server's
capabilities. Skipped with a message where Chromium or Playwright cannot be installed."""

from __future__ import annotations

import json

import httpx
import pytest
from browser_utils import chromium, missing
from server_utils import RemoteServer

API_KEY = "chat-page-key"
MODEL = "smol"
NUM_PAGES = 64                    # page 0 is the null page: 63 usable
MARKUP = "<img src=x onerror=window.pwned=1>"
TIMEOUT_MS = 90_000               # the first answers compile their step buckets (--warmup none)

_MISSING = missing()
needs_browser = pytest.mark.skipif(_MISSING is not None,
                                   reason=f"browser tests skipped: {_MISSING}")


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    srv = RemoteServer([str(smollm2_path), "--served-model-name", MODEL, "--dtype", "float32",
                        "--max-model-len", "256", "--num-pages", str(NUM_PAGES),
                        "--max-num-seqs", "4", "--warmup", "none"],
                       tmp_path_factory.mktemp("chat_page") / "server.log", api_key=API_KEY)
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def new_context(browser):
    """NOTE: the page's Content-Security-Policy is bypassed in the tests, so that a rendering bug
    could not hide behind it (the markup test) and Playwright may evaluate its waits."""
    return browser.new_context(viewport={"width": 1200, "height": 760}, bypass_csp=True)


def open_page(browser, server, key: str | None = API_KEY):
    """A fresh tab on the page; with `key`, typed into the key dialog (which must appear)."""
    page = new_context(browser).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    if key is not None:
        page.wait_for_selector("#key-dialog", state="visible")
        page.fill("#api-key", key)
        page.click("#key-submit")
        page.wait_for_selector("#key-dialog", state="hidden")
        page.wait_for_selector(f"#model option[value={MODEL}]", state="attached")
    return page


def set_controls(page, **values):
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def ask(page, text: str):
    """Type `text`, press Enter and wait for the answer to end; returns the page's request body."""
    with page.expect_request("**/v1/chat/completions") as request:
        page.locator("#prompt").press_sequentially(text)
        page.press("#prompt", "Enter")
    page.wait_for_selector("#send:not([disabled])")
    return request.value


def answer_text(page) -> str:
    return page.locator(".msg.assistant .content").last.text_content()


def non_streamed(server, body: dict) -> str:
    """The same request as the page's, not streamed, straight to the API."""
    body = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers,
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


# ---- the API key -----------------------------------------------------------------------------------
@needs_browser
def test_page_loads_without_the_key_and_its_api_calls_need_it(server, browser):
    for path in ("/", "/ui/chat.js", "/ui/chat.css"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    for path in ("/ui/capabilities", "/metrics", "/v1/models"):
        assert httpx.get(server.url + path).status_code == 401
    caps = httpx.get(server.url + "/ui/capabilities", headers=server.headers).json()
    assert caps == {"models": [{"id": MODEL, "max_model_len": 256}], "lora_adapters": [],
                    "structured_outputs": True, "tools": False}

    page = open_page(browser, server, key=None)
    api_calls = []
    page.on("request", lambda r: r.url.endswith(("/ui/capabilities", "/metrics"))
            and api_calls.append(r.headers.get("authorization")))
    page.wait_for_selector("#key-dialog", state="visible")       # capabilities answered 401
    page.fill("#api-key", "wrong-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:text('the API key is wrong')")
    assert page.is_visible("#key-dialog")
    page.fill("#api-key", API_KEY)
    page.click("#key-submit")
    page.wait_for_selector("#key-dialog", state="hidden")
    page.wait_for_selector("#m-pages:text('0 / 63')")             # the live panel reads /metrics
    assert page.locator("#model option").all_text_contents() == [MODEL]
    assert "Bearer wrong-key" in api_calls and api_calls[-1] == f"Bearer {API_KEY}"
    # only what the server has: no adapter choice (no --lora-modules), the JSON-schema box
    # (structured outputs are always on)
    assert page.is_hidden("#adapter-field") and page.is_visible("#schema-field")
    assert "LoRA adaptersnone" in page.text_content("#server-info")
    page.reload()                                                 # asked once per tab
    page.wait_for_selector(f"#model option[value={MODEL}]", state="attached")
    assert page.is_hidden("#key-dialog")
    page.context.close()


# ---- streaming, stop, safe rendering --------------------------------------------------------------
@needs_browser
def test_streamed_answer_arrives_in_pieces_and_equals_the_greedy_answer(server, browser):
    page = open_page(browser, server)
    set_controls(page, system="You are a concise assistant.", temperature=0, **{
        "top-p": 0.9, "max-tokens": 24, "seed": 7, "stop-strings": "###"})
    page.evaluate("""() => {                 // every text the answer shows, as it changes
        window.seen = [];
        new MutationObserver(() => {
            const el = [...document.querySelectorAll('.msg.assistant .content')].pop();
            if (el && el.textContent !== window.seen.at(-1)) window.seen.push(el.textContent);
        }).observe(document.getElementById('log'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    request = ask(page, "What is the capital of France?")
    body = request.post_data_json
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert body == {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "system", "content": "You are a concise assistant."},
                                 {"role": "user", "content": "What is the capital of France?"}],
                    "temperature": 0, "top_p": 0.9, "max_tokens": 24, "seed": 7, "stop": ["###"]}
    text = answer_text(page)
    seen = [s for s in page.evaluate("window.seen") if s]
    assert text == non_streamed(server, body) and text.strip()
    assert len(seen) >= 3 and seen[-1] == text, seen              # several updates
    assert all(text.startswith(s) for s in seen)                  # each one a prefix of the answer
    assert "tokens/s" in page.text_content(".msg.assistant .meta")
    page.context.close()


@needs_browser
def test_stop_button_aborts_and_the_server_frees_its_pages(server, browser):
    page = open_page(browser, server)
    set_controls(page, temperature=0, **{"max-tokens": 200})
    before = server.metrics()["jpaged:generation_tokens_total"]
    page.locator("#prompt").fill("Write a long story about a dragon who learns to fly.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .content')"
                           "?.textContent.length > 40")
    page.wait_for_selector("#m-running:text-is('1')")             # the panel sees it running
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .meta:text-is('stopped')")
    idle = server.wait_idle(timeout=10)
    assert idle["jpaged:generation_tokens_total"] - before < 200  # aborted, not finished
    page.wait_for_selector("#m-running:text-is('0')", timeout=10_000)
    page.wait_for_selector("#m-pages:text-is('0 / 63')", timeout=10_000)
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    page.context.close()


@needs_browser
def test_markup_in_a_completion_is_shown_as_text(server, browser):
    page = open_page(browser, server)
    set_controls(page, temperature=0, **{"max-tokens": 24})
    request = ask(page, f"Repeat exactly: {MARKUP}")
    text = answer_text(page)
    assert text == non_streamed(server, request.post_data_json)
    assert MARKUP in text                                         # the model did say it
    assert page.locator("#log img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.locator(".msg.user .content").text_content() == f"Repeat exactly: {MARKUP}"
    page.context.close()


# ---- what the page offers follows the server's capabilities ---------------------------------------
@needs_browser
def test_adapter_and_schema_controls_appear_with_the_capabilities(server, browser):
    """The server has no LoRA adapters or structured outputs yet: the capabilities are answered
    here as a server with them would, and the page's request is caught before it leaves."""
    caps = {"models": [{"id": MODEL, "max_model_len": 256}], "lora_adapters": [{"id": "sql-lora"}],
            "structured_outputs": True, "tools": False}
    context = new_context(browser)
    context.add_init_script(f"sessionStorage.setItem('jpaged.apiKey', '{API_KEY}')")
    context.route("**/ui/capabilities", lambda route: route.fulfill(json=caps))
    sent = []
    context.route("**/v1/chat/completions",
                  lambda route: (sent.append(route.request.post_data_json), route.abort()))
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url + "/")
    page.wait_for_selector("#adapter-field", state="visible")
    page.select_option("#adapter", "sql-lora")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    page.fill("#json-schema", json.dumps(schema))
    page.fill("#prompt", "Where is the Eiffel tower?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant.error")
    assert sent[0]["model"] == "sql-lora"
    assert sent[0]["response_format"] == {"type": "json_schema",
                                          "json_schema": {"name": "answer", "schema": schema}}
    assert "sql-lora" in page.text_content("#server-info")
    context.close()


def test_disable_ui_serves_only_the_api(smollm2_path, tmp_path):
    srv = RemoteServer([str(smollm2_path), "--dtype", "float32", "--max-model-len", "64",
                        "--num-pages", "8", "--warmup", "none", "--disable-ui"],
                       tmp_path / "server.log")
    try:
        for path in ("/", "/ui/chat.js", "/ui/capabilities"):
            assert httpx.get(srv.url + path).status_code == 404
        assert httpx.get(srv.url + "/v1/models").status_code == 200
        assert "chat page" not in srv.log_tail()
    finally:
        assert srv.stop() == 0, srv.log_tail()
