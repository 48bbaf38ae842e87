"""Start, wait for and stop `bentoml serve` running the chat service on 127.0.0.1.

One launcher for everything that runs the real service as a process: the tests, the load
benchmark and the `lmforge-serve` flow. Edge module (subprocess + httpx); the core never imports it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from lmforge.orchestration import process_groups

SERVICE = "services.service:LmforgeService"


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time."""


def start(
    port: int,
    *,
    env: Mapping[str, str],
    cwd: str | Path,
    stdout: int | IO | None,
    bentoml: str | Path = "bentoml",
    working_dir: str | Path | None = None,
    text: bool = False,
) -> subprocess.Popen:
    """`bentoml serve` on 127.0.0.1:<port> in its own process group (so `stop` reaches its workers)."""
    cmd = [str(bentoml), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]
    if working_dir is not None:
        cmd += ["--working-dir", str(working_dir)]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=dict(env),
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=text,
        errors="replace" if text else None,
    )


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll `<url>/readyz` until 200; raise ServiceStartError if the process exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise ServiceStartError(f"bentoml serve exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServiceStartError(f"{url}/readyz not ready after {timeout_s:g} s")
        time.sleep(poll_s)


def stop(proc: subprocess.Popen, grace_s: float = 20, groups: set[int] | None = None) -> float:
    """SIGTERM the server's process group: the arbiter stops its workers, each worker its engine.
    Wait until the server and every process of its workers' groups (circus starts each worker in a
    session of its own) are gone; past ``grace_s``, SIGKILL all of those groups, so that no worker
    is left orphaned. ``groups`` adds groups known from before (a worker whose arbiter already
    exited). Returns the seconds it took."""
    started = time.monotonic()
    groups = {proc.pid, *(groups or ()), *process_groups.groups_below(proc.pid)}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = started + grace_s
    while proc.poll() is None or any(process_groups.group_alive(g) for g in groups):
        if time.monotonic() > deadline:
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            proc.wait(10)
            break
        time.sleep(0.05)
    return time.monotonic() - started
