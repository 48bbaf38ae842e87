"""Pipeline stages: each module is a short recipe `run(params, root) -> metrics` over the core.

`execute` wraps a recipe with what every stage does the same way: an MLflow run (nested in
the pipeline's parent run), params and metrics logged, and `metrics/<stage>.json` written
for DVC.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

from lmforge.params import Params

STAGES = ("ingest", "tokenizer", "shards", "pretrain", "sft", "reward", "rlhf", "evaluate", "register")
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
    """A non-zero rank of a distributed launch: it trains, but only rank 0 tracks and writes."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0


class StageError(RuntimeError):
    """A stage stopped for a reason the user must act on (the message says what and where)."""


def write_metrics(root: Path, stage: str, metrics: dict) -> Path:
    path = root / "metrics" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def execute(stage: str, params: Params, root: Path) -> dict:
    """Run one stage as an MLflow-tracked step and write its DVC metrics file."""
    import mlflow

    from lmforge import tracking

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    recipe = importlib.import_module(f"lmforge.stages.{stage}")
    if is_worker_rank():
        return recipe.run(params, root)
    tree = {s: params.section(s).model_dump(mode="json", by_alias=True) for s in STAGE_SECTIONS[stage]}
    with tracking.stage_run(stage, tree, params.preset) as run:
        start = time.perf_counter()
        metrics = recipe.run(params, root)
        metrics["stage_seconds"] = round(time.perf_counter() - start, 3)
        # The registry's lineage tags read which MLflow run produced each stage's outputs.
        metrics["mlflow_run_id"] = run.info.run_id
        mlflow.log_metrics(tracking.numeric(metrics))
        path = write_metrics(root, stage, metrics)
        mlflow.log_artifact(str(path))
    return metrics
