"""The FastAPI app every route hangs on: errors in OpenAI's shape, the API-key check, and the
:class:`~services.backend.Backend` (model + engine) the routes reach through ``Depends(backend)``.

No model here: the BentoML service (``services/service.py``) loads one and calls :func:`attach`.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.generation.interface import (
    EngineError,
    Finished,
)
from lmforge.generation.outputs import StreamChunk
from services.errors import ApiError, error_body, from_engine

if TYPE_CHECKING:
    from services.backend import Backend

OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})

app = FastAPI(title="lmforge", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)

_backend: Backend | None = None
_error_hook: Any = None  # called with each error's code (metrics), set by attach


def attach(backend: Backend, on_error: Any = None) -> None:
    """Serve ``backend`` from every route (called once the model is loaded)."""
    global _backend, _error_hook
    _backend, _error_hook = backend, on_error


async def backend() -> Backend:
    """FastAPI dependency: the loaded backend, or 503 while the model is still loading (async: a
    plain ``def`` dependency would cost every request a hop through the thread pool)."""
    if _backend is None:
        raise ApiError(503, "the model is still loading; retry shortly", code="not_ready", retry_after=5)
    return _backend


def stream_error(exc: Exception) -> dict:
    """An error met mid-stream, as the event that ends it."""
    code = exc.kind if isinstance(exc, EngineError) else "generation_failed"
    count_error(code)
    return error_body(str(exc), param=None, code=code, kind="server_error")


def count_error(code: str | None) -> None:
    if _error_hook is not None:
        _error_hook(code or "unknown")


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "body")


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """'temperature: Input should be greater than or equal to 0 (got -1)'; the first field as param."""
    lines, first = [], None
    for err in errors:
        where = _loc(tuple(err.get("loc", ())))
        first = first or where or None
        got = err.get("input")
        shown = (
            f" (got {got!r})" if where and err.get("type") != "missing" and not isinstance(got, dict) else ""
        )
        msg = err.get("msg", "invalid value")
        lines.append(f"{where}: {msg}{shown}" if where else msg)
    return "; ".join(lines), first


def _json_safe(value: Any) -> Any:
    """NaN and infinities (Python's JSON parser accepts them in requests) as strings, so an error
    that quotes them can still be sent as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (a body that cannot be parsed, 404, 405) in OpenAI's shape too."""
    code = "invalid_request" if exc.status_code < 500 else "server_error"
    count_error(code)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(
        error_body(str(exc.detail), param=None, code=code, kind=kind), exc.status_code, headers=exc.headers
    )


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _json_safe(jsonable_encoder(exc.errors()))
    message, param = validation_message(errors)
    count_error("invalid_value")
    return JSONResponse({**error_body(message, param=param, code="invalid_value"), "detail": errors}, 422)


@app.exception_handler(ApiError)
async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    count_error(exc.code)
    return JSONResponse(
        error_body(exc.message, param=exc.param, code=exc.code, kind=kind), exc.status, headers=headers
    )


@app.exception_handler(EngineError)
async def _on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
    return await _on_api_error(request, from_engine(exc))


# The 200 of a streaming route (or of a `stream: true` request) as the OpenAPI document shows it.
EVENT_STREAM = {
    200: {
        "description": "JSON, or with `stream: true` server-sent events (`data: {...}` lines, `data: [DONE]` last)",
        "content": {"text/event-stream": {}},  # events carry JSON in `data:`; no schema for the stream
    }
}


async def event_stream(
    stream: AsyncIterator[list],
    render: Callable[[StreamChunk, int], str | None],
    *,
    first: str | None = None,
    last: Callable[[int], str | None] | None = None,
) -> AsyncIterator[str]:
    """Server-sent events of one engine stream: ``first``, then ``render(chunk, tokens so far)`` per
    chunk (None: nothing to send yet), ``last(tokens)``, an error as a final event, then
    ``data: [DONE]``. Every write through the ASGI stack costs the event loop about as much as a
    token's whole JSON, so events go out in as few writes as the stream allows: each burst of
    chunks in one, ``first`` with the first token, the last tokens with the closing events."""
    count, out = 0, [] if first is None else [first]
    try:
        async for burst in stream:
            done = False
            for chunk in burst:
                if isinstance(chunk, Finished):
                    done = True
                    break
                count += chunk.token_id is not None
                if (text := render(chunk, count)) is not None:
                    out.append(text)
            if done:
                break
            if out:
                yield "".join(out)
                out = []
        if last is not None and (tail := last(count)) is not None:
            out.append(tail)
    except Exception as exc:
        out.append(sse(stream_error(exc)))
    out.append(sse("[DONE]"))
    yield "".join(out)


def sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class ChunkEvents:
    """Server-sent events ``{**head, "choices": [choice], "usage"?}`` with the constant head
    serialized once per stream instead of once per token."""

    def __init__(self, head: dict) -> None:
        self.prefix = "data: " + json.dumps(head)[:-1] + ', "choices": ['

    def __call__(self, choice: dict | None, usage: dict | None = None) -> str:
        body = self.prefix + ("" if choice is None else json.dumps(choice)) + "]"
        if usage is not None:
            body += ', "usage": ' + json.dumps(usage)
        return body + "}\n\n"


# --------------------------------------------------------------------------- the playground page

PLAYGROUND = Path(__file__).resolve().parent / "playground"


def _is_page(path: str) -> bool:
    """The playground's static files carry no data (every number comes from the API, with the key)."""
    return path == "/" or path.startswith("/playground/")


app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")


@app.get("/", include_in_schema=False)
async def _page() -> FileResponse:
    return FileResponse(PLAYGROUND / "index.html")


# --------------------------------------------------------------------------- auth


class ApiKeyMiddleware:
    """Bearer key check when LMFORGE_API_KEY is set (read per request); health probes stay open."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        key = os.environ.get("LMFORGE_API_KEY")
        path = scope.get("path", "")
        if scope["type"] != "http" or not key or path in OPEN_PATHS or _is_page(path):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
            return await self.app(scope, receive, send)
        count_error("invalid_api_key")
        response = JSONResponse(
            error_body(
                "missing or invalid API key (send `Authorization: Bearer <key>`)",
                param=None,
                code="invalid_api_key",
                kind="authentication_error",
            ),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
