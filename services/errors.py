"""The service's errors in OpenAI's shape: :class:`ApiError` (what a route raises), the body every
error answers with, and the HTTP answer to each engine error. ``services/app.py`` turns them into
responses; ``services/openapi.py`` documents them per route.
"""

from __future__ import annotations

from lmforge.generation.interface import (
    EngineClosed,
    EngineDied,
    EngineError,
    EngineUnavailable,
    QueueFull,
    RequestTimeout,
)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after


def error_body(
    message: str, *, param: str | None, code: str | None, kind: str = "invalid_request_error"
) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def from_engine(exc: EngineError) -> ApiError:
    """The HTTP answer to an engine error: 503 + Retry-After when full, closing, restarting or
    without an engine (the request can succeed later, or on another replica), 504 on timeout."""
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), code="queue_full", retry_after=exc.retry_after_s)
    if isinstance(exc, EngineClosed):
        return ApiError(503, str(exc), code="shutting_down", retry_after=5)
    if isinstance(exc, EngineDied):
        return ApiError(503, str(exc), code="engine_died", retry_after=5)
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, str(exc), code="unavailable", retry_after=exc.retry_after_s)
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), code="timeout")
    return ApiError(500, str(exc), code="generation_failed")
