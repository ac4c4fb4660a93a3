"""The HTTP app: OpenAI routes, health, metrics and the chat page, thin over the scheduler.

`create_app(config, backend=None)` builds the FastAPI app around whatever decodes (dependency
injection: tests pass a real scheduler over a tiny model; `picochat serve` attaches one once the
checkpoint is loaded, with `attach`). Until a backend is attached `/health` answers 503 and the
generation routes 503 with `Retry-After`.

Before any route runs, `Gate` (plain ASGI) checks the API key on `/v1/*` (401; `/health`, `/metrics`
and the page stay public) and reads the body up to `max_body_bytes` (413 beyond). Every error has
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; invalid input is a 400 naming the
field, never a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .generation import Backend, Server
from .handlers import chat_completions, completions
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, Limits, error_body

log = logging.getLogger("picochat.serve")
UI_DIR = Path(__file__).parent / "ui"


class Gate:
    """ASGI middleware: API key on /v1/*, then the body size limit (the whole body is read here, so a
    chunked upload cannot slip past the limit, and handed on to the app)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith("/v1/") and not self._authorized(scope):
            return await self._error(send, APIError(401, "invalid or missing API key (send 'Authorization: "
                                                         "Bearer <key>')", "authentication_error",
                                                    code="invalid_api_key",
                                                    headers={"WWW-Authenticate": "Bearer"}))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._error(send, self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._error(send, self._too_large(size))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect as the server would report it

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes",
                        code="body_too_large")

    async def _error(self, send, err: APIError) -> None:
        self.metrics.http_errors.labels(str(err.status)).inc()
        payload = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _param(loc: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_text_content(), any]",) or "[" in str(part):
            continue  # pydantic's names of union members and validators are not fields
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind, param = first.get("type", ""), _param(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if param is None and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object", None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if kind == "missing":
        message = "this field is required"
    return (f"{param}: {message}" if param else message), param


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def reply(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        metrics.http_errors.labels(str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return reply(exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return reply(400, error_body(message, "invalid_request_error", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return reply(exc.status_code, error_body(str(exc.detail), kind), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return reply(500, error_body("internal server error", "server_error"))


def create_app(config: ServeConfig | None = None, backend: Backend | None = None) -> FastAPI:
    config = config or ServeConfig()
    server_box: dict = {}

    def stats():
        b = server_box["server"].backend
        return b.scheduler.stats() if b is not None else None

    metrics = ServerMetrics(stats)
    server = Server(metrics, backend, serial=config.serial, retry_after_s=config.retry_after_s)
    server_box["server"] = server
    limits = Limits(max_n=config.max_n, max_tokens=config.max_tokens)
    app = FastAPI(title="picochat", version="1", summary="OpenAI-compatible API and chat page of a picochat model",
                  docs_url="/docs", redoc_url=None)
    app.state.server, app.state.config, app.state.started = server, config, time.time()
    _install_error_handlers(app, metrics)

    @app.get("/health", summary="200 when the model is ready, 503 while it loads")
    async def health():
        if server.backend is None:
            status = "error" if server.load_error else "loading"
            return JSONResponse({"status": status, "detail": server.load_error}, status_code=503,
                                headers={"Retry-After": str(config.retry_after_s)})
        return {"status": "ok", "model": server.backend.name}

    @app.get("/metrics", summary="Prometheus text format")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        data = []
        if server.backend is not None:
            data.append({"id": server.backend.name, "object": "model", "created": int(app.state.started),
                         "owned_by": "picochat", "max_model_len": server.backend.max_context})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await chat_completions(server, limits, body, request)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        return await completions(server, limits, body, request)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
    app.add_middleware(Gate, api_key=config.api_key, max_body_bytes=config.max_body_bytes, metrics=metrics)
    return app


def attach(app: FastAPI, backend: Backend) -> None:
    """The model is loaded: start answering."""
    app.state.server.backend = backend


def failed(app: FastAPI, why: str) -> None:
    """The model could not be loaded: /health says so (503) instead of 'loading' forever."""
    app.state.server.load_error = why
