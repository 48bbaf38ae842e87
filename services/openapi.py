"""The service's OpenAPI document as valid OpenAPI 3.0, with the error responses the routes really return.

BentoML 1.4 serves ``GET /docs.json`` from ``Service.openapi_spec`` (``_bentoml_sdk/service/factory.py``),
which calls ``generate_spec`` (``_bentoml_sdk/service/openapi.py``): that runs FastAPI's
``get_openapi(title, version, routes)`` on each mounted FastAPI app (not ``app.openapi()``, so FastAPI's
own ``openapi_schema`` / ``app.openapi`` overrides are never seen), copies its paths and components into
a document stamped ``openapi: 3.0.2``, and ``ServiceAppFactory.openapi_spec_view``
(``_bentoml_impl/server/app.py``) returns ``service.openapi_spec.asdict()``. FastAPI and pydantic 2 write
OpenAPI 3.1 / JSON Schema 2020-12 (numeric ``exclusiveMinimum``, ``const``, ``{"type": "null"}`` in
``anyOf``...), so that document is not valid 3.0 and tools such as schemathesis reject it.

* :func:`to_openapi30` converts any OpenAPI document to 3.0 (walks every schema, nothing route-specific).
* :func:`add_error_responses` documents the errors of every route from the table :data:`ERRORS`.
* :class:`OpenAPI30Service` is a ``bentoml.Service`` whose ``openapi_spec`` is the converted document:
  pass it as ``@bentoml.service(..., service_class=OpenAPI30Service)``, or call :func:`install` on the
  decorated service. ``/docs.json`` and the ``apis/openapi.yaml`` of a built Bento then both use it.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import bentoml
import yaml

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
OPENAPI_30 = "3.0.3"
SCHEMAS_REF = "#/components/schemas/"

# --------------------------------------------------------------------------- 3.1 -> 3.0

# Keywords of an OpenAPI 3.0 Schema Object (plus `x-` extensions); anything else is dropped.
SCHEMA_30_KEYS = frozenset(
    {
        "$ref",
        "title",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "uniqueItems",
        "maxProperties",
        "minProperties",
        "required",
        "enum",
        "type",
        "allOf",
        "oneOf",
        "anyOf",
        "not",
        "items",
        "properties",
        "additionalProperties",
        "description",
        "format",
        "default",
        "nullable",
        "discriminator",
        "readOnly",
        "writeOnly",
        "xml",
        "externalDocs",
        "example",
        "deprecated",
    }
)
# Keywords that only describe; a parent's value wins over the lifted alternative's when merging.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "example", "deprecated", "readOnly", "writeOnly", "externalDocs"}
)
# Object keywords whose value is a map from names (paths, status codes, media types...) to objects.
_NAMED_MAPS = frozenset(
    {"paths", "responses", "content", "headers", "links", "encoding", "variables", "securitySchemes"}
)
_COMPONENT_MAPS = frozenset(
    {"responses", "parameters", "examples", "requestBodies", "headers", "securitySchemes", "links"}
)


def _is_null(schema: Any) -> bool:
    """`{"type": "null"}` (or `const: null` / `enum: [null]`), annotations aside."""
    if not isinstance(schema, Mapping):
        return False
    rest = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
    return rest in ({"type": "null"}, {"const": None}, {"enum": [None]}, {"type": "null", "const": None})


_NULL_ONLY = {"nullable": True, "enum": [None]}  # 3.0 for {"type": "null"}


class _Converter:
    def __init__(self, *, strict_nullable: bool = False) -> None:
        self.strict_nullable = strict_nullable
        self.hoisted: dict[str, dict] = {}  # `$defs` found inside schemas -> components.schemas

    # ---- references
    @staticmethod
    def ref(value: Any) -> Any:
        if isinstance(value, str):
            for prefix in ("#/$defs/", "#/definitions/"):
                if value.startswith(prefix):
                    return SCHEMAS_REF + value[len(prefix) :]
        return value

    def hoist(self, defs: Any) -> None:
        for name, sub in (defs or {}).items():
            converted = self.schema(sub)
            if name in self.hoisted and self.hoisted[name] != converted:
                raise ValueError(f"two different `$defs` named {name!r}; cannot hoist both")
            self.hoisted[name] = converted

    # ---- one schema (returns a new dict; the input is not modified)
    def schema(self, schema: Any) -> Any:
        if schema is True:
            return {}
        if schema is False:
            return {"not": {}}
        if not isinstance(schema, Mapping):
            return schema
        s = dict(schema)
        for key in ("$defs", "definitions"):
            self.hoist(s.pop(key, None))
        if s.get("type") == "integer":  # BentoML writes bounds as floats: 2**63 - 1 became 2**63
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(s.get(key), float) and math.isfinite(s[key]):
                    s[key] = max(INT64_MIN, min(INT64_MAX, int(s[key])))

        # 1. null out of `type` lists and `anyOf`/`oneOf`, before the alternatives are converted
        nullable, null_only, lifted = bool(s.get("nullable") is True), False, None
        kind = s.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            nullable = nullable or len(kinds) < len(kind)
            if len(kinds) == 1:
                s["type"] = kinds[0]
            else:
                del s["type"]
                if not kinds:
                    null_only = True
                else:  # several types: one alternative each (type-specific keywords stay on the parent)
                    alts = [{"type": k} for k in kinds]
                    if "anyOf" in s:
                        s["allOf"] = [*s.get("allOf", []), {"anyOf": alts}]
                    else:
                        s["anyOf"] = alts
        elif kind == "null":
            del s["type"]
            nullable = null_only = True
        for key in ("anyOf", "oneOf"):
            alts = s.get(key)
            if not isinstance(alts, list) or not any(_is_null(a) for a in alts):
                continue
            nullable = True
            rest = [a for a in alts if not _is_null(a)]
            if len(rest) > 1:
                s[key] = rest
                continue
            del s[key]
            if not rest:
                null_only = True
            elif lifted is None:
                lifted = rest[0]
            else:  # both anyOf and oneOf had a single non-null alternative
                s["allOf"] = [*s.get("allOf", []), rest[0]]

        # 2. children
        out: dict[str, Any] = {}
        for key, value in s.items():
            if key.startswith("x-"):
                out[key] = value
            elif key in ("properties", "patternProperties") and isinstance(value, Mapping):
                out[key] = {name: self.schema(v) for name, v in value.items()}
            elif key in ("allOf", "anyOf", "oneOf", "prefixItems") and isinstance(value, list):
                out[key] = [self.schema(v) for v in value]
            elif key == "items" and isinstance(value, list):  # draft-4 tuple form
                out["prefixItems"] = [*[self.schema(v) for v in value], *out.get("prefixItems", [])]
            elif key == "items" and value is False:
                pass  # "no items beyond prefixItems": not expressible in 3.0
            elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, Mapping)):
                out[key] = self.schema(value)
            elif key == "$ref":
                out[key] = self.ref(value)
            else:
                out[key] = value
        if lifted is not None:
            alt = self.schema(lifted)
            clash = any(k in out and out[k] != v and k not in _ANNOTATIONS for k, v in alt.items())
            if clash or "$ref" in out:
                out["allOf"] = [*out.get("allOf", []), alt]
            else:
                for k, v in alt.items():
                    out.setdefault(k, v)  # the parent's title/description/default win

        # 3. keyword by keyword
        if "const" in out:
            value = out.pop("const")
            enum = out.get("enum")
            out["enum"] = [value] if not isinstance(enum, list) or value in enum else []
            if not out["enum"]:
                out["not"] = {}  # const and enum disagree: nothing is valid
                del out["enum"]
        for exclusive, inclusive, stricter in (
            ("exclusiveMinimum", "minimum", lambda new, cur: new >= cur),
            ("exclusiveMaximum", "maximum", lambda new, cur: new <= cur),
        ):
            bound = out.get(exclusive)
            if isinstance(bound, bool) or not isinstance(bound, int | float):
                continue
            del out[exclusive]
            current = out.get(inclusive)
            if current is None or stricter(bound, current):
                out[inclusive], out[exclusive] = bound, True
        patterns = out.pop("patternProperties", None)
        if isinstance(patterns, dict) and patterns:
            # 3.0 cannot constrain key names: keep the value schema(s) for the keys no property names,
            # and the patterns themselves as an extension
            values = [v for i, v in enumerate(patterns.values()) if v not in list(patterns.values())[:i]]
            if "additionalProperties" not in out:
                out["additionalProperties"] = values[0] if len(values) == 1 else {"anyOf": values}
            out["x-patternProperties"] = patterns
        examples = out.pop("examples", None)
        if isinstance(examples, list) and examples and "example" not in out:
            out["example"] = examples[0]
        if "prefixItems" in out:
            alts = out.pop("prefixItems")
            extra = out.get("items")
            if isinstance(extra, dict) and extra:
                alts.append(extra)
            unique = [a for i, a in enumerate(alts) if a not in alts[:i]]
            if extra == {} or not unique:
                out["items"] = {}
            else:
                out["items"] = unique[0] if len(unique) == 1 else {"anyOf": unique}
        encoding, media = out.pop("contentEncoding", None), out.pop("contentMediaType", None)
        if out.get("type") == "string" and "format" not in out and (encoding or media):
            out["format"] = "byte" if encoding == "base64" else "binary"
        if out.get("type") == "array" and "items" not in out:
            out["items"] = {}
        if "required" in out and not out["required"]:
            del out["required"]
        if null_only:
            out["enum"] = [None]
        if isinstance(out.get("enum"), list) and None in out["enum"]:
            nullable = True
        if nullable:
            out["nullable"] = True
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]  # 3.0.3: enum must list null for null to be valid
        out = {k: v for k, v in out.items() if k in SCHEMA_30_KEYS or k.startswith("x-")}
        if nullable and self.strict_nullable and "type" not in out and "enum" not in out:
            out = self._null_alternative(out)

        # 4. `$ref` siblings are ignored in 3.0: keep the reference inside allOf
        if "$ref" in out and len(out) > 1:
            ref = {"$ref": out.pop("$ref")}
            out["allOf"] = [ref, *out.get("allOf", [])]
        return out

    @staticmethod
    def _null_alternative(out: dict[str, Any]) -> dict[str, Any]:
        """3.0.3 reads `nullable` only next to `type`: without one, null becomes an explicit alternative."""
        del out["nullable"]
        notes = {k: out.pop(k) for k in list(out) if k in _ANNOTATIONS or k.startswith("x-")}
        if not out:
            return notes  # no constraint at all: null is already valid
        if set(out) == {"anyOf"}:
            alts = out["anyOf"]
        elif set(out) == {"allOf"} and len(out["allOf"]) == 1:
            alts = out["allOf"]
        else:
            alts = [out]
        return {**notes, "anyOf": [*alts, dict(_NULL_ONLY)]}

    # ---- the document
    def document(self, node: Any, *, named: bool = False) -> Any:
        """Walk an OpenAPI object (or, with `named`, a map of them) converting every Schema Object."""
        if isinstance(node, list):
            return [self.document(v) for v in node]
        if not isinstance(node, dict):
            return node
        if named:
            return {k: self.document(v) for k, v in node.items()}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key.startswith("x-") or key in ("example", "examples") or not isinstance(value, dict | list):
                out[key] = value
            elif key == "schema":
                out[key] = self.schema(value)
            elif key == "components" and isinstance(value, dict):
                comps = {}
                for section, entries in value.items():
                    if section == "schemas":
                        comps[section] = {n: self.schema(s) for n, s in entries.items()}
                    elif section in _COMPONENT_MAPS and section != "examples":
                        comps[section] = self.document(entries, named=True)
                    else:
                        comps[section] = entries  # examples (data), pathItems (3.1 only, dropped later)
                out[key] = comps
            elif key == "responses" and isinstance(value, dict):
                out[key] = {str(code): self.document(r) for code, r in value.items()}
            elif key == "callbacks" and isinstance(value, dict):
                out[key] = {n: self.document(cb, named=True) for n, cb in value.items()}
            elif key in _NAMED_MAPS:
                out[key] = self.document(value, named=True)
            else:
                out[key] = self.document(value)
        return out


def convert_schema(schema: Any, *, strict_nullable: bool = False) -> Any:
    """One JSON Schema (2020-12 / OpenAPI 3.1) as an OpenAPI 3.0 Schema Object; `$defs` are dropped."""
    return _Converter(strict_nullable=strict_nullable).schema(schema)


def to_openapi30(doc: Mapping[str, Any], *, strict_nullable: bool = False) -> dict[str, Any]:
    """A copy of the OpenAPI document `doc` (3.0 or 3.1) that is valid OpenAPI 3.0.

    Every Schema Object (components, parameters, headers, request and response bodies, nested) is
    translated: numeric ``exclusiveMinimum``/``exclusiveMaximum`` -> ``minimum``/``maximum`` + ``true``;
    ``const`` -> one-value ``enum``; ``{"type": "null"}`` alternatives and ``type: [x, "null"]`` ->
    ``nullable: true`` (a lone remaining ``$ref`` becomes ``allOf: [{$ref}]``, as 3.0 ignores ``$ref``
    siblings); ``examples`` -> ``example`` (the first); ``prefixItems`` -> ``items``;
    ``patternProperties`` -> ``additionalProperties`` (key patterns kept as ``x-patternProperties``);
    ``$defs`` -> ``components.schemas``; keywords 3.0 does not know are dropped. The 3.1-only document fields
    (``webhooks``, ``jsonSchemaDialect``, ``components.pathItems``, ``info.summary``,
    ``license.identifier``) are dropped, and ``openapi`` becomes 3.0.x.

    ``nullable: true`` next to ``allOf``/``anyOf`` and no ``type`` is the usual 3.0 idiom (schemathesis,
    Swagger UI and code generators read it as "or null"), but OpenAPI 3.0.3 says ``nullable`` only acts
    with a ``type`` beside it, and strict validators (openapi-schema-validator's OAS30Validator,
    openapi-core) then reject null. With `strict_nullable`, such schemas get an explicit null alternative
    instead: ``anyOf: [<schema or $ref>, {"nullable": true, "enum": [null]}]``.
    """
    conv = _Converter(strict_nullable=strict_nullable)
    out = conv.document(copy.deepcopy(dict(doc)))
    if not str(out.get("openapi", "")).startswith("3.0."):
        out["openapi"] = OPENAPI_30
    for key in ("webhooks", "jsonSchemaDialect"):
        out.pop(key, None)
    out.setdefault("paths", {})
    info = out.get("info")
    if isinstance(info, dict):
        info.pop("summary", None)
        if isinstance(info.get("license"), dict):
            info["license"].pop("identifier", None)
    comps = out.get("components")
    if isinstance(comps, dict):
        comps.pop("pathItems", None)
    if conv.hoisted:
        schemas = out.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in conv.hoisted.items():
            if name in schemas and schemas[name] != schema:
                raise ValueError(f"`$defs` {name!r} differs from components.schemas.{name}")
            schemas[name] = schema
    return out


# --------------------------------------------------------------------------- error responses

# Paths that answer without the API key (the service's ApiKeyMiddleware lets them through).
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
API_KEY_ENV = "LMFORGE_API_KEY"

Where = Callable[[str, str], bool]  # (path, method) -> does the operation return this status?


def on_post(path: str, method: str) -> bool:
    return method == "post"


def not_a_probe(path: str, method: str) -> bool:
    return path not in OPEN_PATHS


def on(*routes: str) -> Where:
    """Selects the given operations, written ``"GET /v1/models/{model_id}"``."""
    wanted = {tuple(r.lower().split(" ", 1)) for r in routes}
    return lambda path, method: (method, path.lower()) in wanted


def either(*wheres: Where) -> Where:
    return lambda path, method: any(w(path, method) for w in wheres)


@dataclass(frozen=True)
class ErrorStatus:
    status: int
    description: str
    where: Where = on_post
    headers: tuple[str, ...] = ()  # names in HEADERS
    schema: str | None = "ErrorResponse"  # a name in ERROR_SCHEMAS; None: no body documented


# One entry per documented error (the first entry of a status that selects an operation is used).
ERRORS: tuple[ErrorStatus, ...] = (
    ErrorStatus(
        400,
        "Bad request: the request cannot be served as sent, e.g. the prompt is longer than the "
        "context (`context_length_exceeded`) or streaming was asked for several choices.",
    ),
    ErrorStatus(
        401,
        "Missing or invalid API key (`invalid_api_key`). Only when the server has a key configured "
        "(LMFORGE_API_KEY); send `Authorization: Bearer <key>`.",
        where=not_a_probe,
        headers=("WWW-Authenticate",),
    ),
    ErrorStatus(
        404,
        "Unknown model: `model` names a model this server does not serve (`model_not_found`).",
        where=either(on_post, on("GET /v1/models/{model_id}")),
    ),
    ErrorStatus(
        422,
        "Invalid field: a value is missing, of the wrong type, out of bounds or unknown "
        "(`invalid_value`); `param` names the field, `detail` lists every validation error.",
        schema="ValidationErrorResponse",
    ),
    ErrorStatus(
        413,
        "Too large: the request asks for more than an introspection limit allows (`too_large`); "
        "the message names the limit and its setting.",
        where=either(on("POST /v1/introspect"), on("POST /v1/sampling/distribution")),
    ),
    ErrorStatus(
        403,
        "Comparison is switched off on this server (LMFORGE_COMPARE_MAX_MODELS=0).",
        where=on("POST /v1/compare"),
    ),
    ErrorStatus(
        404,
        "Unknown token id.",
        where=on("GET /v1/tokens/{token_id}/nearest"),
    ),
    ErrorStatus(
        503,
        "Server overloaded (the request queue is full: `queue_full`), not ready (the model is still "
        "loading: `not_ready`), shutting down (`shutting_down`), the engine process died under the "
        "request and is restarting (`engine_died`), or no engine can serve (`unavailable`); retry "
        "after `Retry-After` seconds.",
        headers=("Retry-After",),
    ),
    ErrorStatus(
        504,
        "Timed out: the request waited in the queue or ran in the engine longer than the server allows.",
        schema="ErrorResponseOrTimeout",
    ),
    ErrorStatus(
        503,
        "Not ready: the model is still loading (`not_ready`); retry after `Retry-After` seconds.",
        where=not_a_probe,
        headers=("Retry-After",),
    ),
    ErrorStatus(
        503,
        "Not ready: the model is still loading, or the engine process died and is restarting.",
        where=on("GET /readyz"),
        schema=None,
    ),
    ErrorStatus(
        503,
        "Not live: the engine process could not be restarted; replace this replica.",
        where=on("GET /livez"),
        schema=None,
    ),
)

HEADERS: dict[str, dict[str, Any]] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {
        "description": "The authentication scheme: `Bearer`.",
        "schema": {"type": "string", "example": "Bearer"},
    },
}

_OPENAI_ERROR = {
    "type": "object",
    "title": "OpenAIError",
    "description": "OpenAI's error object.",
    "required": ["message", "type", "param", "code"],
    "properties": {
        "message": {
            "type": "string",
            "example": "temperature: Input should be less than or equal to 10 (got 11.0)",
        },
        "type": {"type": "string", "example": "invalid_request_error"},
        "param": {"type": "string", "nullable": True, "description": "The field at fault, if any."},
        "code": {"type": "string", "nullable": True, "example": "invalid_value"},
    },
}
ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "OpenAIError": _OPENAI_ERROR,
    "ErrorResponse": {
        "type": "object",
        "title": "ErrorResponse",
        "description": 'OpenAI\'s error body: `{"error": {"message", "type", "param", "code"}}`.',
        "required": ["error"],
        "properties": {"error": {"$ref": SCHEMAS_REF + "OpenAIError"}},
    },
    "ValidationErrorResponse": {
        "type": "object",
        "title": "ValidationErrorResponse",
        "description": "OpenAI's error body; request validation errors also list pydantic's errors.",
        "required": ["error"],
        "properties": {
            "error": {"$ref": SCHEMAS_REF + "OpenAIError"},
            "detail": {"type": "array", "items": {"$ref": SCHEMAS_REF + "ValidationError"}},
        },
    },
    "ServerTimeout": {
        "type": "object",
        "title": "ServerTimeout",
        "description": "BentoML's own body when the server's traffic timeout fires.",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "ErrorResponseOrTimeout": {
        "title": "ErrorResponseOrTimeout",
        "anyOf": [{"$ref": SCHEMAS_REF + "ErrorResponse"}, {"$ref": SCHEMAS_REF + "ServerTimeout"}],
    },
}
_VALIDATION_ERROR = {  # FastAPI's, in case the app has no validated route
    "type": "object",
    "title": "ValidationError",
    "required": ["loc", "msg", "type"],
    "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"},
        "type": {"type": "string"},
    },
}
BEARER = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _is_fastapi_default(response: Any) -> bool:
    """FastAPI's automatic 422 (HTTPValidationError), which the service's handler replaces."""
    try:
        return response["content"]["application/json"]["schema"]["$ref"].endswith("/HTTPValidationError")
    except (KeyError, TypeError, AttributeError):
        return False


def add_error_responses(
    doc: dict[str, Any], *, errors: Iterable[ErrorStatus] = ERRORS, auth_required: bool = False
) -> dict[str, Any]:
    """Add (in place, and return) the responses of :data:`ERRORS` to the operations each selects.

    A status an operation already documents is kept, except FastAPI's automatic 422 (whose body the
    service's validation handler replaces): that one becomes the table's 422 wherever it is. With
    `auth_required` (a key is configured), bearer auth becomes a security requirement of every
    operation but the health probes; the ``bearerAuth`` scheme is declared either way.
    """
    errors = tuple(errors)
    comps = doc.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name, schema in {**ERROR_SCHEMAS, "ValidationError": _VALIDATION_ERROR}.items():
        schemas.setdefault(name, copy.deepcopy(schema))
    comps.setdefault("securitySchemes", {}).update(copy.deepcopy(BEARER))
    for path, item in doc.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            responses = op.setdefault("responses", {})
            replaced = {c for c, r in responses.items() if c == "422" and _is_fastapi_default(r)}
            for err in errors:
                code = str(err.status)
                if code in replaced:
                    replaced.discard(code)
                elif code in responses or not err.where(path, method):
                    continue
                response: dict[str, Any] = {"description": err.description}
                if err.schema is not None:
                    schema = {"$ref": SCHEMAS_REF + err.schema}
                    response["content"] = {"application/json": {"schema": schema}}
                if err.headers:
                    response["headers"] = {h: copy.deepcopy(HEADERS[h]) for h in err.headers}
                responses[code] = response
            if auth_required:
                op["security"] = [{"bearerAuth": []}] if not_a_probe(path, method) else []
    return doc


# --------------------------------------------------------------------------- the BentoML hook


def bentoml_document(service: bentoml.Service) -> dict[str, Any]:
    """The document BentoML itself would serve at /docs.json (its ``Service.openapi_spec``)."""
    return bentoml.Service.openapi_spec.fget(service).asdict()


def build_openapi(service: bentoml.Service, *, api_key_env: str | None = API_KEY_ENV) -> dict[str, Any]:
    """What the service publishes: BentoML's document, in OpenAPI 3.0, with the error responses."""
    doc = to_openapi30(bentoml_document(service))
    return add_error_responses(doc, auth_required=bool(api_key_env and os.environ.get(api_key_env)))


class OpenAPIDocument(dict):
    """A finished document that quacks like BentoML's ``OpenAPISpecification`` (``asdict()``, YAML)."""

    def asdict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self))


yaml.add_representer(OpenAPIDocument, lambda dumper, doc: dumper.represent_dict(doc.asdict()))


class OpenAPI30Service(bentoml.Service):
    """A ``bentoml.Service`` that publishes :func:`build_openapi` (``/docs.json``, ``apis/openapi.yaml``).

    Use ``@bentoml.service(..., service_class=OpenAPI30Service)``, or :func:`install`.
    """

    __slots__ = ()  # BentoML's Service is a slotted attrs class; no new fields, so install() can swap

    @property
    def openapi_spec(self) -> OpenAPIDocument:  # type: ignore[override]
        return OpenAPIDocument(build_openapi(self))


def install(service: bentoml.Service) -> bentoml.Service:
    """Make an already decorated service publish the converted document (in place; returns it).

    Same effect as ``service_class=OpenAPI30Service``: only ``openapi_spec`` changes.
    """
    if isinstance(service, OpenAPI30Service):
        return service
    if type(service) is not bentoml.Service:
        raise TypeError(
            f"install() takes a @bentoml.service object, not {type(service).__name__}; "
            "for a custom Service class, subclass OpenAPI30Service instead"
        )
    service.__class__ = OpenAPI30Service
    return service
