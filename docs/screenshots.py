"""Screenshots of the Prefect UI for the README: the pipeline's run form and a run's summary artifact.

    .venv/bin/python docs/screenshots.py            # writes docs/images/prefect-run-form.png, prefect-summary.png

It copies this checkout (sources, params, DVC outputs and cache, the MLflow store: run `make pipeline`
first) into a temporary folder, starts a Prefect server on a free 127.0.0.1 port and serves the flows
from the copy, fills the run form in headless Chromium (`rlhf.algorithm = dpo`), runs it (DVC re-runs
rlhf, evaluate and register, about 3 minutes on 2 cores) and photographs the summary artifact, which
compares the DPO-tuned version with the champion. Nothing in the checkout changes except the images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")
COPY = (
    "params.yaml",
    "dvc.yaml",
    "dvc.lock",
    "src",
    "flows",
    "data",
    "models",
    "plots",
    "metrics",
    "reports",
)
FORM = {"rlhf": {"algorithm": "dpo"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_checkout(dest: Path) -> Path:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "vendor")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    shutil.copytree(ROOT / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp"))
    mlflow = ROOT / ".lmforge" / "mlflow"
    if not (mlflow / "mlflow.db").is_file():
        sys.exit("docs/screenshots.py: no MLflow store in .lmforge/mlflow: run `make pipeline` first")
    shutil.copytree(mlflow, dest / ".lmforge" / "mlflow")
    subprocess.run([BIN / "dvc", "config", "--local", "core.no_scm", "true"], cwd=dest, check=True)
    return dest


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"docs/screenshots.py: process exited before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"docs/screenshots.py: {url} did not answer in {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmforge-shots-") as tmp:
        root = copy_checkout(Path(tmp) / "proj")
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LMFORGE_"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env['PATH']}",
            PREFECT_HOME=str(Path(tmp) / "prefect"),
            PREFECT_API_URL=api,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            LMFORGE_ROOT=str(root),
            TOKENIZERS_PARALLELISM="false",
            PREFECT_RUNNER_POLL_FREQUENCY="1",
        )
        procs = []
        try:
            log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 (closed with the folder)
            procs.append(
                subprocess.Popen(
                    [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            wait_http(f"{api}/health", 300, procs[0])
            procs.append(
                subprocess.Popen(
                    [sys.executable, ROOT / "flows" / "deployments.py"],
                    cwd=root,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            wait_http(f"{api}/deployments/name/lmforge-pipeline/local", 120, procs[1])
            os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=env["PREFECT_HOME"])
            shoot(api, args.out)
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)


def shoot(api: str, out: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.deployments import run_deployment

    ui = api.removesuffix("/api")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("lmforge-pipeline/local")
    photograph(
        f"{ui}/deployments/deployment/{deployment.id}/run",
        "RLHF learning rate",
        out / "prefect-run-form.png",
        1900,
    )
    # Outside playwright's sync API: it runs an event loop in this thread, and Prefect's sync calls
    # would then return coroutines.
    run = run_deployment("lmforge-pipeline/local", parameters=FORM, timeout=1200)
    if not run.state.is_completed():
        sys.exit(f"docs/screenshots.py: the run ended {run.state.name}: {run.state.message}")
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmforge-summary"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
        )
    photograph(
        f"{ui}/artifacts/artifact/{artifact.id}", "Key metrics", out / "prefect-summary.png", 1000, full=True
    )


def photograph(url: str, wait_for_text: str, path: Path, height: int, full: bool = False) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": height}, device_scale_factor=1)
        page.goto(url, wait_until="networkidle")
        page.get_by_text(wait_for_text, exact=False).first.wait_for()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(path), full_page=full)
        browser.close()
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
