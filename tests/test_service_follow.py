"""Replicas that follow the registry (issue 26): two real BentoML servers on 127.0.0.1 with
LMFORGE_FOLLOW_ALIAS_S set serve the version the alias names when it moves, a stream begun before
the move finishes whole, the playground open in a browser shows the new version, and a version whose
load fails leaves the old one serving, said in the log and in /metrics."""

from __future__ import annotations

import contextlib
import json
import re
import time

import httpx
import pytest
from playwright.sync_api import sync_playwright

from test_playground import CHROMIUM
from test_service import MODEL_NAME, run_self, running_server

CHAT = {"messages": [{"role": "user", "content": "the quick brown fox"}], "temperature": 0, "max_tokens": 12}


def served_version(http: httpx.Client) -> str:
    return http.get("/info").json()["version"]


def wait_for(what: str, check, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def reply(http: httpx.Client) -> str:
    body = http.post("/v1/chat/completions", json=CHAT)
    assert body.status_code == 200, body.text
    return body.json()["choices"][0]["message"]["content"]


def failed_reloads(http: httpx.Client) -> float:
    found = re.search(
        r'^lmforge_model_reloads_total\{outcome="failed"\} (\S+)$', http.get("/metrics").text, re.M
    )
    return float(found.group(1)) if found else 0.0


@pytest.mark.slow
def test_two_replicas_follow_the_alias_and_a_failed_load_keeps_the_old_version(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_self(uri, "publish", str(tmp_path / "v1"))
    registry = {**first, "root": tmp_path, "tracking_uri": uri}
    follow = {"LMFORGE_FOLLOW_ALIAS_S": "0.5"}
    with (
        contextlib.ExitStack() as stack,
        running_server(registry, "a", **follow) as url_a,
        running_server(registry, "b", **follow) as url_b,
        httpx.Client(base_url=url_a, timeout=60) as a,
        httpx.Client(base_url=url_b, timeout=60) as b,
    ):
        v1 = str(first["version"])
        assert served_version(a) == served_version(b) == v1
        old_reply = reply(a)
        browser = stack.enter_context(sync_playwright()).chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"]
        )
        page = browser.new_page()
        page.goto(url_a + "/")
        page.wait_for_selector("#chips .chip")
        assert f"version {v1} (alias champion)" in page.inner_text("#model-line")

        # A stream begun on version 1; the alias moves while it is open.
        stream = {**CHAT, "stream": True, "max_tokens": 40}
        with a.stream("POST", "/v1/chat/completions", json=stream) as response:
            lines = response.iter_lines()
            head = next(line for line in lines if line.startswith("data: "))
            v2 = str(run_self(uri, "publish", str(tmp_path / "v2"), "text-replies")["version"])
            wait_for("both replicas on version 2", lambda: served_version(a) == served_version(b) == v2)
            events = [head, *(line for line in lines if line.startswith("data: "))]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        # From now on both serve version 2: another model, the same reply on each replica.
        new_reply = reply(a)
        assert new_reply == reply(b) != old_reply
        for http in (a, b):
            assert http.get(f"/v1/models/{MODEL_NAME}").json()["version"] == v2
        # The open page says so without a reload (it asks /info every 3 s).
        page.wait_for_function(
            f"document.querySelector('#model-line').innerText.includes('Now serving version {v2} (was {v1})')",
            timeout=15_000,
        )
        browser.close()

        # The alias moves to a version whose weights do not load: version 2 keeps serving.
        v3 = str(run_self(uri, "publish", str(tmp_path / "v3"), "corrupt")["version"])
        wait_for("a failed reload in /metrics", lambda: failed_reloads(a) >= 1)
        assert served_version(a) == v2 and reply(a) == new_reply
        assert a.get("/readyz").status_code == 200
    log = (tmp_path / "a.log").read_text()
    assert f"loading version {v3} failed, still serving {v2}" in log
    assert f"now serving version {v2}" in log
