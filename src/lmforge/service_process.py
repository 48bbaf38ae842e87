"""Start, wait for and stop `bentoml serve` running the chat service on 127.0.0.1.

One launcher for everything that runs the real service as a process: the tests, the load
benchmark and the `lmforge-serve` flow. Edge module (subprocess + httpx); the core never imports it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

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


def stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the whole process group (server and workers), SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
