"""The OpenAI-compatible HTTP server (`jpaged serve`): FastAPI routes over one AsyncEngine.

    GET  /health                200 once warmed up (503 if the engine loop died); never needs a key
    GET  /v1/models             the served model name(s)
    POST /v1/completions        OpenAI completions (stream: server-sent events)
    POST /v1/chat/completions   OpenAI chat completions through the tokenizer's chat template
    POST /generate              vLLM's simple API: {"prompt", "stream", **sampling} -> {"text": [...]}
    GET  /metrics               Prometheus text (see metrics.py)
    GET  /                      the chat page (see ui.py; the page loads without a key, its calls not)

Every refusal is OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`: malformed
JSON, a body that is not an object, text that is not Unicode (a lone surrogate escape), nesting
deeper than 200 levels (400), wrong types, non-finite numbers or out-of-range values (400, naming
the field and the value), ambiguous headers (400: two Authorization or Content-Type headers,
Content-Length with Transfer-Encoding), a JSON endpoint without `Content-Type: application/json`
(415), an unknown model (404), a missing or wrong API key (401), a body over `max_body_bytes`
(413), a full waiting queue or a server shutting down (503 with Retry-After), a failed engine step
or a dead engine (500). No request body or header makes a 5xx.
NOTE: a non-streamed request whose client disconnects is cancelled, and a stream whose client goes
away is cancelled by Starlette; either way the request is aborted and its pages freed at once. A
client that leaves before its body has arrived is logged at info level.
NOTE: JSON only with its media type, so that a web page cannot make a browser post to this
server without a CORS preflight (a form or `fetch` with no-cors sends text/plain or no type).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
from http import HTTPStatus

import pydantic_core
import uvicorn

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jpaged.entrypoints.async_engine import AsyncEngine
from jpaged.entrypoints.openai.metrics import ServerMetrics
from jpaged.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                ModelCard, ModelList)
from jpaged.entrypoints.openai.serving_chat import OpenAIServingChat
from jpaged.entrypoints.openai.serving_engine import EventStream, OpenAIError, error_body
from jpaged.entrypoints.openai.ui import add_ui_routes, capabilities
from jpaged.lora import LoRARequest

logger = logging.getLogger("jpaged")
DEFAULT_MAX_BODY_BYTES = 4 << 20      # jpaged serve --max-body-bytes


class _BodyTooLarge(Exception):
    pass


_JSON_MEDIA_TYPE = re.compile(r"^application/([\w.-]+\+)?json\s*(;.*)?$", re.IGNORECASE)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _error(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.response().model_dump(), status_code=exc.status, headers=exc.headers)


def _ambiguous(headers: list[tuple[bytes, bytes]]) -> OpenAIError | None:
    """Headers two parts of a stack could read differently (request smuggling, a proxy and this
    server disagreeing on the key): refused."""
    names = [name for name, _ in headers]
    for name in (b"authorization", b"content-type", b"content-length", b"transfer-encoding"):
        if names.count(name) > 1:
            return OpenAIError(f"the request has {names.count(name)} {name.decode()} headers; "
                               f"send one", param=name.decode())
    if b"content-length" in names and b"transfer-encoding" in names:
        return OpenAIError("the request has both Content-Length and Transfer-Encoding; send one",
                           param="transfer-encoding")
    return None


def _bearer_token(value: bytes) -> bytes:
    """The credentials of `Authorization: Bearer <token>`; the scheme is case-insensitive
    (RFC 7235)."""
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class _Guard:
    """ASGI middleware: the API key (all paths but /health and the chat page's static files) and
    the body size limit, checked before any route runs; a chunked body is counted as it arrives."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int,
                 public_paths: frozenset[str] = frozenset()):
        self.app = app
        self.public_paths = {"/health", *public_paths}
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = _ambiguous(scope["headers"])
        if problem is not None:
            return await _error(problem)(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in self.public_paths:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(_bearer_token(given), self.api_key):
                reason = "missing" if not given else "wrong"
                response = _error(OpenAIError(
                    f"Unauthorized: the API key is {reason}; send the header "
                    f"'Authorization: Bearer <key>' with the key the server was started with",
                    HTTPStatus.UNAUTHORIZED, "authorization"))
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _error(self._too_large(int(length)))(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise _BodyTooLarge()
            return message

        await self.app(scope, counted_receive, send)

    def _too_large(self, size: int) -> OpenAIError:
        return OpenAIError(f"the request body ({size} bytes) is larger than this server's limit of "
                           f"{self.max_body_bytes} bytes (--max-body-bytes); send a smaller one",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body")


async def _parse(request: Request, model: type[BaseModel] | None):
    """The JSON body as `model` (or a plain dict); every problem is a 4xx naming the field."""
    media_type = request.headers.get("content-type")
    if media_type is None or not _JSON_MEDIA_TYPE.match(media_type):
        raise OpenAIError(f"{request.url.path} takes a JSON body with the header 'Content-Type: "
                          f"application/json', got Content-Type {media_type!r}",
                          HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "content-type")
    data = _load_json(await request.body())
    if not isinstance(data, dict):
        raise OpenAIError(f"the body must be a JSON object, got {type(data).__name__}",
                          param="body")
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(part) for part in err["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        given = "" if err["type"] == "missing" else f", got {err.get('input')!r}"
        raise OpenAIError(f"{field}: {err['msg']}{given}{more}", param=field) from exc


def _load_json(raw: bytes):
    """The parsed body. NOTE: pydantic's parser (jiter) limits nesting to 200 levels and refuses a
    lone UTF-16 surrogate escape ("\\ud800", not a character: Python's json would pass it on to
    the tokenizer, which fails); big or non-finite numbers are checked per field later."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError as exc:
        where = _lone_surrogate(raw) if _SURROGATE_ESCAPE.search(raw) else None
        if where is not None:
            raise OpenAIError(f"{where} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                              f"without its pair), which is not a character; send valid Unicode",
                              param=where) from exc
        raise OpenAIError(f"the body is not valid JSON: {exc}", param="body") from exc


def _lone_surrogate(raw: bytes) -> str | None:
    """The field (dotted path) of the first string holding a lone surrogate, if any."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    todo = [("", data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
            value = list(value)
        if isinstance(value, list):
            todo.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value)
                        if not isinstance(v, str))
            value = [v for v in value if isinstance(v, str)]
            bad = [v for v in value if not _is_unicode(v)]
            if bad:
                return path or "body"
        elif isinstance(value, str) and not _is_unicode(value):
            return path or "body"
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _until_disconnect(request: Request, handler):
    """Run `handler` unless the client disconnects first (then cancel it: its requests abort).
    NOTE: call it only after the body was read, so the listener sees nothing but the disconnect."""
    task = asyncio.ensure_future(handler)

    async def listen():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(listen())
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if task not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return Response(status_code=499)
    return task.result()


def _abort_all(engine: AsyncEngine, request_ids: list[str]) -> None:
    for request_id in request_ids:        # finished ones are ignored
        engine.abort(request_id)


def build_app(engine: AsyncEngine, served_model_names: list[str], *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, metrics: ServerMetrics | None = None,
              lifespan=None, enable_ui: bool = True, lora_modules: dict[str, str] | None = None,
              allow_runtime_lora_updating: bool = False,
              trust_request_chat_template: bool = False, enable_auto_tool_choice: bool = False,
              tool_call_parser: str | None = None) -> "_Guard":
    """The ASGI app to serve: the FastAPI routes (its `.app`) behind the API-key and body-size
    guard; with `enable_ui`, the chat page at `/` (ui.py)."""
    app = FastAPI(title="jpaged", lifespan=lifespan)
    serving = OpenAIServingChat(engine, served_model_names,
                                trust_request_chat_template=trust_request_chat_template,
                                enable_auto_tool_choice=enable_auto_tool_choice,
                                tool_call_parser=tool_call_parser)
    metrics = metrics or ServerMetrics(served_model_names[0])
    app.state.engine, app.state.metrics = engine, metrics
    for name, path in (lora_modules or {}).items():   # read now: a bad adapter stops the start
        _add_lora(serving, engine, name, path)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return _error(exc)

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(_: Request, exc: _BodyTooLarge):
        return _error(OpenAIError(f"the request body is larger than this server's limit of "
                                  f"{max_body_bytes} bytes (--max-body-bytes); send a smaller "
                                  f"one", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body"))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect):
        logger.info("%s %s: the client disconnected before sending its whole body",
                    request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(OpenAIError(f"{request.method} {request.url.path}: {exc.detail}",
                                  exc.status_code))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        logger.exception("unhandled error in a request")
        return _error(OpenAIError(f"internal server error: {type(exc).__name__}: {exc}", 500))

    def respond(result):
        if isinstance(result, Response):                 # the client went away (499)
            return result
        if isinstance(result, EventStream):
            return StreamingResponse(result.body, media_type=result.media_type,
                                     background=BackgroundTask(_abort_all, engine,
                                                               result.request_ids))
        return JSONResponse(result if isinstance(result, dict) else result.model_dump())

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return _error(OpenAIError(f"the engine loop died: {engine.dead!r}", 503))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        base = [ModelCard(id=name, root=name, max_model_len=serving.max_model_len)
                for name in served_model_names]
        adapters = [ModelCard(id=name, root=lora.lora_path, parent=served_model_names[0],
                              max_model_len=serving.max_model_len)
                    for name, lora in list(serving.lora_modules.items())]
        return ModelList(data=base + adapters).model_dump()

    if allow_runtime_lora_updating:
        _add_lora_routes(app, serving, engine, served_model_names)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        return respond(await _until_disconnect(request, serving.create_completion(body)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        return respond(await _until_disconnect(request, serving.create_chat_completion(body)))

    @app.post("/generate")
    async def generate(request: Request):
        body = await _parse(request, None)
        return respond(await _until_disconnect(request, serving.generate(body)))

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    public_paths = add_ui_routes(app, capabilities(
        served_model_names, serving.max_model_len, lora_adapters=list(serving.lora_modules),
        structured_outputs=True, tools=enable_auto_tool_choice)) if enable_ui else frozenset()
    return _Guard(app, api_key, max_body_bytes, public_paths)


def _add_lora(serving, engine: AsyncEngine, name: str, path: str) -> None:
    """Register adapter `name` (read from `path` now) under that model name."""
    if name in serving.served_model_names or name in serving.lora_modules:
        raise OpenAIError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    lora = LoRARequest(name, 1 + max((r.lora_int_id for r in serving.lora_modules.values()),
                                     default=0), path)
    try:
        engine.engine.add_lora(lora)
    except (ValueError, OSError) as exc:
        raise OpenAIError(str(exc), param="lora_path") from exc
    serving.lora_modules[name] = lora


def _add_lora_routes(app: FastAPI, serving, engine: AsyncEngine,
                     served_model_names: list[str]) -> None:
    """vLLM's runtime adapter routes (its VLLM_ALLOW_RUNTIME_LORA_UPDATING; here
    --allow-runtime-lora-updating), behind the API key like every route."""
    async def names(request: Request, *fields: str) -> list[str]:
        body = await _parse(request, None)
        values = [body.get(f) if isinstance(body, dict) else None for f in fields]
        for field, value in zip(fields, values):
            if not isinstance(value, str) or not value:
                raise OpenAIError(f"{field} must be a non-empty string, got {value!r}",
                                  param=field)
        return values

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        name, path = await names(request, "lora_name", "lora_path")
        await asyncio.to_thread(_add_lora, serving, engine, name, path)
        return Response(f"Success: LoRA adapter '{name}' added successfully.",
                        media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        (name,) = await names(request, "lora_name")
        if serving.lora_modules.pop(name, None) is None:
            raise OpenAIError(f"The lora adapter '{name}' cannot be found.",
                              HTTPStatus.NOT_FOUND, "lora_name")
        engine.engine.unload_lora(name)     # freed once no request in flight uses it
        return Response(f"Success: LoRA adapter '{name}' removed successfully.",
                        media_type="text/plain")


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, exiting 0 after a graceful shutdown on SIGINT/SIGTERM.
    NOTE: uvicorn re-raises the captured signal once it has shut down (so the process dies of
    it); a server that shut down as asked should exit 0 instead, so signals are only recorded.
    Shortly before uvicorn's graceful timeout would cancel the requests still in flight,
    `before_cancel` runs (the engine aborts them), so their streams end with an error event and
    `[DONE]` instead of being cut."""

    before_cancel = None

    @contextlib.contextmanager
    def capture_signals(self):
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT,
                                                                            signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None):
        if self.before_cancel is not None:
            delay = max(0.0, (self.config.timeout_graceful_shutdown or 0.0) - 0.5)
            asyncio.get_running_loop().call_later(delay, self.before_cancel)
        await super().shutdown(sockets)
