"""The service's OpenAPI document: FastAPI's OpenAPI 3.1, with each route's errors declared on the route.

* **Errors where the routes are.** Each route passes ``responses=errors(...)`` with the
  :class:`ErrorDoc` s it can return (the 401 of the API key and the 503 of a model still loading are
  added to every route); the bodies are the pydantic models below, the same OpenAI-shaped bodies
  ``services/app.py`` sends. FastAPI writes them into the document, so the document and the code
  that raises cannot drift apart: a route that gains an error gains it in its decorator.
* **OpenAPI 3.1, not converted.** BentoML 1.4 builds ``GET /docs.json`` itself
  (``Service.openapi_spec`` runs FastAPI's ``get_openapi`` on each mounted app) and stamps it
  ``openapi: 3.0.2``, but the schemas in it are FastAPI's JSON Schema 2020-12, i.e. OpenAPI 3.1
  (numeric ``exclusiveMinimum``, ``{"type": "null"}``, ``const``). :class:`OpenAPIService` publishes
  that document with its true version, 3.1.0, which openapi-spec-validator and schemathesis accept;
  it adds the bearer security scheme and the 503s of BentoML's own probes (``/readyz``, ``/livez``).
  Pass it as ``@bentoml.service(..., service_class=OpenAPIService)`` or call :func:`install`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import bentoml
import yaml
from pydantic import BaseModel, Field

from services.app import OPEN_PATHS  # answered without the API key

OPENAPI_VERSION = "3.1.0"
API_KEY_ENV = "LMFORGE_API_KEY"

# --------------------------------------------------------------------------- error bodies


class OpenAIError(BaseModel):
    """OpenAI's error object."""

    message: str = Field(examples=["temperature: Input should be less than or equal to 10 (got 11.0)"])
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(description="The field at fault, if any.")
    code: str | None = Field(examples=["invalid_value"])


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIError


class FieldError(BaseModel):
    """One of pydantic's validation errors."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(ErrorResponse):
    """OpenAI's error body; request validation errors also list pydantic's errors."""

    detail: list[FieldError] = Field(default_factory=list)


class ServerTimeout(BaseModel):
    """BentoML's own body when the server's traffic timeout fires."""

    error: str


# --------------------------------------------------------------------------- errors, declared per route


@dataclass(frozen=True)
class ErrorDoc:
    """One error a route can answer: its status, what it means, its body and headers."""

    status: int
    description: str
    model: Any = ErrorResponse
    retry_after: bool = False  # sends `Retry-After`
    authenticate: bool = False  # sends `WWW-Authenticate`

    def response(self) -> dict[str, Any]:
        out: dict[str, Any] = {"description": self.description, "model": self.model}
        headers = {}
        if self.retry_after:
            headers["Retry-After"] = {
                "description": "Seconds to wait before retrying.",
                "schema": {"type": "integer", "minimum": 0},
            }
        if self.authenticate:
            headers["WWW-Authenticate"] = {
                "description": "The authentication scheme: `Bearer`.",
                "schema": {"type": "string", "examples": ["Bearer"]},
            }
        if headers:
            out["headers"] = headers
        return out


BAD_REQUEST = ErrorDoc(
    400,
    "Bad request: the request cannot be served as sent, e.g. the body is not JSON, the prompt is "
    "longer than the context (`context_length_exceeded`) or streaming was asked for several choices.",
)
UNAUTHORIZED = ErrorDoc(
    401,
    "Missing or invalid API key (`invalid_api_key`). Only when the server has a key configured "
    "(LMFORGE_API_KEY); send `Authorization: Bearer <key>`.",
    authenticate=True,
)
COMPARE_OFF = ErrorDoc(403, "Comparison is switched off on this server (LMFORGE_COMPARE_MAX_MODELS=0).")
MODEL_NOT_FOUND = ErrorDoc(
    404, "Unknown model: `model` names a model this server does not serve (`model_not_found`)."
)
TOKEN_NOT_FOUND = ErrorDoc(404, "Unknown token id.")
TOO_LARGE = ErrorDoc(
    413,
    "Too large: the request asks for more than an introspection limit allows (`too_large`); the "
    "message names the limit and its setting.",
)
INVALID = ErrorDoc(
    422,
    "Invalid field: a value is missing, of the wrong type, out of bounds or unknown (`invalid_value`); "
    "`param` names the field, `detail` lists every validation error.",
    model=ValidationErrorResponse,
)
GENERATION_FAILED = ErrorDoc(
    500, "Generation failed for this request alone (`generation_failed`); the server serves on."
)
OVERLOADED = ErrorDoc(
    503,
    "Server overloaded (the request queue is full: `queue_full`), not ready (the model is still "
    "loading: `not_ready`), shutting down (`shutting_down`), the engine process died under the "
    "request and is restarting (`engine_died`), or no engine can serve (`unavailable`); retry after "
    "`Retry-After` seconds.",
    retry_after=True,
)
NOT_READY = ErrorDoc(
    503,
    "Not ready: the model is still loading (`not_ready`); retry after `Retry-After` seconds.",
    retry_after=True,
)
TIMEOUT = ErrorDoc(
    504,
    "Timed out: the request waited in the queue or ran in the engine longer than the server allows.",
    model=ErrorResponse | ServerTimeout,
)
# What every generating route can answer.
GENERATION = (BAD_REQUEST, MODEL_NOT_FOUND, INVALID, GENERATION_FAILED, OVERLOADED, TIMEOUT)
EVERY_ROUTE = (UNAUTHORIZED, NOT_READY)  # the API key middleware; a model still loading


def errors(*docs: ErrorDoc) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for a route: ``docs`` plus :data:`EVERY_ROUTE` (the first of a status
    wins). A route that declares 422 replaces FastAPI's automatic one (whose body the service's
    validation handler never sends)."""
    out: dict[int | str, dict[str, Any]] = {}
    for doc in (*docs, *EVERY_ROUTE):
        out.setdefault(doc.status, doc.response())
    return out


# BentoML's own routes (not ours to decorate): their failure statuses, added to its document.
PROBES = {
    "/readyz": "Not ready: the model is still loading, or the engine process died and is restarting.",
    "/livez": "Not live: the engine process could not be restarted; replace this replica.",
}

# --------------------------------------------------------------------------- the BentoML hook


def bentoml_document(service: bentoml.Service) -> dict[str, Any]:
    """The document BentoML itself would serve at /docs.json (its ``Service.openapi_spec``)."""
    return bentoml.Service.openapi_spec.fget(service).asdict()


def build_openapi(service: bentoml.Service, *, api_key_env: str | None = API_KEY_ENV) -> dict[str, Any]:
    """What the service publishes: BentoML's document with its true version (3.1), the probes' 503s
    and the bearer scheme; with a key configured, bearer auth is required by every route but the probes."""
    doc = bentoml_document(service)
    doc["openapi"] = OPENAPI_VERSION
    auth_required = bool(api_key_env and os.environ.get(api_key_env))
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
    }
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            if path in PROBES:
                op["responses"].setdefault("503", {"description": PROBES[path]})
            if auth_required:
                op["security"] = [] if path in OPEN_PATHS else [{"bearerAuth": []}]
    return doc


class OpenAPIDocument(dict):
    """A finished document that quacks like BentoML's ``OpenAPISpecification`` (``asdict()``, YAML)."""

    def asdict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self))


yaml.add_representer(OpenAPIDocument, lambda dumper, doc: dumper.represent_dict(doc.asdict()))


class OpenAPIService(bentoml.Service):
    """A ``bentoml.Service`` that publishes :func:`build_openapi` (``/docs.json``, ``apis/openapi.yaml``).

    Use ``@bentoml.service(..., service_class=OpenAPIService)``, or :func:`install`.
    """

    __slots__ = ()  # BentoML's Service is a slotted attrs class; no new fields, so install() can swap

    @property
    def openapi_spec(self) -> OpenAPIDocument:  # type: ignore[override]
        return OpenAPIDocument(build_openapi(self))


def install(service: bentoml.Service) -> bentoml.Service:
    """Make an already decorated service publish :func:`build_openapi` (in place; returns it).

    Same effect as ``service_class=OpenAPIService``: only ``openapi_spec`` changes.
    """
    if isinstance(service, OpenAPIService):
        return service
    if type(service) is not bentoml.Service:
        raise TypeError(
            f"install() takes a @bentoml.service object, not {type(service).__name__}; "
            "for a custom Service class, subclass OpenAPIService instead"
        )
    service.__class__ = OpenAPIService
    return service
