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

STAGES = ("ingest", "tokenizer", "shards", "pretrain")
# Which params sections each stage reads (also what dvc.yaml declares as its params).
STAGE_SECTIONS = {
    "ingest": ("ingest",),
    "tokenizer": ("tokenizer",),
    "shards": ("tokenizer",),
    "pretrain": ("model", "pretrain"),
}


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
    tree = {s: params.section(s).model_dump(mode="json", by_alias=True) for s in STAGE_SECTIONS[stage]}
    with tracking.stage_run(stage, tree, params.preset):
        start = time.perf_counter()
        metrics = recipe.run(params, root)
        metrics["stage_seconds"] = round(time.perf_counter() - start, 3)
        mlflow.log_metrics(tracking.numeric(metrics))
        path = write_metrics(root, stage, metrics)
        mlflow.log_artifact(str(path))
    return metrics
