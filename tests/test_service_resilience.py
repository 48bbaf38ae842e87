"""The real service when its engine process dies, wedges or cannot come back (issue 22).

`bentoml serve` runs on the tiny registered model of tests/test_service.py. The engine process's pid
is read from ``/info``; the tests kill (SIGKILL) or freeze (SIGSTOP) it and check what a client and
an orchestrator see: in-flight requests end with an error that says so, new ones are served again
after an automatic restart, ``/readyz`` and ``/livez`` tell the truth, ``/metrics`` counts the restart,
and SIGTERM stops the server, leaving no process behind, within the grace period plus 10 s.

The chaos test prints its figures (recovery time, in-flight outcomes, shutdown time); they are
recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from conftest import wait_for
from lmforge.orchestration import bento_service, process_groups
from test_service import BIN, REPO, free_port, registry, service_env  # noqa: F401  (module fixture)

pytestmark = pytest.mark.slow

GRACE_S = 2.0
SHUTDOWN_BOUND_S = GRACE_S + 10  # the bound: the grace period plus 10 s


# --------------------------------------------------------------------------- a server we can stop ourselves


class Server:
    def __init__(self, registry: dict, name: str, **env: str) -> None:  # noqa: F811
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = registry["root"] / f"{name}.log"
        environment = {
            **service_env(registry),
            "BENTOML_HOME": str(registry["root"] / f"bentoml-{name}"),
            "LMFORGE_SHUTDOWN_GRACE_S": str(GRACE_S),
            "LMFORGE_ENGINE_RESTART_BACKOFF_S": "0.2",
            **env,
        }
        with open(self.log_path, "w") as log:
            self.proc = bento_service.start(
                self.port, env=environment, cwd=REPO, stdout=log, bentoml=BIN / "bentoml", working_dir=REPO
            )
        self.known: set[int] = set()
        try:
            bento_service.wait_ready(self.proc, self.url, timeout_s=120)
        except bento_service.ServiceStartError as err:
            self.kill()
            pytest.fail(f"{err}:\n{self.log()}")
        self.known = self.groups()  # kept: once the arbiter is gone its workers are no longer below it

    def log(self) -> str:
        return Path(self.log_path).read_text()[-6000:]

    def engine(self) -> dict:
        return httpx.get(f"{self.url}/info", timeout=10).json()["engine"]

    def status(self, path: str) -> int:
        try:
            return httpx.get(f"{self.url}{path}", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def groups(self) -> set[int]:
        """The process groups of the server and everything under it (each BentoML worker runs in a
        session of its own, its engine process in the worker's group)."""
        return {self.proc.pid, *self.known, *process_groups.groups_below(self.proc.pid)}

    def terminate(self) -> float:
        """SIGTERM the server; seconds until it and every process of its groups are gone. Fails
        when that takes past the bound (the processes are SIGKILLed first)."""
        groups = self.groups()
        assert len(groups) >= 2, f"no worker found under the server: {groups}"
        took = bento_service.stop(self.proc, grace_s=SHUTDOWN_BOUND_S + 10, groups=groups)
        left = [g for g in groups if process_groups.group_alive(g)]
        assert not left, f"process groups {left} still alive after SIGTERM and SIGKILL:\n{self.log()}"
        return took

    def kill(self) -> None:
        for group in self.groups():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def serving(registry: dict, name: str, **env: str):  # noqa: F811
    server = Server(registry, name, **env)
    try:
        yield server
    finally:
        server.kill()


def generate(url: str, **body) -> httpx.Response:
    body = {"prompt": "Once upon a time", "max_new_tokens": 3, "temperature": 0, **body}
    return httpx.post(f"{url}/generate", json=body, timeout=60)


def stream_outcome(url: str, body: dict, outcomes: list, index: int) -> None:
    """One streamed chat completion: 'completed', 'error:<code>', or 'http:<status>'."""
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=90) as r:
            if r.status_code != 200:
                r.read()
                outcomes[index] = f"http:{r.status_code}"
                return
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        outcomes[index] = f"transport:{type(exc).__name__}"
        return
    if not events or events[-1] != "[DONE]":
        outcomes[index] = "unterminated"
        return
    errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
    outcomes[index] = f"error:{errors[0]['code']}" if errors else "completed"


def start_streams(url: str, body: dict, count: int) -> tuple[list[threading.Thread], list]:
    """``count`` streams on threads; each one's outcome lands in the returned list."""
    outcomes: list = [None] * count
    threads = [threading.Thread(target=stream_outcome, args=(url, body, outcomes, i)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, outcomes


def join_all(threads: list[threading.Thread], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in threads)


# --------------------------------------------------------------------------- tests


def test_killed_engine_restarts_health_tells_the_truth_and_metrics_count_it(registry):  # noqa: F811
    with serving(registry, "restart") as server:
        first = server.engine()
        assert first["state"] == "running" and first["restarts"] == 0
        os.kill(first["pid"], signal.SIGKILL)
        # Not ready while no engine can serve; alive all along (it can recover).
        wait_for(lambda: server.status("/readyz") == 503, 10, "/readyz to answer 503", poll_s=0.01)
        assert server.status("/livez") == 200
        # A request now waits for the new engine (within its timeout) and is answered.
        r = generate(server.url)
        assert r.status_code == 200, r.text
        wait_for(lambda: server.status("/readyz") == 200, 30, "/readyz to answer 200 again")
        engine = server.engine()
        assert engine["pid"] != first["pid"] and engine["restarts"] == 1 and engine["state"] == "running"
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'lmforge_engine_restarts_total{cause="SIGKILL"} 1.0' in metrics, metrics[-3000:]
        assert "engine process" in server.log() and "was killed by SIGKILL" in server.log()
        assert server.terminate() < SHUTDOWN_BOUND_S


def test_an_engine_that_cannot_come_back_fails_liveness_and_sigterm_still_stops(registry):  # noqa: F811
    with serving(registry, "dead", LMFORGE_ENGINE_MAX_RESTARTS="0") as server:
        os.kill(server.engine()["pid"], signal.SIGKILL)
        wait_for(lambda: server.status("/livez") == 503, 20, "/livez to answer 503")
        assert server.status("/readyz") == 503
        r = generate(server.url)
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert r.json()["error"]["code"] == "unavailable"
        took = server.terminate()
        print(f"\nSIGTERM with a dead engine: every process gone in {took:.2f} s")
        assert took < SHUTDOWN_BOUND_S


def test_sigterm_with_a_wedged_engine_ends_its_streams_and_every_process(registry):  # noqa: F811
    with serving(registry, "wedged", LMFORGE_ENGINE_STALL_S="0") as server:
        pid = server.engine()["pid"]
        os.kill(pid, signal.SIGSTOP)  # alive, answers nothing
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30, "stream": True}
        threads, outcomes = start_streams(server.url, body, 2)
        wait_for(lambda: server.engine()["in_flight"] == 2, 30, "both streams to reach the engine")
        took = server.terminate()
        assert join_all(threads, 30), "a stream never ended"
        print(f"\nSIGTERM with a wedged engine: every process gone in {took:.2f} s; streams: {outcomes}")
        assert took < SHUTDOWN_BOUND_S
        assert outcomes == ["error:shutdown"] * 2, outcomes


def test_chaos_kill_9_under_16_streams(registry):  # noqa: F811
    """kill -9 the engine while 16 streams are in flight: every stream ends (an error event, never a
    hang), a new request is answered within 30 s, SIGTERM leaves no process behind."""
    with serving(registry, "chaos") as server:
        pid = server.engine()["pid"]
        body = {
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 50,
            "stream": True,
        }
        # Freeze the engine first, so that all 16 are surely in flight (admitted, not finished) at the kill.
        os.kill(pid, signal.SIGSTOP)
        threads, outcomes = start_streams(server.url, body, 16)
        wait_for(lambda: server.engine()["in_flight"] == 16, 30, "all 16 streams to reach the engine")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert join_all(threads, 60), "a stream never ended"
        ended_s = time.monotonic() - killed

        def answered() -> bool:
            try:
                return generate(server.url).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answered, 30, "a new request to be answered", poll_s=0.1)
        recovery_s = time.monotonic() - killed
        counts = Counter(outcomes)
        engine = server.engine()
        shutdown_s = server.terminate()
        print(
            f"\nchaos: 16 streams in flight, engine SIGKILLed; outcomes {dict(counts)}; all streams ended "
            f"{ended_s:.2f} s after the kill; a new request answered {recovery_s:.2f} s after it; "
            f"restarts {engine['restarts']}; SIGTERM: every process gone in {shutdown_s:.2f} s"
        )
        assert counts == Counter({"error:engine_died": 16}), counts
        assert recovery_s < 30
        assert engine["restarts"] == 1
        assert shutdown_s < SHUTDOWN_BOUND_S


def engine_processes(server: Server) -> list[int]:
    """Engine processes (multiprocessing spawn children running the engine) under the server."""
    import psutil

    found = []
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(proc.cmdline())
            if "spawn_main" in cmd and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def test_two_http_workers_share_one_engine_and_heal_together(registry):  # noqa: F811
    """LMFORGE_HTTP_WORKERS=2: two web processes, one engine process (owned by the first worker);
    concurrent requests to both get the same greedy reply; a killed engine is restarted by its owner
    and both workers serve again; SIGTERM stops every process."""
    with serving(registry, "workers", LMFORGE_HTTP_WORKERS="2") as server:
        wait_for(lambda: len(engine_processes(server)) == 1, 30, "one engine process")
        (pid,) = engine_processes(server)
        want = generate(server.url).json()["choices"][0]["text"]
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as fresh:  # a new connection each
            infos = [fresh.get(f"{server.url}/info", timeout=10).json()["engine"] for _ in range(12)]
        assert {i["pid"] for i in infos} == {pid}  # both workers report the one engine

        def burst() -> list[httpx.Response]:
            out: list[httpx.Response] = [None] * 16  # type: ignore[list-item]

            def one(k: int) -> None:
                with httpx.Client() as client:
                    out[k] = client.post(
                        f"{server.url}/generate",
                        json={"prompt": "Once upon a time", "max_new_tokens": 3, "temperature": 0},
                        timeout=60,
                    )

            threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            return out

        replies = burst()
        assert [r.status_code for r in replies] == [200] * 16
        assert {r.json()["choices"][0]["text"] for r in replies} == {want}
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: len(engine_processes(server)) == 1 and engine_processes(server) != [pid],
            30,
            "a new engine",
        )
        replies = burst()  # answered by both workers, on the restarted engine
        assert [r.status_code for r in replies] == [200] * 16, [
            r.text for r in replies if r.status_code != 200
        ]
        assert {r.json()["choices"][0]["text"] for r in replies} == {want}
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'lmforge_engine_restarts_total{cause="SIGKILL"} 1.0' in metrics, metrics[-3000:]
        log = Path(server.log_path).read_text()
        assert "shared by 2 HTTP workers (started by this worker)" in log
        assert "shared by 2 HTTP workers (started by another worker" in log
        assert server.terminate() < SHUTDOWN_BOUND_S
