"""Pipeline stages: each module is a short recipe `run(params, root) -> metrics` over the core.

`execute` wraps a recipe with what every stage does the same way: an MLflow run (nested in
the pipeline's parent run), params and metrics logged, and `metrics/<stage>.json` written
for DVC.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from lmforge.params import Params

STAGES = ("ingest", "tokenizer", "shards", "pretrain", "sft", "reward", "rlhf", "evaluate", "register")
TRAINING_STAGES = ("pretrain", "sft", "reward", "rlhf")  # the stages that fit a model (and draw its curves)
# Which params sections each stage reads (also what dvc.yaml declares as its params).
STAGE_SECTIONS = {
    "ingest": ("ingest",),
    "tokenizer": ("tokenizer",),
    "shards": ("tokenizer",),
    "pretrain": ("model", "pretrain"),
    "sft": ("sft",),
    "reward": ("reward",),
    "rlhf": ("rlhf",),
    "evaluate": ("evaluate",),
    "register": ("registry",),
}


def is_worker_rank() -> bool:
    """A non-zero rank of a distributed launch (torchrun, srun, Lightning's launcher on any node):
    it trains, but only rank 0 of the whole job tracks and writes
    (:func:`lmforge.training.distributed.is_global_zero`)."""
    from lmforge.training.distributed import is_global_zero

    return not is_global_zero()


class StageError(RuntimeError):
    """A stage stopped for a reason the user must act on (the message says what and where)."""


def begin(params: Params, stage: str) -> int:
    """What every stage does first: deterministic kernels as params say, then seed every global
    generator with the stage's seed, so nothing drawn later depends on what ran before. Returns the seed.
    """
    from lmforge import seeding

    seeding.use_deterministic(params.deterministic)
    return seeding.seed_everything(params.stage_seed(stage))


# Fields that differ between two runs of the same inputs: wall-clock figures and tracking ids (a
# registry version counts the store's earlier versions), and what the registry's state decides (the
# comparison with whichever champion the store holds, hence the alias). They go to the run record
# `metrics/runs/<stage>.json` and MLflow, not to the DVC metrics file `metrics/<stage>.json`, so a
# re-run on the same inputs leaves that file, and dvc.lock, byte-identical.
RUN_RECORD_KEYS = frozenset(
    {"mlflow_run_id", "version", "alias", "model_uri", "champion", "promotion_refused"}
)


def is_run_record_key(key: str) -> bool:
    return key in RUN_RECORD_KEYS or key.endswith(("seconds", "per_second"))


def write_metrics(root: Path, stage: str, metrics: dict) -> Path:
    """`metrics/<stage>.json` (reproducible fields) and `metrics/runs/<stage>.json` (the run record)."""
    from lmforge.atomic import atomic_write_text

    stable = {k: v for k, v in metrics.items() if not is_run_record_key(k)}
    record = {k: v for k, v in metrics.items() if is_run_record_key(k)}
    atomic_write_text(
        root / "metrics" / "runs" / f"{stage}.json", json.dumps(record, indent=2, sort_keys=True) + "\n"
    )
    return atomic_write_text(
        root / "metrics" / f"{stage}.json", json.dumps(stable, indent=2, sort_keys=True) + "\n"
    )


def read_metrics(root: Path, stage: str) -> dict:
    """A stage's metrics with its run record merged in ({} when the stage has not run)."""
    out: dict = {}
    for path in (root / "metrics" / f"{stage}.json", root / "metrics" / "runs" / f"{stage}.json"):
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out


def execute(stage: str, params: Params, root: Path) -> dict:
    """Run one stage as an MLflow-tracked step and write its DVC metrics file."""
    import mlflow

    from lmforge import tracking

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    recipe = importlib.import_module(f"lmforge.stages.{stage}")
    begin(params, stage)
    if is_worker_rank():
        return recipe.run(params, root)
    tree = {s: params.section(s).model_dump(mode="json", by_alias=True) for s in STAGE_SECTIONS[stage]}
    tree["run"] = {
        "seed": params.seed,
        "stage_seed": params.stage_seed(stage),
        "deterministic": params.deterministic,
    }
    with tracking.stage_run(stage, tree, params.preset) as run:
        start = time.perf_counter()
        metrics = recipe.run(params, root)
        metrics["stage_seconds"] = round(time.perf_counter() - start, 3)
        # The registry's lineage tags read which MLflow run produced each stage's outputs.
        metrics["mlflow_run_id"] = run.info.run_id
        mlflow.log_metrics(tracking.numeric(metrics))
        path = write_metrics(root, stage, metrics)
        mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(path.parent / "runs" / path.name), artifact_path="runs")
    discard_checkpoints(root, stage)
    return metrics


def runs_dir(root: Path) -> Path:
    """Where training stages keep their checkpoints: `.lmforge/runs/<stage>[-<variant>]/checkpoints`."""
    return root / ".lmforge" / "runs"


def discard_checkpoints(root: Path, stage: str) -> None:
    """A stage that finished has its outputs: its checkpoints are only for resuming an interrupted
    run, and a later run (`dvc repro --force`) must train afresh, not resume a finished one."""
    import shutil

    for folder in (runs_dir(root) / stage, *runs_dir(root).glob(f"{stage}-*")):
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
