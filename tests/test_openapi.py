"""The service's OpenAPI document (services/openapi.py): valid OpenAPI 3.1, every route's errors
declared on the route and listed in the document.

The document is built in-process for the real `services.service:LmforgeService` the way BentoML's
server builds it (`Service.openapi_spec`); one test serves it through BentoML's own server app
(`ServiceAppFactory`, no model loaded) in a subprocess and reads `GET /docs.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `services/` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from services.openapi import (  # noqa: E402
    OPEN_PATHS,
    ErrorDoc,
    OpenAPIDocument,
    OpenAPIService,
    bentoml_document,
    build_openapi,
    errors,
    install,
)

GENERATION_ROUTES = ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
GENERATION_ERRORS = {"400", "401", "404", "422", "500", "503", "504"}
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


def test_bentoml_stamps_a_31_document_30(service):
    """Why the hook exists: BentoML stamps FastAPI's OpenAPI 3.1 schemas `openapi: 3.0.2`; the
    schemas themselves are valid 3.1, so the true version is all the document needs."""
    raw = bentoml_document(service)
    assert raw["openapi"].startswith("3.0")
    validate({**raw, "openapi": "3.1.0"}, cls=OpenAPIV31SpecValidator)


def test_document_is_valid_openapi_31(doc):
    assert doc["openapi"] == "3.1.0"
    validate(doc, cls=OpenAPIV31SpecValidator)


@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_generation_routes_list_their_errors(doc, path):
    responses = doc["paths"][path]["post"]["responses"]
    assert set(responses) >= GENERATION_ERRORS
    assert "Retry-After" in responses["503"]["headers"]
    assert responses["503"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    for code in ("400", "404", "500", "503"):
        body = responses[code]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorResponse"}
    error = resolve(doc, resolve(doc, "#/components/schemas/ErrorResponse")["properties"]["error"]["$ref"])
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert {"type": "null"} in error["properties"]["param"]["anyOf"]
    validation = resolve(doc, responses["422"]["content"]["application/json"]["schema"]["$ref"])
    assert validation["properties"]["error"] == {"$ref": "#/components/schemas/OpenAIError"}
    timeout = responses["504"]["content"]["application/json"]["schema"]["anyOf"]
    assert {"$ref": "#/components/schemas/ServerTimeout"} in timeout


def test_every_route_lists_401_except_the_probes_and_no_fastapi_default_422(doc):
    seen = set()
    for path, _method, op in operations(doc):
        seen.add(path)
        assert ("401" in op["responses"]) == (path not in OPEN_PATHS), path
        if "422" in op["responses"]:  # FastAPI's default 422 is replaced wherever it would appear
            assert "HTTPValidationError" not in json.dumps(op["responses"]["422"]), path
    assert seen >= OPEN_PATHS and set(GENERATION_ROUTES) <= seen
    assert "404" in doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    assert "503" in doc["paths"]["/livez"]["get"]["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def _raised_statuses() -> dict[str, set[str]]:
    """Route path -> the HTTP statuses its handler raises itself (`raise ApiError(<status>, ...)`),
    read from the route modules' source."""
    import ast

    out: dict[str, set[str]] = {}
    for name in ("native", "openai_api", "introspect_api"):
        tree = ast.parse((REPO / "services" / f"{name}.py").read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            paths = [
                d.args[0].value.replace(":path}", "}")
                for d in fn.decorator_list
                if isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant)
            ]
            raised = {
                str(node.exc.args[0].value)
                for node in ast.walk(fn)
                if isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) == "ApiError"
                and isinstance(node.exc.args[0], ast.Constant)
            }
            for path in paths:
                out.setdefault(path, set()).update(raised)
    return out


def test_every_status_a_route_raises_is_in_its_declared_errors(doc):
    """The document cannot drift from the code: each `raise ApiError(status, ...)` in a route's
    handler is a status its decorator's `errors(...)` declares."""
    raised = _raised_statuses()
    assert raised["/v1/tokens/{token_id}/nearest"] == {"404"} and "400" in raised["/generate_stream"]
    for path, statuses in raised.items():
        (op,) = doc["paths"][path].values()
        assert statuses <= set(op["responses"]), (path, statuses - set(op["responses"]))


def test_errors_helper_adds_what_every_route_answers():
    teapot = ErrorDoc(418, "I'm a teapot.", retry_after=True)
    out = errors(teapot)
    assert list(out) == [418, 401, 503]
    assert out[418]["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 0}
    assert "WWW-Authenticate" in out[401]["headers"]
    assert errors(ErrorDoc(503, "mine"))[503]["description"] == "mine"  # the route's own wins


def test_open_paths_match_the_api_key_middleware(service):
    import services.app

    assert services.app.OPEN_PATHS is OPEN_PATHS  # 401 is documented exactly where the key is checked


def test_security_is_declared_when_a_key_is_configured(service, monkeypatch):
    monkeypatch.setenv("LMFORGE_API_KEY", "sekret")
    doc = build_openapi(service)
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, _, op in operations(doc):
        assert op["security"] == ([] if path in OPEN_PATHS else [{"bearerAuth": []}]), path
    monkeypatch.delenv("LMFORGE_API_KEY")
    assert all("security" not in op for _, _, op in operations(build_openapi(service)))


def test_served_docs_json_is_the_built_document(service, doc, monkeypatch):
    """BentoML's server app answers /docs.json with `service.openapi_spec.asdict()`
    (`ServiceAppFactory.openapi_spec_view`); through the hook that is :func:`build_openapi`. The
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
    validate(served, cls=OpenAPIV31SpecValidator)
    assert served == doc


def test_install_and_service_class_are_the_same_hook(doc):
    import bentoml

    @bentoml.service(name="probe", service_class=OpenAPIService)
    class Probe:
        pass

    assert isinstance(Probe, OpenAPIService) and Probe._caller_module == __name__
    validate(Probe.openapi_spec.asdict(), cls=OpenAPIV31SpecValidator)

    @bentoml.service(name="probe2")
    class Probe2:
        pass

    assert install(Probe2) is Probe2 and isinstance(Probe2, OpenAPIService)
    assert install(Probe2) is Probe2
    spec = OpenAPIDocument(doc)  # what `bentoml build` writes to apis/openapi.yaml
    assert yaml.safe_load(yaml.dump(spec)) == doc and spec.asdict() == doc
    with pytest.raises(TypeError):
        install(object())
