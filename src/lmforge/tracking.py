"""MLflow at the edge: where runs go, how the stages of one pipeline run are grouped.

Default store: `sqlite:///<project>/.lmforge/mlflow/mlflow.db` with artifacts beside it
(gitignored); `MLFLOW_TRACKING_URI` overrides it. Stages of one pipeline run are nested
under a parent run whose id travels in `LMFORGE_PARENT_RUN_ID` (set by `lmforge run` and
the Prefect flow) and share the tag `lmforge.pipeline_id`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.paths import project_root, state_dir

EXPERIMENT = "lmforge"
PARENT_ENV = "LMFORGE_PARENT_RUN_ID"
PIPELINE_ENV = "LMFORGE_PIPELINE_ID"


def tracking_uri() -> str:
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    return f"sqlite:///{state_dir('mlflow') / 'mlflow.db'}"


def _artifact_location() -> str:
    return (state_dir("mlflow") / "artifacts").as_uri()


def setup() -> str:
    """Point MLflow at our store and experiment; returns the experiment id."""
    import mlflow

    # Decide before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else _artifact_location()
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        exp_id = mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root or project_root(),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


ENV_TAG = "lmforge.env."


def environment_tags() -> dict[str, str]:
    """What bitwise reproducibility depends on (torch, threads, device, determinism flags) as tags."""
    from lmforge.seeding import environment

    return {f"{ENV_TAG}{k}": v for k, v in environment().items()}


def run_environment_tags(run_id: str) -> dict[str, str]:
    """The environment tags a stage's MLflow run recorded (empty when the run is not found)."""
    import mlflow

    setup()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # a metrics file from another store: lineage keeps what it can
        return {}
    return {k: v for k, v in run.data.tags.items() if k.startswith(ENV_TAG)}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def numeric(tree: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in flatten(tree).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def end_status(exc: BaseException | None) -> str:
    """The MLflow status a run ends with when `exc` (None: nothing) unwinds through it.

    KILLED when the run was cancelled: this process caught a cancel signal
    (:func:`lmforge.orchestration.process_groups.cancel_signal`), or `exc` is not an ordinary error (KeyboardInterrupt,
    SystemExit, Prefect's TerminationSignal: any BaseException that is not an Exception), or it was
    raised while handling a KeyboardInterrupt (Lightning turns Ctrl-C into `sys.exit(1)`).
    FAILED for any other exception, FINISHED for none.
    """
    from lmforge import cancellation

    if exc is None:
        return "FINISHED"
    if cancellation.cancel_signal() is not None or not isinstance(exc, Exception):
        return "KILLED"
    if any(isinstance(e, KeyboardInterrupt) for e in _chain(exc)):
        return "KILLED"
    return "FAILED"


def end_run(run_id: str, status: str) -> None:
    """End run `run_id` with `status` if it is still open.

    The active run is ended with MLflow's `end_run` (popped from its stack), even when something
    already marked it terminated behind the stack's back (Lightning's MLflow logger marks it FAILED
    on any exception, KeyboardInterrupt included). Another run is ended only while it is RUNNING: a
    run that was properly ended (`PipelineRun.finish`) keeps its status. Errors of the store are
    reported on stderr, not raised: this runs while another exception unwinds, and must not replace it.
    """
    import mlflow

    try:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status=status)
            return
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
    except Exception as err:  # the store may be gone; the exception that got us here matters more
        print(f"lmforge: could not mark MLflow run {run_id} {status}: {err}", file=sys.stderr)


@contextlib.contextmanager
def ended(run_id: str) -> Iterator[None]:
    """End run `run_id` as the block ends: FINISHED, or as :func:`end_status` says for the exception
    leaving it (which is re-raised)."""
    try:
        yield
    except BaseException as exc:
        end_run(run_id, end_status(exc))
        raise
    end_run(run_id, "FINISHED")


@contextlib.contextmanager
def stage_run(stage: str, params_tree: dict, preset: str) -> Iterator[Any]:
    """An MLflow run for one stage, nested under the pipeline's parent run when there is one.

    Ends FINISHED, FAILED on an error, KILLED when the stage is cancelled (see :func:`end_status`:
    SIGINT/SIGTERM under the CLI's cancel handlers, whatever exception they turn into).
    """
    import mlflow

    setup()
    tags = {
        "lmforge.stage": stage,
        "lmforge.preset": preset,
        "lmforge.pipeline_id": os.environ.get(PIPELINE_ENV, "adhoc"),
        "lmforge.git_commit": git_commit(),
        **environment_tags(),
    }
    run = mlflow.start_run(run_name=stage, parent_run_id=os.environ.get(PARENT_ENV), tags=tags)
    with ended(run.info.run_id):
        params = {
            k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in flatten(params_tree).items()
        }
        for chunk in range(0, len(params), 90):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(list(params.items())[chunk : chunk + 90]))
        yield run
