"""One MLflow parent run per pipeline run, shared by `lmforge run` and the Prefect flow.

Stage processes started under it get `LMFORGE_PARENT_RUN_ID` / `LMFORGE_PIPELINE_ID` in their
environment (:meth:`PipelineRun.env`), so :func:`lmforge.tracking.stage_run` nests their runs
under the parent and tags them with the pipeline id.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from lmforge import tracking


@dataclass(frozen=True)
class PipelineRun:
    run_id: str
    pipeline_id: str
    experiment_id: str
    tracking_uri: str

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) plus the variables that nest stage runs under this one."""
        return {
            **(os.environ if base is None else base),
            tracking.PARENT_ENV: self.run_id,
            tracking.PIPELINE_ENV: self.pipeline_id,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        }

    def finish(self, code: int) -> None:
        """Record the pipeline's exit code; a non-zero code ends the parent run as FAILED."""
        import mlflow

        mlflow.set_tag("lmforge.exit_code", str(code))
        if code != 0:
            mlflow.end_run(status="FAILED")


def mlflow_ui_url(ui_url: str | None = None) -> str:
    """Where the MLflow UI is: `ui_url`, `LMFORGE_MLFLOW_UI_URL`, else the tracking URI itself when it
    is an HTTP server (a local SQLite store has no UI of its own: `mlflow ui`'s default address)."""
    base = ui_url or os.environ.get("LMFORGE_MLFLOW_UI_URL") or tracking.tracking_uri()
    if not base.startswith(("http://", "https://")):
        base = "http://127.0.0.1:5000"  # what `mlflow ui --backend-store-uri <store>` serves by default
    return base.rstrip("/")


def run_link(run_id: str, experiment_id: str, ui_url: str | None = None) -> str:
    """Where to open a run: `<ui>/#/experiments/<id>/runs/<run_id>` (see :func:`mlflow_ui_url`)."""
    return f"{mlflow_ui_url(ui_url)}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_link(model_name: str, version: int, ui_url: str | None = None) -> str:
    """Where to open a registered model version: `<ui>/#/models/<name>/versions/<version>`."""
    return f"{mlflow_ui_url(ui_url)}/#/models/{model_name}/versions/{version}"


@contextlib.contextmanager
def pipeline_run(name: str = "pipeline", tags: dict[str, str] | None = None) -> Iterator[PipelineRun]:
    """Start the parent run (`<name>-<pipeline id>`) and end it as the block ends.

    FINISHED when the block ends normally (unless :meth:`PipelineRun.finish` already ended it as
    FAILED); FAILED when an error (an Exception) leaves the block; KILLED when the pipeline is
    cancelled: KeyboardInterrupt, Prefect's TerminationSignal (how Prefect cancels a flow run), or any
    other BaseException that is not an Exception, and any exception after this process caught a
    cancel signal (see :func:`lmforge.tracking.end_status`).
    """
    import mlflow

    experiment_id = tracking.setup()
    pipeline_id = uuid.uuid4().hex[:12]
    all_tags = {
        "lmforge.pipeline_id": pipeline_id,
        "lmforge.git_commit": tracking.git_commit(),
        **(tags or {}),
    }
    run = mlflow.start_run(run_name=f"{name}-{pipeline_id}", tags=all_tags)
    with tracking.ended(run.info.run_id):
        yield PipelineRun(run.info.run_id, pipeline_id, experiment_id, tracking.tracking_uri())
