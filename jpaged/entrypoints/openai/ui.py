"""The chat page of `jpaged serve`: static HTML, CSS and a script shipped in the package (static/),
with no build step and nothing fetched from outside, talking to the server's own API.

    GET /                  the page                      } no API key needed: the page asks for
    GET /ui/chat.js        its script                    } the key and sends it on every API call
    GET /ui/chat.css       its style                     }
    GET /ui/capabilities   what the page should offer (the API key applies, as on /v1/models)

The page streams answers from `/v1/chat/completions`, aborts them by closing the stream (the
server then frees their pages), and reads `/metrics` for its live panel. `jpaged serve
--disable-ui` leaves all four routes out.
NOTE: the page renders every text with `textContent`, never as HTML, and is served with a
Content-Security-Policy that allows only its own script and style and connections to this server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

STATIC = Path(__file__).with_name("static")
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/ui/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
          "/ui/chat.css": ("chat.css", "text/css; charset=utf-8")}
PUBLIC_PATHS = frozenset(ASSETS)         # the guard lets these through without the API key
CAPABILITIES_PATH = "/ui/capabilities"
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def capabilities(served_model_names: list[str], max_model_len: int, *,
                 lora_adapters: Sequence[str] = (), structured_outputs: bool = False,
                 tools: bool = False) -> dict:
    """What the page offers. The adapter choice appears when `lora_adapters` is not empty (the
    request's `model` is then the adapter's name, vLLM's convention), the JSON-schema box when
    `structured_outputs` is set (sent as OpenAI's `response_format` of type `json_schema`);
    `tools` is only shown for now (the server sets it with --enable-auto-tool-choice)."""
    return {"models": [{"id": name, "max_model_len": max_model_len}
                       for name in served_model_names],
            "lora_adapters": [{"id": name} for name in lora_adapters],
            "structured_outputs": structured_outputs, "tools": tools}


def add_ui_routes(app: FastAPI, caps: dict) -> frozenset[str]:
    """Add the page's routes to `app`; returns the paths that need no API key."""
    for path, (name, media_type) in ASSETS.items():
        body = (STATIC / name).read_bytes()
        app.add_api_route(path, _static(body, media_type), methods=["GET"],
                          include_in_schema=False)

    async def ui_capabilities():
        return JSONResponse(caps, headers={"Cache-Control": "no-cache"})

    app.add_api_route(CAPABILITIES_PATH, ui_capabilities, methods=["GET"],
                      include_in_schema=False)
    return PUBLIC_PATHS


def _static(body: bytes, media_type: str):
    async def asset():
        return Response(body, media_type=media_type, headers=_HEADERS)
    return asset
