"""Fuzzing the real service from its own OpenAPI document.

The served ``/docs.json`` (OpenAPI 3.1, every route's errors declared on the route) drives schemathesis, which draws
request bodies for every POST route: schema-valid ones (positive), schema-breaking ones (negative:
wrong types, missing fields, nulls, junk bytes) and schema-valid ones with a few fields replaced by
boundary values (smallest positive float, 1e-6, +-100 logit biases, huge ints, empty strings,
unicode, nulls, wrong types). A second, deterministic pass sets each documented field of each route,
one at a time, to each boundary value (NaN and Infinity included: Python's JSON parser accepts them).

Every answer must be: never a 5xx (no load here, so not even a 503), a status the document lists
for that operation, a 4xx body in OpenAI's error shape with a message (and matching its documented
schema), and a 200 stream that ends in ``[DONE]`` without an error event.

Lengths are kept small (at most a few new tokens, n <= 2, three prompts per request) so the whole
module takes well under a minute and a half on two cores. ``LMFORGE_FUZZ_EXAMPLES`` (default 40)
sets the examples per route and mode; ``LMFORGE_FUZZ_RANDOM=1`` draws new examples each run
instead of the same derandomized ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_headers_conformance, response_schema_conformance

from test_service import PROMPT, registry, server  # noqa: F401  (module fixtures: this module's own server)

pytestmark = pytest.mark.slow

ROUTES = (
    "/generate",
    "/generate_stream",
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
    "/v1/introspect",
    "/v1/sampling/distribution",
)
EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("LMFORGE_FUZZ_RANDOM", "") == "1"
MAX_TOKENS = 6  # new tokens per generated case; longer asks are folded into 1..MAX_TOKENS
MAX_N = 2
MAX_PROMPTS = 3
TOKEN_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
CLOSE = {"Connection": "close"}  # a fresh connection per request: a failed one cannot poison the next

# Boundary values for any field: the extremes of the documented ranges and just past them, and the
# wrong types. Each route's fields are crossed with all of them.
BOUNDARY: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    -2,
    5e-324,  # smallest positive float: 0 once cast to float32
    1e-6,
    0.5,
    1.0,
    10.0,
    100,
    -100,
    4097,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    1e308,
    -1e308,
    "",
    "x",
    "\u00fc\U0001f98a\u0000\ud7ff\u200b",
    [],
    [""],
    [0],
    [[0]],
    {},
    {"5": 100},
    {"5": -100},
    {"5": 5e-324},
    {"999999999": 1},
)
NON_FINITE = (float("nan"), float("inf"), float("-inf"))  # sent as NaN / Infinity / -Infinity

BASES: dict[str, dict[str, Any]] = {
    "/generate": {"prompt": PROMPT, "max_new_tokens": 4},
    "/generate_stream": {"prompt": PROMPT, "max_new_tokens": 4},
    "/v1/completions": {"prompt": PROMPT, "max_tokens": 4},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "What is your name?"}],
        "max_tokens": 4,
    },
    "/tokenize": {"text": PROMPT},
    "/detokenize": {"ids": [5, 6, 7]},
    "/v1/introspect": {"text": PROMPT, "attention_layers": [0]},
    "/v1/sampling/distribution": {"text": PROMPT, "top_k": 5, "sample": True, "seed": 1},
}


# --------------------------------------------------------------------------- the document


@pytest.fixture(scope="module")
def doc(server) -> dict:  # noqa: F811
    r = httpx.get(f"{server}/docs.json", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def api(doc):
    schema = schemathesis.openapi.from_dict(doc)
    # schemathesis stops reading an event stream after 20 events (DEFAULT_MAX_STREAM_EVENTS) and
    # closes the connection, which the server rightly takes for a client gone; read every stream whole
    schema.config.max_stream_events = 10_000
    return schema


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def request_fields(doc: dict, path: str) -> list[str]:
    """The documented top-level fields of the route's JSON body."""
    schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    while "$ref" in schema or "allOf" in schema:
        ref = schema["$ref"] if "$ref" in schema else schema["allOf"][0]["$ref"]
        schema = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return sorted(schema["properties"])


def documented(doc: dict, path: str) -> set[str]:
    return set(doc["paths"][path]["post"]["responses"])


# --------------------------------------------------------------------------- what every answer must be


def sse_payloads(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def check_answer(doc: dict, path: str, sent: Any, status: int, headers: Mapping[str, Any], text: str) -> None:
    """No 5xx, a documented status, OpenAI's error shape on a 4xx, a clean stream on a 200."""
    # httpx gives strings, schemathesis lists of strings
    headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in headers.items()}
    shown = sent if isinstance(sent, bytes) else json.dumps(sent, allow_nan=True, ensure_ascii=True)
    where = f"POST {path} {str(shown)[:1500]}\n -> {status} {headers.get('content-type')} {text[:800]}"
    assert status < 500, "server error: " + where
    assert str(status) in documented(doc, path), "status not in the document: " + where
    ctype = headers.get("content-type", "")
    if status >= 400:
        assert ctype.startswith("application/json"), "error body not JSON: " + where
        body = json.loads(text)
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict), "not OpenAI's error shape: " + where
        assert {"message", "type", "param", "code"} <= set(err), "not OpenAI's error shape: " + where
        assert isinstance(err["message"], str) and err["message"], "error without a message: " + where
        if status == 503:
            assert "retry-after" in headers, "503 without Retry-After: " + where
    elif ctype.startswith("text/event-stream"):
        events = sse_payloads(text)
        assert events and events[-1] == "[DONE]", "stream did not end with [DONE]: " + where
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert not errors, "error event in a 200 stream: " + where
    else:
        assert ctype.startswith("application/json"), where
        json.loads(text)


# --------------------------------------------------------------------------- schemathesis-drawn cases


def _small(value: Any, top: int) -> Any:
    """Fold an in-range int above `top` into 1..top, an integral float (20.0, which OpenAPI 3.1's
    `integer` allows) too; out-of-range and wrong-type values stay."""
    if type(value) is float and value.is_integer() and top < value <= 4096:
        return float(int(value) % top + 1)
    if type(value) is int and top < value <= 4096:
        return value % top + 1
    return value


def shrink_work(path: str, body: Any, *, positive: bool) -> Any:
    """Keep generated requests cheap; for positive cases also satisfy the cross-field rule the
    schema cannot state (exactly one of prompt/messages, text/messages)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for key in TOKEN_FIELDS:
        if key in body:
            body[key] = _small(body[key], MAX_TOKENS)
    if "n" in body:
        body["n"] = _small(body["n"], MAX_N)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        body["prompt"] = prompt[:MAX_PROMPTS]
    if path in ("/generate", "/generate_stream") and "max_new_tokens" not in body:
        body["max_new_tokens"] = MAX_TOKENS
    if positive and path in ("/v1/introspect", "/v1/sampling/distribution"):
        given = [k for k in ("text", "messages", "ids") if body.get(k) is not None]
        for k in given[1:]:
            body.pop(k)  # exactly one input
        if not given:
            body["text"] = PROMPT
    if positive and path in ("/generate", "/generate_stream", "/tokenize"):
        one = "text" if path == "/tokenize" else "prompt"
        if body.get(one) is not None and body.get("messages") is not None:
            body.pop("messages")
        elif body.get(one) is None and body.get("messages") is None:
            body[one] = PROMPT
    return body


def overlay(fields: Iterable[str]) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(sorted(fields)), st.sampled_from(BOUNDARY), min_size=1, max_size=3)


MODES = ("positive", "negative", "boundary")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ROUTES)
def test_fuzzed_requests_are_answered_as_documented(api, doc, server, session, path, mode):  # noqa: F811
    op = api[path]["POST"]
    cases = op.as_strategy(
        generation_mode=GenerationMode.NEGATIVE if mode == "negative" else GenerationMode.POSITIVE
    )
    if mode == "boundary":
        cases = st.tuples(cases, overlay(request_fields(doc, path)))
    else:
        cases = st.tuples(cases, st.just({}))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(drawn=cases)
    def run(drawn) -> None:
        case, extra = drawn
        if isinstance(case.body, dict):
            case.body = shrink_work(path, {**case.body, **extra}, positive=mode != "negative")
        response = case.call(base_url=server, session=session, headers=CLOSE, timeout=60)
        assert not response.stream_cut_short, f"the client stopped reading the stream: {case.body}"
        check_answer(doc, path, case.body, response.status_code, response.headers, response.text)
        case.validate_response(response, checks=[response_schema_conformance, response_headers_conformance])

    run()


# --------------------------------------------------------------------------- every field x every boundary value


def grid(doc: dict, path: str) -> list[dict]:
    """The route's valid base body with one documented field set to one boundary value, for every
    pair; the OpenAI routes once more with `stream: true`."""
    bases = [BASES[path]]
    if path.startswith("/v1/"):
        bases.append({**BASES[path], "stream": True})
    return [
        {**base, field: value}
        for base in bases
        for field in request_fields(doc, path)
        for value in (*BOUNDARY, *NON_FINITE)
    ]


@pytest.mark.parametrize("path", ROUTES)
def test_each_field_at_each_boundary_value(doc, server, path):  # noqa: F811
    failures = []
    with httpx.Client(base_url=server, timeout=60, headers=CLOSE) as client:
        for body in grid(doc, path):
            raw = json.dumps(body, allow_nan=True)
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            try:
                check_answer(doc, path, body, r.status_code, r.headers, r.text)
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:25])


@pytest.mark.parametrize("path", ROUTES)
def test_bodies_that_are_not_json_objects(doc, server, path):  # noqa: F811
    bodies = [b"", b"{", b"null", b"[]", b'"x"', b"1e999", b"\xc6I", b"\xff\xfe{}", b'{"prompt": "\xff"}']
    failures = []
    with httpx.Client(base_url=server, timeout=60, headers=CLOSE) as client:
        for raw in bodies:
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            try:
                check_answer(doc, path, raw, r.status_code, r.headers, r.text)
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures)


# --------------------------------------------------------------------------- valid requests, concurrent batches (issue 22)

CONTEXT = 64  # the test model's context (test_service's registry)
VOCAB = 300
GENERATION_ROUTES = ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
BATCH_EXAMPLES = int(os.environ.get("LMFORGE_FUZZ_BATCHES", "25"))

_texts = st.one_of(
    st.sampled_from(["", "x", " ", "\n", "Once", "What is your name?", "<|bos|>", "\u00fc\U0001f98a"]),
    st.text(max_size=40),
    st.integers(1, 60).map(lambda k: "fox " * k),  # up to past the context
)
# Token ids: any id, the special ids (0..9 in the test tokenizer) often; 1 id up to past the context.
_ids = st.lists(st.one_of(st.integers(0, 9), st.integers(0, VOCAB - 1)), min_size=1, max_size=CONTEXT + 1)


def _sampling() -> st.SearchStrategy[dict]:
    """Every documented sampling field within its bounds (services/README.md's table)."""
    optional = {
        "temperature": st.one_of(st.sampled_from([0.0, 5e-324, 1e-6, 1.0, 10.0]), st.floats(0, 10)),
        "top_k": st.sampled_from([0, 1, 5, VOCAB, 2**31]),
        "top_p": st.one_of(st.sampled_from([5e-324, 0.1, 1.0]), st.floats(0.01, 1.0)),
        "min_p": st.sampled_from([0.0, 0.05, 1.0]),
        "repetition_penalty": st.sampled_from([1e-6, 0.5, 1.0, 1.3, 10.0]),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(0, 2**63 - 1),
        "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1).map(str), st.floats(-100, 100), max_size=3),
        "stop": st.lists(st.sampled_from(["\n", "the", ".", "\u00fc", "zz"]), max_size=3),
    }
    return st.fixed_dictionaries({}, optional=optional)


@st.composite
def generation_request(draw) -> tuple[str, dict]:
    path = draw(st.sampled_from(GENERATION_ROUTES))
    body = draw(_sampling())
    tokens = draw(st.integers(1, CONTEXT))  # up to the whole context: the reply stops at its end
    if path in ("/generate", "/generate_stream"):
        body["max_new_tokens"] = tokens
        if draw(st.booleans()):
            body["prompt"] = draw(_texts)
        else:
            body["messages"] = [{"role": "user", "content": draw(_texts)}]
        body["top_logprobs"] = draw(st.sampled_from([0, 1, 10, 11, 20]))
        body["logprobs"] = draw(st.booleans())
        body["n"] = 1 if path == "/generate_stream" else draw(st.sampled_from([1, 2, 16]))
    elif path == "/v1/completions":
        body["prompt"] = draw(st.one_of(_texts, _ids, st.lists(_ids, min_size=1, max_size=2)))
        body["max_tokens"] = draw(st.sampled_from([0, tokens]))
        body["logprobs"] = draw(st.sampled_from([None, 0, 5]))
        body["echo"] = draw(st.booleans())
        body["n"] = draw(st.sampled_from([1, 2, 16]))
        body["stream"] = draw(st.booleans())
    else:
        body["messages"] = [{"role": "user", "content": draw(_texts)}]
        body["max_tokens"] = tokens
        top = draw(st.sampled_from([None, 0, 10, 20]))
        body["logprobs"] = top is not None or draw(st.booleans())
        if top is not None:
            body["top_logprobs"] = top
        body["n"] = draw(st.sampled_from([1, 2, 16]))
        body["stream"] = draw(st.booleans())
    return path, body


# The corners of issue 22's report, always run: a one-token text prompt with the most alternatives
# per token (a step message larger than the engine's pipe), greedy and sampled, and the most rows.
REPORTED = [
    ("/generate", {"prompt": "x", "top_logprobs": 20}),
    ("/generate", {"prompt": "x", "top_logprobs": 20, "temperature": 0}),
    ("/generate", {"prompt": "x", "top_logprobs": 20, "n": 16, "max_new_tokens": 64}),
    ("/generate_stream", {"prompt": "x", "top_logprobs": 20, "logprobs": True}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 20, "n": 16},
    ),
    ("/v1/completions", {"prompt": [5], "logprobs": 5, "echo": True, "n": 16, "max_tokens": 64}),
]


def _send_batch(doc: dict, server: str, batch: list[tuple[str, dict]]) -> None:  # noqa: F811
    def one(item: tuple[str, dict]) -> tuple[str, dict, int, Mapping[str, Any], str]:
        path, body = item
        with httpx.Client(base_url=server, timeout=120, headers=CLOSE) as client:
            r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            return path, body, r.status_code, r.headers, r.text

    with ThreadPoolExecutor(max_workers=len(batch)) as pool:
        answers = list(pool.map(one, batch))
    for path, body, status, headers, text in answers:
        check_answer(doc, path, body, status, headers, text)
    health = httpx.get(f"{server}/readyz", timeout=10)
    assert health.status_code == 200, "not ready after the batch"
    engine = httpx.get(f"{server}/info", timeout=10).json()["engine"]
    assert engine["state"] == "running" and engine.get("restarts", 0) == 0, engine


def test_reported_corners_are_answered_together_and_alone(doc, server):  # noqa: F811
    for item in REPORTED:
        _send_batch(doc, server, [item])
    _send_batch(doc, server, REPORTED)


def test_valid_requests_in_concurrent_batches_keep_the_server_serving(doc, server):  # noqa: F811
    """Hypothesis draws batches of 1-6 valid requests over the four generation routes (prompts of
    0 characters or 1 token up to past the context, special tokens, every sampling field in its
    documented bounds, up to 20 alternatives per token, up to 16 choices, streams), sends each batch
    at once, and requires a documented non-5xx answer for every request, clean streams, and a
    server that is still ready and has never restarted its engine after every batch."""

    @settings(
        max_examples=BATCH_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(generation_request(), min_size=1, max_size=6))
    def run(batch) -> None:
        _send_batch(doc, server, batch)

    run()
