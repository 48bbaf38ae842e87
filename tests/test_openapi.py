"""The service's OpenAPI document (services/openapi.py): valid OpenAPI 3.0, every error status listed.

The document is built in-process for the real `services.service:LmforgeService` the way BentoML's
server builds it (`Service.openapi_spec`); one test serves it through BentoML's own server app
(`ServiceAppFactory`, no model loaded) in a subprocess and reads `GET /docs.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator, validate
from pydantic import BaseModel, ConfigDict, Field, ValidationError

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `services/` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from services.openapi import (  # noqa: E402
    ERRORS,
    OPEN_PATHS,
    OpenAPI30Service,
    OpenAPIDocument,
    add_error_responses,
    bentoml_document,
    build_openapi,
    convert_schema,
    install,
    to_openapi30,
)

GENERATION_ROUTES = ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
POST_ERRORS = {"400", "401", "404", "422", "503", "504"}
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def service():
    from services.service import LmforgeService

    return LmforgeService


@pytest.fixture(scope="module")
def doc(service) -> dict:
    return build_openapi(service, api_key_env=None)


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def nodes(value: Any, where: str = "#"):
    """Every dict in `value`, with its JSON pointer."""
    if isinstance(value, dict):
        yield where, value
        for k, v in value.items():
            yield from nodes(v, f"{where}/{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from nodes(v, f"{where}/{i}")


def resolve(doc: dict, ref: str) -> dict:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


# --------------------------------------------------------------------------- the real service


def test_bentoml_alone_publishes_invalid_openapi_30(service):
    """Why this module exists: BentoML stamps FastAPI's 3.1 schemas `openapi: 3.0.2`."""
    raw = bentoml_document(service)
    assert raw["openapi"].startswith("3.0")
    assert list(OpenAPIV30SpecValidator(raw).iter_errors())


def test_document_is_valid_openapi_30(doc):
    assert doc["openapi"].startswith("3.0.")
    validate(doc, cls=OpenAPIV30SpecValidator)


def test_no_openapi_31_construct_is_left(doc):
    for where, node in nodes(doc):
        assert "const" not in node, where
        assert "$defs" not in node and "prefixItems" not in node, where
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), f"{where}: numeric {key}"
        assert node.get("type") != "null" and not isinstance(node.get("type"), list), where
        if "$ref" in node:
            assert set(node) == {"$ref"}, f"{where}: $ref siblings are ignored in 3.0"
    for name, schema in doc["components"]["schemas"].items():
        for where, node in nodes(schema, name):
            assert "examples" not in node or where.endswith("/properties"), where


def test_each_property_keeps_its_meaning(service, doc):
    """Property by property, the 3.1 constructs BentoML published have their 3.0 equivalent."""
    raw, seen = bentoml_document(service)["components"]["schemas"], set()
    for name, model in raw.items():
        for prop, before in model.get("properties", {}).items():
            after = doc["components"]["schemas"][name]["properties"][prop]
            bound = before.get("exclusiveMinimum")
            if isinstance(bound, int | float) and not isinstance(bound, bool):
                seen.add("exclusiveMinimum")
                assert (after["minimum"], after["exclusiveMinimum"]) == (bound, True), (name, prop)
            if "const" in before:
                seen.add("const")
                assert after["enum"] == [before["const"]], (name, prop)
            alts = before.get("anyOf", [])
            rest = [a for a in alts if a != {"type": "null"}]
            if len(rest) == 1 < len(alts):
                seen.add("nullable")
                assert after["nullable"] is True, (name, prop)
                if "$ref" in rest[0]:
                    seen.add("nullable $ref")
                    assert after["allOf"] == rest[0:1] and "$ref" not in after, (name, prop)
                else:
                    assert after.get("type") == rest[0].get("type"), (name, prop)
    assert {"exclusiveMinimum", "nullable"} <= seen  # top_p > 0; the optional fields


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_generation_routes_list_their_errors(doc, path):
    responses = doc["paths"][path]["post"]["responses"]
    assert set(responses) >= POST_ERRORS
    assert "Retry-After" in responses["503"]["headers"]
    assert responses["503"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    for code in ("400", "404", "503"):
        body = responses[code]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorResponse"}
    error = resolve(doc, resolve(doc, "#/components/schemas/ErrorResponse")["properties"]["error"]["$ref"])
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert error["properties"]["param"]["nullable"] and error["properties"]["code"]["nullable"]
    validation = resolve(doc, responses["422"]["content"]["application/json"]["schema"]["$ref"])
    assert validation["properties"]["error"] == {"$ref": "#/components/schemas/OpenAIError"}


def test_every_post_route_lists_the_errors_and_401_spares_the_probes(doc):
    seen = set()
    for path, method, op in operations(doc):
        seen.add(path)
        if method == "post":
            assert set(op["responses"]) >= POST_ERRORS, path
        assert ("401" in op["responses"]) == (path not in OPEN_PATHS), path
        if "422" in op["responses"]:  # FastAPI's default 422 is replaced on every route
            assert "HTTPValidationError" not in json.dumps(op["responses"]["422"]), path
    assert seen >= OPEN_PATHS and set(GENERATION_ROUTES) <= seen
    assert "404" in doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]


def test_open_paths_match_the_api_key_middleware(service):
    import services.app

    assert services.app.OPEN_PATHS == OPEN_PATHS  # 401 is documented exactly where the key is checked


def test_security_is_declared_when_a_key_is_configured(service, monkeypatch):
    monkeypatch.setenv("LMFORGE_API_KEY", "sekret")
    doc = build_openapi(service)
    validate(doc, cls=OpenAPIV30SpecValidator)
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, _, op in operations(doc):
        assert op["security"] == ([] if path in OPEN_PATHS else [{"bearerAuth": []}]), path
    monkeypatch.delenv("LMFORGE_API_KEY")
    assert all("security" not in op for _, _, op in operations(build_openapi(service)))


def test_error_table_is_one_line_per_status():
    table = add_error_responses(
        {"openapi": "3.0.3", "info": {"title": "t", "version": "1"}, "paths": {"/x": {"post": {}}}},
        errors=[*ERRORS, type(ERRORS[0])(429, "Too many requests.")],
    )
    assert {"400", "401", "404", "422", "429", "503", "504"} == set(table["paths"]["/x"]["post"]["responses"])
    validate(table, cls=OpenAPIV30SpecValidator)


def test_served_docs_json_is_the_converted_document(service, doc, monkeypatch):
    """BentoML's server app answers /docs.json with `service.openapi_spec.asdict()`
    (`ServiceAppFactory.openapi_spec_view`); through the hook that is the converted document. The
    real route is checked against a running server in tests/test_service.py (building a second
    server app in this process would register BentoML's Prometheus metrics twice)."""
    import bentoml

    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    before = type(service)
    try:
        install(service)
        assert service.import_string == "services.service:LmforgeService"  # import origin unchanged
        served = service.openapi_spec.asdict()
    finally:
        if before is bentoml.Service:
            service.__class__ = before  # leave the shared service object as the suite found it
    validate(served, cls=OpenAPIV30SpecValidator)
    assert served == doc


def test_install_and_service_class_are_the_same_hook(doc):
    import bentoml

    @bentoml.service(name="probe", service_class=OpenAPI30Service)
    class Probe:
        pass

    assert isinstance(Probe, OpenAPI30Service) and Probe._caller_module == __name__
    validate(Probe.openapi_spec.asdict(), cls=OpenAPIV30SpecValidator)

    @bentoml.service(name="probe2")
    class Probe2:
        pass

    assert install(Probe2) is Probe2 and isinstance(Probe2, OpenAPI30Service)
    assert install(Probe2) is Probe2
    spec = OpenAPIDocument(doc)  # what `bentoml build` writes to apis/openapi.yaml
    assert yaml.safe_load(yaml.dump(spec)) == doc and spec.asdict() == doc
    with pytest.raises(TypeError):
        install(object())


# --------------------------------------------------------------------------- the converter


def test_exclusive_bounds_become_booleans():
    assert convert_schema({"type": "number", "exclusiveMinimum": 0}) == {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
    }
    # an inclusive bound beside it: the stricter one wins
    assert convert_schema({"exclusiveMinimum": 1, "minimum": 0}) == {"minimum": 1, "exclusiveMinimum": True}
    assert convert_schema({"exclusiveMinimum": 1, "minimum": 2}) == {"minimum": 2}
    assert convert_schema({"exclusiveMaximum": 5.5, "maximum": 9}) == {
        "maximum": 5.5,
        "exclusiveMaximum": True,
    }
    assert convert_schema({"maximum": 3, "exclusiveMaximum": True}) == {
        "maximum": 3,
        "exclusiveMaximum": True,
    }


def test_const_becomes_enum():
    assert convert_schema({"const": "text", "type": "string"}) == {"type": "string", "enum": ["text"]}
    assert convert_schema({"const": None}) == {"enum": [None], "nullable": True}


def test_null_alternatives_become_nullable():
    assert convert_schema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "title": "K", "default": None}
    ) == {"type": "integer", "minimum": 0, "title": "K", "default": None, "nullable": True}
    assert convert_schema({"type": ["string", "null"], "maxLength": 3}) == {
        "type": "string",
        "maxLength": 3,
        "nullable": True,
    }
    assert convert_schema({"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}) == {
        "oneOf": [{"type": "string"}, {"type": "integer"}],
        "nullable": True,
    }
    assert convert_schema({"type": "null"}) == {"enum": [None], "nullable": True}
    assert convert_schema({"anyOf": [{"enum": ["a", "b"], "type": "string"}, {"type": "null"}]}) == {
        "enum": ["a", "b", None],
        "type": "string",
        "nullable": True,
    }
    assert convert_schema({"type": ["string", "integer"]}) == {
        "anyOf": [{"type": "string"}, {"type": "integer"}]
    }


def test_nullable_ref_goes_into_allof():
    schema = {
        "anyOf": [{"$ref": "#/$defs/Options"}, {"type": "null"}],
        "description": "stream options",
        "default": None,
    }
    assert convert_schema(schema) == {
        "allOf": [{"$ref": "#/components/schemas/Options"}],
        "description": "stream options",
        "default": None,
        "nullable": True,
    }
    # strict 3.0.3 reading: an explicit null alternative instead
    strict = convert_schema(schema, strict_nullable=True)
    assert strict == {
        "description": "stream options",
        "default": None,
        "anyOf": [{"$ref": "#/components/schemas/Options"}, {"nullable": True, "enum": [None]}],
    }
    # `$ref` with siblings (ignored in 3.0) keeps them through allOf
    assert convert_schema({"$ref": "#/components/schemas/A", "description": "d"}) == {
        "description": "d",
        "allOf": [{"$ref": "#/components/schemas/A"}],
    }


def test_other_keywords():
    assert convert_schema({"type": "string", "examples": ["a", "b"]}) == {"type": "string", "example": "a"}
    assert convert_schema({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}) == {
        "type": "array",
        "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    }
    assert convert_schema({"type": "array", "prefixItems": [{"type": "integer"}] * 2, "items": False}) == {
        "type": "array",
        "items": {"type": "integer"},
    }
    dropped = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "c",
        "type": "object",
        "propertyNames": {"pattern": "^x"},
        "unevaluatedProperties": False,
        "required": [],
        "x-keep": 1,
        "additionalProperties": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    }
    assert convert_schema(dropped) == {
        "type": "object",
        "x-keep": 1,
        "additionalProperties": {"type": "integer", "nullable": True},
    }
    assert convert_schema(True) == {} and convert_schema(False) == {"not": {}}
    # key patterns have no 3.0 form: the values keep their schema, the patterns become an extension
    assert convert_schema({"type": "object", "patternProperties": {"^[0-9]+$": {"exclusiveMinimum": 0}}}) == {
        "type": "object",
        "additionalProperties": {"minimum": 0, "exclusiveMinimum": True},
        "x-patternProperties": {"^[0-9]+$": {"minimum": 0, "exclusiveMinimum": True}},
    }
    assert convert_schema({"type": "string", "contentEncoding": "base64"}) == {
        "type": "string",
        "format": "byte",
    }


def test_document_walk():
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "t",
            "version": "1",
            "summary": "s",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "webhooks": {},
        "jsonSchemaDialect": "x",
        "paths": {
            "/a/{id}": {
                "get": {
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"const": 1}}],
                    "responses": {
                        200: {
                            "description": "ok",
                            "headers": {"X-N": {"schema": {"type": ["integer", "null"]}}},
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/A"},
                                    "example": {"const": "data, not a schema"},
                                }
                            },
                        }
                    },
                }
            }
        },
        "components": {
            "schemas": {
                "A": {
                    "type": "object",
                    "properties": {"b": {"$ref": "#/$defs/B"}},
                    "$defs": {"B": {"type": "number", "exclusiveMaximum": 1}},
                }
            },
            "parameters": {"schema": {"name": "schema", "in": "query", "schema": {"const": "x"}}},
        },
    }
    out = to_openapi30(doc)
    validate(out, cls=OpenAPIV30SpecValidator)
    assert out["openapi"] == "3.0.3" and "webhooks" not in out and "jsonSchemaDialect" not in out
    assert out["info"] == {"title": "t", "version": "1", "license": {"name": "MIT"}}
    op = out["paths"]["/a/{id}"]["get"]
    assert op["parameters"][0]["schema"] == {"enum": [1]}
    ok = op["responses"]["200"]  # status codes become strings
    assert ok["headers"]["X-N"]["schema"] == {"type": "integer", "nullable": True}
    assert ok["content"]["application/json"]["example"] == {"const": "data, not a schema"}
    assert out["components"]["schemas"]["A"]["properties"]["b"] == {"$ref": "#/components/schemas/B"}
    assert out["components"]["schemas"]["B"] == {"type": "number", "maximum": 1, "exclusiveMaximum": True}
    assert out["components"]["parameters"]["schema"]["schema"] == {"enum": ["x"]}
    assert doc["openapi"] == "3.1.0" and "$defs" in doc["components"]["schemas"]["A"]  # input untouched


class _Opts(BaseModel):
    include_usage: bool = False


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["text"] = "text"
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    mode: Literal["a", "b"] | None = None
    stop: list[str] | None = Field(None, max_length=2)
    options: _Opts | None = None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"kind": "text", "top_p": 0.5, "top_k": None, "mode": None, "stop": None, "options": None},
        {"top_p": 1, "top_k": 3, "mode": "b", "stop": ["x", "y"], "options": {"include_usage": True}},
        {"kind": "other"},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"mode": "c"},
        {"stop": ["a", "b", "c"]},
        {"options": 3},
        {"typo": 1},
    ],
)
def test_converted_schema_accepts_what_pydantic_accepts(body):
    """A strict 3.0 validator on the converted schema agrees with pydantic on the original model."""
    raw = _Req.model_json_schema(ref_template="#/components/schemas/{model}")
    doc = to_openapi30(
        {
            "openapi": "3.1.0",
            "info": {"title": "t", "version": "1"},
            "paths": {},
            "components": {"schemas": {**raw.pop("$defs"), "Req": raw}},
        },
        strict_nullable=True,
    )
    validate(doc, cls=OpenAPIV30SpecValidator)
    schema = {**doc["components"]["schemas"]["Req"], "components": doc["components"]}
    try:
        _Req.model_validate_json(json.dumps(body))
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    assert (not list(OAS30Validator(schema).iter_errors(body))) == pydantic_ok
