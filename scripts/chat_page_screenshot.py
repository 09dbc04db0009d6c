"""Screenshot of the chat page mid-conversation with the real model, for the README.

    .venv/bin/python scripts/chat_page_screenshot.py [--out docs/chat_page.png]

Starts `jpaged serve` (SmolLM2-135M-Instruct, float32) on 127.0.0.1 with an API key, opens the
page in headless Chromium through the browser tests' helpers (tests/entrypoints/openai/), types
the key and two messages, and takes the picture while the second answer is still streaming.
Needs what `scripts/setup.sh --test` installs (Debian's chromium, playwright).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "entrypoints" / "openai"))

from browser_utils import chromium, missing  # noqa: E402
from server_utils import RemoteServer  # noqa: E402

KEY = "screenshot-key"


def ask(page, text: str) -> None:
    page.locator("#prompt").press_sequentially(text)
    page.press("#prompt", "Enter")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "chat_page.png"))
    args = parser.parse_args()
    if missing():
        sys.exit(missing())
    log = Path(tempfile.mkdtemp(prefix="jpaged-screenshot-")) / "server.log"
    server = RemoteServer(["--dtype", "float32", "--max-model-len", "1024", "--warmup", "none"],
                          log, api_key=KEY)
    try:
        with chromium() as browser:
            # bypass_csp: Playwright's waits evaluate strings, which the page's CSP forbids
            page = browser.new_page(viewport={"width": 1200, "height": 720}, bypass_csp=True)
            page.set_default_timeout(120_000)
            page.goto(server.url + "/")
            page.fill("#api-key", KEY)
            page.click("#key-submit")
            page.fill("#system", "You are a helpful assistant.")
            page.fill("#temperature", "0")
            # NOTE: the same conversation once before, then "New chat": its step buckets are
            # compiled by then (--warmup full takes minutes on a 2-core CPU), as on a warm server.
            for warm in (True, False):
                ask(page, "What is the capital of France?")
                page.wait_for_selector("#send:not([disabled])")
                ask(page, "Write a short poem about the sea.")
                if warm:
                    page.wait_for_selector("#send:not([disabled])")
                    page.click("#clear")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .content')[1]"
                                   "?.textContent.length > 160")
            page.wait_for_selector("#m-running:text-is('1')")
            page.wait_for_function("Number(document.getElementById('m-tps').textContent) > 0")
            page.screenshot(path=args.out)
            page.click("#stop")
    finally:
        server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
