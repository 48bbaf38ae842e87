"""The BentoML service end to end: a tiny model registered in a temp MLflow store, served by the real
`bentoml serve`, every route called over HTTP.

The model is built and published in a subprocess (this file run as a script) so MLflow's global
tracking URI never leaks into the rest of the suite. The API-key check runs in-process on the ASGI app.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmforge.orchestration import bento_service

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "lmforge-chat"
CORPUS = [
    "Once upon a time there was a little fox who lived in the green forest.",
    "The fox liked to run and jump over the small river near the old tree.",
    "Every morning the sun rose over the hills and the birds began to sing.",
    "A cat and a dog were friends; they played in the garden all day long.",
    "What is your name? My name is Sam and I like apples and bread.",
] * 20

pytestmark = pytest.mark.slow
CARD_FIGURES = {
    "eval.tuned.end_of_turn_rate": 0.875,
    "eval.tuned.end_of_turn_rate_ci_low": 0.77,
    "eval.tuned.end_of_turn_rate_ci_high": 0.94,
}


# --------------------------------------------------------------------------- building the registry


def build_and_publish(
    root: Path, text_replies: bool = False, corrupt: bool = False, block_size: int = 64
) -> dict:
    """Tiny GPT + BPE tokenizer -> model folder -> registered `lmforge-chat` version (champion).
    ``text_replies``: an untied output layer that never predicts a special token, so every reply is
    text up to its length limit (this one's greedy replies are special tokens). ``corrupt``: weights
    that do not load (a version whose load fails). ``block_size``: its context (tool definitions in
    the prompt need more than 64). Each call adds a version to the same store."""
    import mlflow
    import torch

    from conftest import tiny_gpt
    from lmforge.model_folder import save_model_dir
    from lmforge.registry.publish import publish
    from lmforge.tokenizer import ChatTokenizer, train_bpe

    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=300))
    tok.save(root / "tokenizer")
    model = tiny_gpt(
        tok.vocab_size, block_size=block_size, n_head=2, n_kv_head=2, tie_embeddings=not text_replies
    ).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(5.0)  # sharper logits: no near-ties between greedy paths
        if text_replies:
            model.lm_head.weight.mul_(5.0)
            model.lm_head.weight[sorted(tok.special_ids)] = 0.0
    model_dir = save_model_dir(model, model.config, root / "tokenizer", root / "model")
    if corrupt:
        (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    known = mlflow.get_experiment_by_name("service-test")
    exp = (
        known.experiment_id
        if known
        else mlflow.create_experiment("service-test", artifact_location=(root / "artifacts").as_uri())
    )
    mlflow.set_experiment(experiment_id=exp)
    with mlflow.start_run(run_name="register"):
        # What the register stage logs: the evaluation's figures with their 95% intervals.
        mlflow.log_metrics(CARD_FIGURES)
        return publish(
            model_dir,
            model_name=MODEL_NAME,
            dtype="fp32",
            failed_gates=[],
            tags={"test": "1"},
            description="# the model card",
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_self(tracking_uri: str, *args: str) -> Any:
    """This file as a script in a subprocess against the MLflow store at `tracking_uri` (MLflow's
    tracking URI stays out of this process); its last line of output, parsed as JSON."""
    out = subprocess.run(
        [sys.executable, __file__, *args],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    return {**run_self(tracking_uri, "publish", str(root)), "root": root, "tracking_uri": tracking_uri}


def service_env(registry: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_")}
    env.update(
        MLFLOW_TRACKING_URI=registry["tracking_uri"],
        BENTOML_HOME=str(registry["root"] / "bentoml"),
        BENTOML_DO_NOT_TRACK="True",
        TOKENIZERS_PARALLELISM="false",
        LMFORGE_TORCH_THREADS="1",  # tiny model: one intra-op thread is fastest and steady on a busy CPU
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


@contextlib.contextmanager
def running_server(registry: dict, name: str, **env: str):
    """`bentoml serve` on a free port with the registry's model (extra LMFORGE_* settings in `env`);
    yields its URL and stops it after. Its own BentoML home: its own Prometheus files."""
    port = free_port()
    log_path = registry["root"] / f"{name}.log"
    environment = {**service_env(registry), "BENTOML_HOME": str(registry["root"] / f"bentoml-{name}"), **env}
    with open(log_path, "w") as log:
        proc = bento_service.start(
            port, env=environment, cwd=REPO, stdout=log, bentoml=BIN / "bentoml", working_dir=REPO
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            bento_service.wait_ready(proc, url, timeout_s=90)
        except bento_service.ServiceStartError as err:
            pytest.fail(f"{err}:\n{log_path.read_text()[-4000:]}")
        yield url
    finally:
        bento_service.stop(proc)


@pytest.fixture(scope="module")
def server(registry):
    with running_server(registry, "serve") as url:
        yield url


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def gen(http, **body) -> dict:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response: httpx.Response) -> list:
    """`data: ...` payloads of a server-sent event stream; the final `[DONE]` kept as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


PROMPT = "Once upon a time"


# --------------------------------------------------------------------------- health and metadata


def test_health_readiness_and_version(http, registry):
    for path in ("/healthz", "/livez", "/readyz"):
        assert http.get(path).status_code == 200, path
    info = http.get("/info").json()
    assert info["ready"] is True
    assert info["model"] == MODEL_NAME and info["alias"] == "champion"
    assert info["version"] == str(registry["version"])
    assert info["context_length"] == 64 and info["device"] == "cpu" and info["dtype"] == "float32"


def test_v1_models_lists_the_served_version(http, registry):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == MODEL_NAME and entry["version"] == str(registry["version"])
    assert http.get(f"/v1/models/{MODEL_NAME}").json()["version"] == str(registry["version"])
    assert http.get("/v1/models/gpt-4").status_code == 404


# --------------------------------------------------------------------------- sampling behaviour


def test_greedy_is_deterministic_and_top_k_1_is_greedy(http):
    a = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=24)
    b = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=24)
    assert a["choices"] == b["choices"]
    assert a["choices"][0]["token_ids"], "the tiny model produced nothing"
    k1 = gen(http, prompt=PROMPT, temperature=1.0, top_k=1, max_new_tokens=24, seed=5)
    assert k1["choices"][0]["token_ids"] == a["choices"][0]["token_ids"]
    assert a["usage"]["completion_tokens"] == len(a["choices"][0]["token_ids"])
    assert a["usage"]["total_tokens"] == a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"]


def test_seed_makes_sampling_reproducible(http):
    body = {"prompt": PROMPT, "temperature": 1.0, "max_new_tokens": 24, "seed": 1234}
    assert gen(http, **body)["choices"][0]["text"] == gen(http, **body)["choices"][0]["text"]
    texts = {gen(http, **{**body, "seed": s})["choices"][0]["text"] for s in range(4)}
    assert len(texts) > 1, "different seeds should not all give the same sample"


def test_stop_strings_stop_generation(http):
    full = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=40)["choices"][0]
    text = full["text"]
    assert len(text) >= 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.find(stop)
    out = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=40, stop=[stop])["choices"][0]
    assert out["finish_reason"] == "stop" and out["stop_string"] == stop
    assert stop not in out["text"] and out["text"] == text[:cut]


def test_stream_joins_to_the_generated_text(http):
    body = {"prompt": PROMPT, "temperature": 1.0, "max_new_tokens": 30, "seed": 7, "logprobs": True}
    whole = gen(http, **body)["choices"][0]
    with http.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] >= len(whole["token_ids"])
    assert [c["token_id"] for c in chunks if c["token_id"] is not None][: len(whole["token_ids"])] == whole[
        "token_ids"
    ]
    assert all(c["logprobs"]["logprob"] <= 0 for c in chunks if "logprobs" in c)


def test_n_choices_in_one_request(http):
    out = gen(http, prompt=PROMPT, temperature=1.0, max_new_tokens=16, n=3, seed=3)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in out["choices"])
    again = gen(http, prompt=PROMPT, temperature=1.0, max_new_tokens=16, n=3, seed=3)
    assert again["choices"] == out["choices"]


def test_logprobs_and_top_alternatives(http):
    out = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=12, logprobs=True, top_logprobs=3)
    choice = out["choices"][0]
    lps = choice["logprobs"]
    assert len(lps) == len(choice["token_ids"]) > 0
    for step, tid in zip(lps, choice["token_ids"], strict=True):
        assert step["token_id"] == tid and step["logprob"] <= 0
        tops = step["top_logprobs"]
        assert 1 <= len(tops) <= 3 and all(t["logprob"] <= 0 for t in tops)
        assert tops[0]["token_id"] == tid  # greedy picks the top alternative
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
    plain = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=12)["choices"][0]
    assert plain["logprobs"] is None and plain["token_ids"] == choice["token_ids"]


def test_concurrent_requests_are_batched_and_unchanged(http):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 20}
    solo = gen(http, **body)["choices"][0]["token_ids"]
    before = http.get("/info").json()["engine"]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: gen(http, **body), range(8)))
    assert all(o["choices"][0]["token_ids"] == solo for o in outs)
    after = http.get("/info").json()["engine"]
    assert after["rows"] - before["rows"] == 8
    # rows shared decode steps: far fewer steps than 8 requests x their tokens
    assert after["steps"] - before["steps"] < 8 * len(solo) and after["largest_batch"] > 1


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_round_trip(http):
    text = "The fox liked to run, jump and sing!"
    out = http.post("/tokenize", json={"text": text}).json()
    assert out["count"] == len(out["ids"]) == len(out["tokens"]) > 0
    assert "".join(out["tokens"]) == text
    assert http.post("/detokenize", json={"ids": out["ids"]}).json()["text"] == text
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]}).json()
    assert chat["tokens"][0] == "<|bos|>" and chat["tokens"][-1] == "<|assistant|>"
    assert chat["count"] == len(out["ids"]) + 4  # bos, user, end, assistant


# --------------------------------------------------------------------------- OpenAI compatibility


def test_openai_chat_completions(http):
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What is your name?"}],
        "max_tokens": 20,
        "temperature": 0.8,
        "seed": 11,
        "logprobs": True,
        "top_logprobs": 2,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == MODEL_NAME
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) <= 2 for t in choice["logprobs"]["content"])
    u = out["usage"]
    assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]

    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == u["prompt_tokens"]


def test_openai_completions(http):
    r = http.post(
        "/v1/completions",
        json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 2},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion"
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == out["usage"]["completion_tokens"]
    assert all(v <= 0 for v in lp["token_logprobs"])
    native = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=10)["choices"][0]
    assert choice["text"] == native["text"]

    two = http.post(
        "/v1/completions",
        json={"prompt": [PROMPT, "The fox"], "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 1},
    ).json()
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]

    with http.stream(
        "POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == choice["text"]
    assert events[-2]["usage"]["completion_tokens"] == out["usage"]["completion_tokens"]


# --------------------------------------------------------------------------- validation


BAD = [
    ("/generate", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/generate", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ("/generate", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/generate", {"prompt": "hi", "n": 100}, "n"),
    ("/generate", {"prompt": "hi", "min_p": 1.5}, "min_p"),
    ("/generate", {"prompt": "hi", "top_k": -3}, "top_k"),
    ("/generate", {"prompt": "hi", "seed": "abc"}, "seed"),
    ("/generate", {"prompt": "hi", "temprature": 0.5}, "temprature"),
    ("/generate", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/generate", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/generate", {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/generate_stream", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("/tokenize", {"text": 5}, "text"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD, ids=[f"{p}-{f}" for p, _, f in BAD])
def test_bad_inputs_are_4xx_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert field in err["message"], err


def test_malformed_json_is_4xx(http):
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_prompt_longer_than_the_context_is_rejected(http, path):
    long = "the fox and the cat " * 40
    body = {"messages": [{"role": "user", "content": long}]} if "chat" in path else {"prompt": long}
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "context is 64 tokens" in err["message"] and "at most 63 prompt tokens" in err["message"]


# --------------------------------------------------------------------------- API key (in-process ASGI app)


def test_api_key_is_enforced(registry, monkeypatch):
    import mlflow.tracking._tracking_service.utils as mlflow_utils
    from starlette.testclient import TestClient

    monkeypatch.setattr(mlflow_utils, "_tracking_uri", mlflow_utils._tracking_uri)  # restored afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["tracking_uri"])
    monkeypatch.setenv("BENTOML_HOME", str(registry["root"] / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    monkeypatch.setenv("LMFORGE_API_KEY", "s3cret")
    monkeypatch.syspath_prepend(str(REPO))
    from services.service import LmforgeService

    with TestClient(LmforgeService.to_asgi()) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/healthz").status_code == 200
        body = {"prompt": "hi", "max_new_tokens": 2, "temperature": 0}
        r = client.post("/generate", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        models = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()
        assert models["data"][0]["version"] == str(registry["version"])


# --------------------------------------------------------------------------- extreme values over HTTP

CHAT = [{"role": "user", "content": "What is your name?"}]
EXTREMES = [
    {"repetition_penalty": 5e-324},
    {"top_p": 5e-324},
    {"temperature": 1e-6},
    {"temperature": 5e-324},
    {"logit_bias": {"75": 100}},
    {"logit_bias": {"75": -100}},
    {"logit_bias": {"75": 100, "76": -100, "0": 5e-324}},
    {"presence_penalty": 2, "frequency_penalty": 2},
    {"presence_penalty": -2, "frequency_penalty": -2},
    {"repetition_penalty": 10, "temperature": 10, "min_p": 1.0, "top_k": 1},
]


def openai_body(path: str, **extra) -> dict:
    base = {"messages": CHAT} if "chat" in path else {"prompt": PROMPT}
    return {**base, "max_tokens": 8, "seed": 3, **extra}


def no_error_events(events: list) -> None:
    assert events and events[-1] == "[DONE]", events[-3:]
    assert not [e for e in events if isinstance(e, dict) and "error" in e], events


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("knobs", EXTREMES, ids=[json.dumps(k) for k in EXTREMES])
def test_extreme_sampling_values_are_served_or_named(http, path, stream, knobs):
    body = openai_body(path, stream=stream, **knobs)
    with http.stream("POST", path, json=body) as r:
        r.read()
    if r.status_code != 200:  # refusing is fine, but as a client error that names the field
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert any(k in r.json()["error"]["message"] for k in knobs), r.text
        return
    if stream:
        no_error_events(sse_events(r))
    else:
        (choice,) = r.json()["choices"]
        assert choice["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": 1e-6},
        {"temperature": 1e-30},
        {"temperature": 1e-45},
        {"temperature": 5e-324},
        {"temperature": 1.0, "top_p": 5e-324},
        {"temperature": 1.0, "min_p": 1.0},
        {"temperature": 5.0, "top_k": 1},
    ],
    ids=lambda k: json.dumps(k),
)
def test_knobs_that_leave_one_token_are_greedy(http, knobs):
    greedy = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=16)["choices"][0]["token_ids"]
    for seed in (1, 2):
        out = gen(http, prompt=PROMPT, max_new_tokens=16, seed=seed, **knobs)["choices"][0]
        assert out["token_ids"] == greedy, (knobs, seed)


def test_logit_bias_forces_and_bans_tokens(http):
    (forced,) = http.post("/tokenize", json={"text": "fox"}).json()["ids"][:1]
    out = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=8, logit_bias={str(forced): 100})
    assert out["choices"][0]["token_ids"] == [forced] * 8
    greedy = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=8)["choices"][0]["token_ids"]
    banned = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=8, logit_bias={str(greedy[0]): -100})
    assert greedy[0] not in banned["choices"][0]["token_ids"]
    # the same through chat completions: every token of the reply is the forced one
    r = http.post(
        "/v1/chat/completions",
        json={
            "messages": CHAT,
            "temperature": 0,
            "max_tokens": 5,
            "logprobs": True,
            "logit_bias": {str(forced): 100},
        },
    )
    assert r.status_code == 200, r.text
    token = http.post("/tokenize", json={"text": "fox"}).json()["tokens"][0]
    assert [t["token"] for t in r.json()["choices"][0]["logprobs"]["content"]] == [token] * 5


# --------------------------------------------------------------------------- streams equal whole replies


def test_greedy_streams_equal_whole_replies(http):
    body = {"prompt": PROMPT, "temperature": 0, "max_new_tokens": 40}
    whole = gen(http, **body)["choices"][0]
    with http.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    no_error_events(events)
    chunks = events[:-1]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [c["token_id"] for c in chunks if c["token_id"] is not None] == whole["token_ids"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]

    chat = {"messages": CHAT, "temperature": 0, "max_tokens": 40}
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    reply = r.json()
    with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    no_error_events(events)
    chunks = [c for c in events[:-1] if c["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == reply["usage"]


# --------------------------------------------------------------------------- prompt scoring


def check_scored(choice: dict, prompt_text: str, n_tokens: int) -> list:
    assert choice["text"] == prompt_text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_tokens
    assert "".join(lp["tokens"]) == prompt_text
    first, *rest = lp["token_logprobs"]
    assert first is None or (isinstance(first, float) and first <= 0), first
    assert rest and all(isinstance(v, float) and v <= 0 for v in rest), rest
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n_tokens)]
    for top in lp["top_logprobs"][1:]:
        assert top and all(v <= 0 for v in top.values()), top
    return lp["token_logprobs"]


def test_prompt_scoring_with_echo_and_no_new_tokens(http):
    score = {"max_tokens": 0, "echo": True, "logprobs": 1}
    r = http.post("/v1/completions", json={"prompt": PROMPT, **score})
    assert r.status_code == 200, r.text
    out = r.json()
    (choice,) = out["choices"]
    tok = http.post("/tokenize", json={"text": PROMPT}).json()
    check_scored(choice, PROMPT, tok["count"])  # <|bos|> is scored against but not echoed
    assert choice["logprobs"]["token_logprobs"][0] is not None
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == tok["count"] + 1

    r = http.post("/v1/completions", json={"prompt": tok["ids"], **score})  # token ids: taken as is
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    check_scored(choice, PROMPT, tok["count"])
    assert choice["logprobs"]["token_logprobs"][0] is None  # nothing before the first token

    # scoring a greedy continuation gives the log-probabilities it was generated with
    bos = http.post("/tokenize", json={"text": PROMPT, "add_bos": True}).json()["ids"]
    made = gen(http, prompt=PROMPT, temperature=0, max_new_tokens=6, logprobs=True)["choices"][0]
    r = http.post("/v1/completions", json={"prompt": bos + made["token_ids"], **score})
    assert r.status_code == 200, r.text
    scored = r.json()["choices"][0]["logprobs"]["token_logprobs"][-6:]
    assert scored == pytest.approx([s["logprob"] for s in made["logprobs"]], abs=1e-3)


# --------------------------------------------------------------------------- chat completion fields


def test_chat_completions_accepts_openai_sampling_fields(http):
    body = {
        "messages": CHAT,
        "temperature": 0.7,
        "seed": 9,
        "presence_penalty": 1.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"75": 2.5, "76": -100},
        "max_tokens": 30,
        "max_completion_tokens": 4,  # wins over max_tokens, as in OpenAI's API
        "user": "someone",
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert 0 < out["usage"]["completion_tokens"] <= 4
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200
        events = sse_events(r)
    no_error_events(events)
    *chunks, last = events[:-1]
    assert last["choices"] == [] and last["usage"] == out["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == out["choices"][0]["message"]["content"]  # same seed, same reply
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert all(e["choices"] for e in events[:-1])  # no usage-only chunk unless asked


# --------------------------------------------------------------------------- metrics


def test_metrics_after_some_requests(http):
    gen(http, prompt=PROMPT, temperature=0, max_new_tokens=8)
    with http.stream("POST", "/generate_stream", json={"prompt": PROMPT, "max_new_tokens": 4}) as r:
        sse_events(r)
    assert http.post("/generate", json={"prompt": PROMPT, "temperature": -1}).status_code == 422
    text = http.get("/metrics").text
    for name in (
        "lmforge_time_to_first_token_seconds_bucket",
        "lmforge_inter_token_latency_seconds_bucket",
        "lmforge_generated_tokens_total",
        "lmforge_queue_depth",
        "lmforge_running_rows",
        "lmforge_batch_occupancy",
        'lmforge_errors_total{kind="invalid_value"}',
    ):
        assert name in text, name
    tokens = [line for line in text.splitlines() if line.startswith("lmforge_generated_tokens_total")]
    assert float(tokens[0].split()[-1]) >= 12


# --------------------------------------------------------------------------- a full queue, a cancelled stream


@pytest.fixture(scope="module")
def small_server(registry):
    """A second server with one KV slot and a one-row queue."""
    with running_server(registry, "serve-small", LMFORGE_MAX_BATCH="1", LMFORGE_MAX_QUEUE="1") as url:
        yield url


def assert_queue_full(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers["Retry-After"]) >= 0
    err = r.json()["error"]
    assert err["code"] == "queue_full" and err["message"] and err["type"] == "server_error", err


def wait_idle(client: httpx.Client, timeout_s: float = 20) -> dict:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        engine = client.get("/info").json()["engine"]
        # in_flight is what admission counts: rows handed to the engine process and not yet ended
        # (a refused request's admitted rows stay there until the engine reports their end, after
        # its running/waiting figures may already say 0).
        if engine["running"] == 0 and engine["waiting"] == 0 and engine.get("in_flight", 0) == 0:
            return engine
        assert time.monotonic() < deadline, f"engine not idle after {timeout_s} s: {engine}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"prompt": PROMPT, "n": 3, "max_new_tokens": 4}),
        ("/v1/chat/completions", {"messages": CHAT, "n": 3, "max_tokens": 4}),
        ("/v1/completions", {"prompt": PROMPT, "n": 3, "max_tokens": 4}),
        ("/v1/completions", {"prompt": [PROMPT, PROMPT, PROMPT], "max_tokens": 4}),
    ],
    ids=["generate", "chat", "completions", "completions-3-prompts"],
)
def test_more_rows_than_slots_and_queue_is_503(small_server, path, body):
    """Three rows cannot fit one slot plus a one-row queue: refused at once, whatever the load."""
    with httpx.Client(base_url=small_server, timeout=60) as client:
        assert_queue_full(client.post(path, json=body))
        wait_idle(client)
        assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).status_code == 200


def test_full_queue_under_concurrent_load_is_503(small_server):
    import threading

    routes = [
        ("/generate", {"prompt": PROMPT, "max_new_tokens": 60, "temperature": 0}),
        ("/generate_stream", {"prompt": PROMPT, "max_new_tokens": 60, "temperature": 0}),
        ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 60, "temperature": 0, "stream": True}),
    ]
    start = threading.Barrier(12)

    def call(i: int) -> httpx.Response:
        path, body = routes[i % len(routes)]
        with httpx.Client(base_url=small_server, timeout=60) as client:
            start.wait()
            with client.stream("POST", path, json=body) as r:
                r.read()
            return r

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, range(12)))
    refused = [r for r in answers if r.status_code == 503]
    assert refused, [r.status_code for r in answers]
    for r in refused:
        assert_queue_full(r)
    for r in answers:
        if r.status_code != 503:
            assert r.status_code == 200, r.text
            if r.headers["content-type"].startswith("text/event-stream"):
                no_error_events(sse_events(r))
    with httpx.Client(base_url=small_server, timeout=60) as client:
        wait_idle(client)
        text = client.get("/metrics").text
    assert 'lmforge_errors_total{kind="queue_full"}' in text


def test_cancelled_stream_frees_its_slot(small_server):
    body = {"prompt": PROMPT, "max_new_tokens": 60, "temperature": 0}
    with httpx.Client(base_url=small_server, timeout=60) as client:
        wait_idle(client)
        with client.stream("POST", "/generate_stream", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream
        out = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4, "temperature": 0})
        assert out.status_code == 200, out.text
        assert len(out.json()["choices"][0]["token_ids"]) == 4
        wait_idle(client)
        # the slot is free again: a stream runs to the end
        with client.stream("POST", "/generate_stream", json=body) as r:
            assert r.status_code == 200
            no_error_events(sse_events(r))


def test_docs_json_is_valid_openapi_31(http):
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    r = http.get("/docs.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    validate(doc, cls=OpenAPIV31SpecValidator)
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "422", "500", "503", "504"} <= set(responses)
    assert "Retry-After" in responses["503"]["headers"]


# --------------------------------------------------------------------------- introspection


def test_introspect_tokens_probabilities_attention_and_lens(http):
    text = "The fox liked to run"
    ids = http.post("/tokenize", json={"text": text, "add_bos": True}).json()["ids"]
    r = http.post("/v1/introspect", json={"text": text, "top_k": 3, "attention_layers": [1]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["id"] for c in out["tokens"]] == ids
    assert out["tokens"][0]["special"] and out["tokens"][0]["token"] == "<|bos|>"
    spans = [(c["start"], c["end"]) for c in out["tokens"]]
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert "".join(c["token"] for c in out["tokens"][1:]) == text
    assert out["count"] == len(ids) and out["context_length"] == 64
    for row in out["next"]:
        ps = [t["p"] for t in row["top"]]
        assert ps == sorted(ps, reverse=True) and 0 < sum(ps) <= 1 + 1e-6 and row["entropy"] >= 0
    heads = out["attention"]["1"]
    assert len(heads) == 2 and all(len(q) == len(ids) for q in heads[0])
    assert all(abs(sum(q) - 1) < 1e-4 for q in heads[1])
    lens = out["logit_lens"]
    assert len(lens) == 3  # embeddings + 2 layers
    assert [t["id"] for t in lens[-1]] == [row["top"][0]["id"] for row in out["next"]]
    # greedy generation continues with the model's top-1 after the last position
    reply = gen(http, prompt=text, temperature=0, max_new_tokens=1)["choices"][0]
    assert (reply["token_ids"] or [None])[0] in (out["next"][-1]["top"][0]["id"], None)


def test_introspect_bounds_are_4xx_naming_the_limit(http):
    long = "the fox and the cat " * 40
    r = http.post("/v1/introspect", json={"text": long})
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    r = http.post("/v1/introspect", json={"text": "hi", "attention_layers": [9]})
    assert r.status_code == 422 and "attention_layers" in r.json()["error"]["message"]
    r = http.post("/v1/introspect", json={"text": "hi", "ids": [1]})
    assert r.status_code == 422


def test_sampling_lab_follows_the_sampler(http):
    body = {"text": "Once upon a time", "top": 50}
    raw = http.post("/v1/sampling/distribution", json={**body, "temperature": 1.0}).json()
    hot = http.post("/v1/sampling/distribution", json={**body, "temperature": 0.5}).json()
    p1 = {t["id"]: t["p_raw"] for t in raw["tokens"]}
    p2 = {t["id"]: t["p_penalties_and_temperature"] for t in hot["tokens"]}
    a, b = [t for t in p1 if t in p2][:2]
    # softmax(logits / T): probability ratios are raised to the power 1/T
    assert p2[a] / p2[b] == pytest.approx((p1[a] / p1[b]) ** 2, rel=1e-3)
    cut = http.post("/v1/sampling/distribution", json={**body, "top_k": 3, "top_p": 0.9}).json()
    kept = [t for t in cut["tokens"] if t["removed_by"] is None]
    assert cut["kept"] == len(kept) <= 3 and sum(t["p"] for t in kept) == pytest.approx(1.0, abs=1e-5)
    assert {t["removed_by"] for t in cut["tokens"]} - {None} <= {"top_k", "top_p"}
    # one sampled step is the token the engine draws first for the same seed
    draw = {**body, "temperature": 1.0, "top_p": 0.95, "seed": 11, "sample": True}
    s1 = http.post("/v1/sampling/distribution", json=draw).json()["sampled"]
    s2 = http.post("/v1/sampling/distribution", json=draw).json()["sampled"]
    assert s1 == s2
    first = gen(http, prompt="Once upon a time", temperature=1.0, top_p=0.95, seed=11, max_new_tokens=1)
    ids = first["choices"][0]["token_ids"]
    if ids:  # (a stop token first leaves no ids)
        assert ids[0] == s1["id"]


def test_model_card_has_the_registry_tags(http, registry):
    card = http.get("/v1/model_card").json()
    assert card["version"] == str(registry["version"]) and card["alias"] == "champion"
    assert card["tags"]["lmforge.gates"] == "passed" and isinstance(card["metrics"], dict)


def test_compare_versions_side_by_side(http, registry):
    body = {"messages": [{"role": "user", "content": "What is your name?"}], "max_new_tokens": 6}
    out = http.post("/v1/compare", json={**body, "other": str(registry["version"])}).json()
    assert out["served"]["version"] == out["other"]["version"] == str(registry["version"])
    assert out["served"]["text"] == out["other"]["text"]
    reply = http.post("/generate", json={**body, "temperature": 0}).json()["choices"][0]
    assert [t["id"] for t in out["served"]["tokens"]] == reply["token_ids"]
    assert all(0 < t["p"] <= 1 for t in out["served"]["tokens"])
    r = http.post("/v1/compare", json={**body, "other": "no-such-alias"})
    assert r.status_code == 404 and "other" in r.json()["error"]["message"]


def test_nearest_tokens(http):
    r = http.get("/v1/tokens/40/nearest", params={"k": 5})
    assert r.status_code == 200
    out = r.json()
    assert out["token"]["id"] == 40 and len(out["nearest"]) == 5
    assert 40 not in [t["id"] for t in out["nearest"]]
    cos = [t["cosine"] for t in out["nearest"]]
    assert cos == sorted(cos, reverse=True)
    assert http.get("/v1/tokens/99999/nearest").status_code == 404


# --------------------------------------------------------------------------- one engine everywhere

SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
CONVERSATION = [{"role": "user", "content": "What is your name?"}]


def pyfunc_predict(registry: dict, frames: list[list[dict]], params: dict) -> list[list[dict]]:
    """The registered champion's predictions for each frame (a list of rows), loaded by
    `mlflow.pyfunc.load_model` in a subprocess."""
    return run_self(registry["tracking_uri"], "predict", json.dumps(frames), json.dumps(params))


def test_a_seeded_sampled_request_gives_the_same_text_everywhere(http, registry):
    """Issue 23: one generation engine. Temperature 0.8, top-p 0.9, seed 7: the registered model
    (pyfunc, with a `messages`-only and a `prompt`-only row), ChatEngine on the model folder, the
    native API and the OpenAI-compatible API give byte-identical text, for a conversation and for a
    raw prompt."""
    from lmforge.generation.chat import ChatEngine
    from lmforge.generation.sampling_params import SamplingParams

    n = 24
    # A `messages`-only frame and a `prompt`-only frame, as the model's docstring promises.
    (predicted_chat,), (predicted_text,) = pyfunc_predict(
        registry,
        [[{"messages": json.dumps(CONVERSATION)}], [{"prompt": PROMPT}]],
        {"max_new_tokens": n, **SEEDED},
    )
    engine = ChatEngine.from_dir(registry["root"] / "model")
    params = SamplingParams(max_new_tokens=n, **SEEDED)
    (chat_reply,) = engine.chat([CONVERSATION], params)
    (text_reply,) = engine.complete([PROMPT], params)

    native_chat = gen(http, messages=CONVERSATION, max_new_tokens=n, **SEEDED)
    native_text = gen(http, prompt=PROMPT, max_new_tokens=n, **SEEDED)
    body = {"model": MODEL_NAME, "max_tokens": n, **SEEDED}
    r = http.post("/v1/chat/completions", json={**body, "messages": CONVERSATION})
    assert r.status_code == 200, r.text
    openai_chat = r.json()["choices"][0]["message"]["content"]
    r = http.post("/v1/completions", json={**body, "prompt": PROMPT})
    assert r.status_code == 200, r.text
    openai_text = r.json()["choices"][0]["text"]

    assert chat_reply.text and text_reply.text  # something was sampled, not an empty match
    chats = [predicted_chat["text"], chat_reply.text, native_chat["choices"][0]["text"], openai_chat]
    texts = [predicted_text["text"], text_reply.text, native_text["choices"][0]["text"], openai_text]
    assert chats == [chat_reply.text] * 4, chats
    assert texts == [text_reply.text] * 4, texts
    # A different seed draws differently (the match above is not a greedy path in disguise).
    (other,) = engine.chat([CONVERSATION], SamplingParams(max_new_tokens=n, **{**SEEDED, "seed": 8}))
    assert other.text != chat_reply.text or other.token_ids != chat_reply.token_ids


if __name__ == "__main__":  # `python tests/test_service.py publish <dir>` / `predict <rows> <params>`
    if sys.argv[1:2] == ["publish"]:
        flags = sys.argv[3:]
        context = 1024 if "long-context" in flags else 64
        print(
            json.dumps(
                build_and_publish(Path(sys.argv[2]), "text-replies" in flags, "corrupt" in flags, context)
            )
        )
    elif sys.argv[1:2] == ["predict"]:
        import mlflow
        import pandas as pd

        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
        params = json.loads(sys.argv[3])
        frames = [pd.DataFrame(rows) for rows in json.loads(sys.argv[2])]
        print(json.dumps([model.predict(f, params=params).to_dict("records") for f in frames]))
