"""Prefect flow `lmforge-pipeline`: the whole pipeline, one Prefect task per DVC stage.

Each task runs `dvc repro --single-item <stage>` in the project root, so caching, locks and
versioning stay DVC's (an unchanged stage is skipped and says so). Before any stage runs, the
flow's `preset` and `overrides` are validated and written into params.yaml (as
`dvc exp run -S` would), so a plain `dvc repro` later reproduces the run. All stage runs nest
under one MLflow parent run. Each task publishes an artifact `lmforge-<stage>` (metrics + MLflow
run link); the last one, `lmforge-registered-model`, names the registered version and alias.

Run it from the UI: `lmforge ui` (see flows/README.md), or once, locally: `python flows/pipeline.py`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lmforge import tracking
from lmforge.orchestration import dvc_lock, process_groups
from lmforge.orchestration.overrides import apply_overrides
from lmforge.orchestration.pipeline_run import pipeline_run, run_link
from lmforge.orchestration.run_form import (
    LearningRates,
    RegistryKnobs,
    RLHFKnobs,
    Steps,
    form_overrides,
    preset_names,
)
from lmforge.orchestration.run_summary import champion_snapshot, png_markdown, summary_markdown
from lmforge.params import load_params
from lmforge.paths import project_root
from lmforge.stages import STAGES, read_metrics
from lmforge.stages.curves import loss_png

BAD_INPUT = 2  # lmforge's exit code for bad input or params: retrying cannot help
TAIL_LINES = 20


class StageFailed(RuntimeError):
    """A stage's command failed; the message carries the stage's own error (tail of its stderr)."""

    def __init__(self, stage: str, code: int, detail: str):
        self.stage, self.code, self.detail = stage, code, detail
        super().__init__(f"stage {stage!r} failed (exit code {code}): {detail}")


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for stage subprocesses: the venv's bin first on PATH, the project root pinned."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("LMFORGE_ROOT", str(project_root()))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(stream, name: str, lines: queue.Queue) -> None:
    for raw in iter(stream.readline, ""):
        # Progress bars redraw with \r: keep the last state of each physical line.
        parts = [p.strip() for p in raw.rstrip("\n").split("\r") if p.strip()]
        if parts:
            lines.put((name, parts[-1]))
    lines.put((name, None))


def run_streaming(
    cmd: list[str], cwd: Path, env: dict[str, str], log, grace_s: float = 10.0
) -> tuple[int, list[str], list[str]]:
    """Run `cmd` in its own process group, logging each stdout/stderr line as it comes.

    Returns (code, stdout, stderr tail). If this process is interrupted meanwhile (the flow run
    cancelled: Prefect raises TerminationSignal here; Ctrl-C; a crash), the whole group (`dvc repro`
    and the stage under it) gets SIGINT, so DVC releases its lock and the stage marks its MLflow
    run KILLED, then SIGTERM/SIGKILL after `grace_s`; the interruption is re-raised.
    """
    proc = process_groups.start(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        bufsize=1,
    )
    with process_groups.stopped_on_interrupt(proc, grace_s=grace_s):
        lines: queue.Queue = queue.Queue()
        threads = [
            threading.Thread(target=_pump, args=(s, n, lines), daemon=True)
            for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
        ]
        for t in threads:
            t.start()
        out: list[str] = []
        err: deque[str] = deque(maxlen=200)
        open_streams = 2
        while open_streams:
            name, line = lines.get()
            if line is None:
                open_streams -= 1
                continue
            (out if name == "stdout" else err).append(line)
            log.info(line)
        code = proc.wait()
    return code, out, list(err)


def stage_error(stage: str, stderr: list[str]) -> tuple[int | None, str]:
    """The stage's exit code (from DVC's message) and its own error text."""
    code = None
    for line in stderr:
        if m := re.search(r"exited with (-?\d+)", line):
            code = int(m.group(1))
    start = next((i for i, line in enumerate(stderr) if line.startswith(f"lmforge {stage}: error:")), None)
    tail = stderr[start:] if start is not None else stderr[-TAIL_LINES:]
    return code, "\n".join(tail[:TAIL_LINES]) or "no error output"


def dvc_status(stage: str, stdout: list[str]) -> str:
    text = "\n".join(stdout)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if f"Stage '{stage}' is cached" in text:
        return "restored from the DVC run cache"
    return "skipped (up to date)"


def _mlflow_section(run_id: str | None) -> tuple[str, str]:
    """Markdown lines for the stage's MLflow run, and its link ("" when unknown)."""
    if not run_id:
        return "MLflow run: none recorded", ""
    uri = tracking.tracking_uri()
    try:
        from mlflow import MlflowClient

        experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except Exception:  # the store may be unreachable from here; the id is still useful
        return f"MLflow run `{run_id}` (tracking URI `{uri}`)", ""
    link = run_link(run_id, experiment_id)
    return (
        f"MLflow run: [{run_id}]({link}) (experiment {experiment_id}, tracking URI `{uri}`; "
        f"local store: `mlflow ui --backend-store-uri {uri}`)"
    ), link


def _metrics_table(metrics: dict) -> str:
    rows = [(k, v) for k, v in tracking.flatten(metrics).items() if k != "mlflow_run_id"]
    lines = ["| metric | value |", "|---|---|"]
    for key, value in rows[:80]:
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        lines.append(f"| `{key}` | {text[:200].replace('|', '/')} |")
    if len(rows) > 80:
        lines.append(f"| ... | {len(rows) - 80} more in metrics file |")
    return "\n".join(lines)


def _no_retry_on_bad_input(task, task_run, state) -> bool:
    """Retry transient failures (lock held, crash), never a stage that rejected its input (exit 2)."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.code != BAD_INPUT
    except Exception:
        return True
    return True


def run_stage(stage: str, parent_run_id: str = "", pipeline_id: str = "") -> dict:
    """Reproduce one DVC stage and publish its artifact; raises StageFailed with the stage's error."""
    log = get_run_logger()
    root = project_root()
    env = stage_env(
        {tracking.PARENT_ENV: parent_run_id, tracking.PIPELINE_ENV: pipeline_id} if parent_run_id else None
    )
    cmd = ["dvc", "repro", "--single-item", stage]
    for entry in dvc_lock.clear_stale_rwlock(root):  # left by a `dvc repro` killed earlier
        log.warning("removed a stale DVC lock entry: %s", entry)
    log.info("%s (in %s)", " ".join(cmd), root)
    code, stdout, stderr = run_streaming(cmd, root, env, log)
    if code != 0:
        stage_code, detail = stage_error(stage, stderr)
        raise StageFailed(stage, stage_code if stage_code is not None else code, detail)
    status = dvc_status(stage, stdout)
    metrics = read_metrics(root, stage)
    run_id = metrics.get("mlflow_run_id")
    mlflow_line, link = _mlflow_section(run_id)
    curve = loss_png(root, stage)
    create_markdown_artifact(
        key=f"lmforge-{stage}",
        markdown="\n\n".join(
            [
                f"## Stage `{stage}`: {status}",
                mlflow_line,
                *([png_markdown(curve, f"{stage} loss curve")] if curve.is_file() else []),
                _metrics_table(metrics) if metrics else "_no metrics file_",
            ]
        ),
        description=f"lmforge stage {stage}: {status}",
    )
    log.info("stage %s: %s", stage, status)
    return {
        "stage": stage,
        "status": status,
        "mlflow_run_id": run_id,
        "mlflow_link": link,
        "metrics": metrics,
    }


STAGE_TASKS = {
    stage: task(
        run_stage,
        name=stage,
        task_run_name=stage,
        retries=1,
        retry_delay_seconds=5,
        retry_condition_fn=_no_retry_on_bad_input,
    )
    for stage in STAGES
}


@task(name="params", task_run_name="params")
def write_params(preset: str, overrides: dict[str, Any]) -> dict:
    """Validate the preset + overrides and write them into params.yaml (ParamsError fails the run)."""
    path = project_root() / "params.yaml"
    changed = apply_overrides(path, preset, overrides)
    lines = [
        f"## params.yaml: preset `{preset}`",
        f"File: `{path}`",
        "",
        "| key | old | new |",
        "|---|---|---|",
    ]
    lines += [f"| `{k}` | {json.dumps(v['old'])} | {json.dumps(v['new'])} |" for k, v in changed.items()]
    if not changed:
        lines.append("| _nothing changed_ | | |")
    create_markdown_artifact(
        key="lmforge-params",
        markdown="\n".join(lines),
        description="parameters written into params.yaml for this run",
    )
    get_run_logger().info("params.yaml: %s", json.dumps(changed) if changed else "unchanged")
    return changed


def registered_model_markdown(root: Path) -> tuple[str, dict]:
    reg = read_metrics(root, "register")
    if not reg:
        return "## Registered model\n\n_no metrics/register.json_", reg
    gates = reg.get("failed_gates") or []
    lines = [
        f"## Registered model: `{reg.get('model_name')}` version {reg.get('version')} @ `{reg.get('alias')}`",
        "",
        f"- URI: `{reg.get('model_uri', '')}`",
        f"- gates: {'all passed' if not gates else 'failed: ' + '; '.join(gates)}",
    ]
    return "\n".join(lines), reg


# The run form's choices come from the project's params.yaml (where `lmforge ui` serves from).
PRESETS = tuple(preset_names(project_root() / "params.yaml")) or ("tiny",)
Preset = Literal[PRESETS]  # type: ignore[valid-type]  # a dropdown in the UI
DEFAULT_PRESET = "tiny" if "tiny" in PRESETS else PRESETS[0]


@flow(name="lmforge-pipeline", log_prints=True)
def lmforge_pipeline(
    preset: Preset = DEFAULT_PRESET,
    steps: Steps = Steps(),  # noqa: B008 (pydantic defaults are immutable here: read only)
    learning_rates: LearningRates = LearningRates(),  # noqa: B008
    rlhf: RLHFKnobs = RLHFKnobs(),  # noqa: B008
    registry: RegistryKnobs = RegistryKnobs(),  # noqa: B008
    overrides: dict[str, Any] = {},  # noqa: B006 (read only)
) -> dict:
    """Run every lmforge stage through DVC, with this form written into params.yaml first.

    Empty fields keep what params.yaml holds; every value is validated before any stage runs.

    Args:
        preset: the scale, one of the presets in params.yaml (`tiny`: 2 CPU cores, minutes;
            `small`: one GPU, GPT-2-124M class).
        steps: optimizer steps per training stage.
        learning_rates: peak learning rate per training stage.
        rlhf: the policy-tuning algorithm and its KL coefficient.
        registry: the registered weights' dtype and the evaluation gates; the new version becomes
            champion only when every gate passes.
        overrides: any other params key, e.g. {"model.n_layer": 6, "seed": 7}; an unknown key or
            a wrong type fails the run at once, naming the key.
    """
    from prefect.runtime import flow_run

    root = project_root()
    merged = form_overrides(
        steps=steps,
        learning_rates=learning_rates,
        rlhf=rlhf,
        registry=registry,
        overrides=dict(overrides or {}),
    )
    changed = write_params(preset, merged)
    registered = load_params(root / "params.yaml").registry
    champion = champion_snapshot(registered.model_name, registered.champion_alias)
    results: dict[str, Any] = {}
    tags = {
        "lmforge.orchestrator": "prefect",
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "lmforge.preset": preset,
        "lmforge.overrides": json.dumps(merged, sort_keys=True)[:5000],
    }
    with pipeline_run(tags=tags) as parent:
        print(f"lmforge: pipeline {parent.pipeline_id} (MLflow parent run {parent.run_id}) in {root}")
        for stage in STAGES:
            results[stage] = STAGE_TASKS[stage](stage, parent.run_id, parent.pipeline_id)
    markdown, reg = registered_model_markdown(root)
    create_markdown_artifact(
        key="lmforge-registered-model",
        markdown=markdown,
        description=f"{reg.get('model_name')} v{reg.get('version')} @ {reg.get('alias')}",
    )
    summary = summary_markdown(
        root,
        champion,
        parent_run_id=parent.run_id,
        experiment_id=parent.experiment_id,
        stage_status={s: r["status"] for s, r in results.items()},
        stage_links={s: r["mlflow_link"] for s, r in results.items()},
    )
    create_markdown_artifact(
        key="lmforge-summary",
        markdown=summary,
        description=summary.splitlines()[2].replace("**", "")[:500],
    )
    return {
        "params_changed": changed,
        "mlflow_parent_run_id": parent.run_id,
        "stages": {s: r["status"] for s, r in results.items()},
        "registered": reg,
        "champion_before": champion.version,
    }


if __name__ == "__main__":
    lmforge_pipeline()
