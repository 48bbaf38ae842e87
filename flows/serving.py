"""Prefect flow `lmforge-serve`: serve the current champion with BentoML until cancelled.

Starts `bentoml serve services.service:LmforgeService --host 127.0.0.1 --port <port>` in the project
root on `models:/<model_name>@<alias>`, waits for `/readyz`, publishes an artifact with the URL and
the served version, then keeps running (logs streamed) until the server exits, `run_for_s` passes
(0: forever) or the flow run is cancelled from the UI (the server is stopped with it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from lmforge import tracking
from lmforge.orchestration import bento_service
from lmforge.paths import project_root
from lmforge.registry import MODEL_NAME, aliases


def _stream(proc: subprocess.Popen, log) -> None:
    for line in iter(proc.stdout.readline, ""):
        if line.strip():
            log.info(line.rstrip())


@flow(name="lmforge-serve", log_prints=True)
def lmforge_serve(
    port: int = 3000,
    alias: str = aliases.CHAMPION,
    model_name: str = MODEL_NAME,
    ready_timeout_s: int = 600,
    run_for_s: int = 0,
) -> dict:
    """Serve `model_name@alias` on http://127.0.0.1:<port> (long-running; cancel the run to stop)."""
    log = get_run_logger()
    root = project_root()
    version = aliases.current_version(model_name, alias)
    if version is None:
        raise RuntimeError(
            f"no version of {model_name!r} holds the alias {alias!r}: run the pipeline or promote one"
        )
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "LMFORGE_MODEL_NAME": model_name,
        "LMFORGE_MODEL_ALIAS": alias,
        "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
        "LMFORGE_ROOT": str(root),
    }
    env.setdefault("BENTOML_HOME", str(root / ".lmforge" / "bentoml"))
    log.info(
        "bentoml serve %s on 127.0.0.1:%s (in %s), %s@%s = version %s",
        bento_service.SERVICE,
        port,
        root,
        model_name,
        alias,
        version,
    )
    proc = bento_service.start(port, env=env, cwd=root, stdout=subprocess.PIPE, text=True)
    threading.Thread(target=_stream, args=(proc, log), daemon=True).start()

    # Cancelling the run: Prefect turns its SIGTERM into an exception here, and `finally` stops the
    # server's process group (its own session, so the signal aimed at this process misses it).
    url = f"http://127.0.0.1:{port}"
    try:
        bento_service.wait_ready(proc, url, timeout_s=ready_timeout_s, poll_s=1)
        create_markdown_artifact(
            key="lmforge-serve",
            markdown="\n".join(
                [
                    f"## Serving `{model_name}@{alias}` (version {version})",
                    "",
                    f"- URL: {url} (OpenAI-style routes, `/readyz`, `/metrics`)",
                    f"- model URI: `models:/{model_name}@{alias}`",
                    f"- tracking URI: `{tracking.tracking_uri()}`",
                ]
            ),
            description=f"{url}: {model_name} v{version} @ {alias}",
        )
        log.info("serving %s v%s at %s", model_name, version, url)
        end = time.monotonic() + run_for_s if run_for_s > 0 else None
        while proc.poll() is None and (end is None or time.monotonic() < end):
            time.sleep(1)
        code = proc.poll()
        if code not in (None, 0):
            raise RuntimeError(f"bentoml serve exited with code {code}")
    finally:
        bento_service.stop(proc, grace_s=30)
    return {"url": url, "model_name": model_name, "alias": alias, "version": version}


if __name__ == "__main__":
    lmforge_serve()
