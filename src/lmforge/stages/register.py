"""Stage `register`: the tuned policy into the MLflow registry behind a gated alias, with lineage."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmforge import tracking
from lmforge.params import SECTIONS, Params
from lmforge.registry.publish import check_gates, dvc_hashes, publish
from lmforge.stages import read_metrics

UPSTREAM = ("ingest", "tokenizer", "shards", "pretrain", "sft", "reward", "rlhf", "evaluate")
LINEAGE_PATHS = (
    "data/processed",
    "data/tokenizer",
    "data/tokens",
    "models/pretrain",
    "models/sft",
    "models/reward",
    "models/rlhf",
)


def lineage_tags(params: Params, root: Path) -> dict[str, str]:
    raw = yaml.safe_load((root / "params.yaml").read_text()) if (root / "params.yaml").is_file() else {}
    overrides = {s: raw.get(s) for s in SECTIONS if raw.get(s)}
    tags = {
        "lmforge.git_commit": tracking.git_commit(root),
        "lmforge.preset": params.preset,
        "lmforge.params_overrides": json.dumps(overrides, sort_keys=True),
        "lmforge.seed": str(params.seed),
        "lmforge.deterministic": str(params.deterministic),
    }
    tags.update({f"lmforge.dvc.{path}": md5 for path, md5 in dvc_hashes(root, LINEAGE_PATHS).items()})
    for stage in UPSTREAM:
        if run_id := read_metrics(root, stage).get("mlflow_run_id"):
            tags[f"lmforge.run.{stage}"] = run_id
    # The environment the registered weights were trained in (the rlhf run's), else this one's.
    rlhf_run = tags.get("lmforge.run.rlhf")
    tags.update((rlhf_run and tracking.run_environment_tags(rlhf_run)) or tracking.environment_tags())
    return tags


def run(params: Params, root: Path) -> dict:
    reg = params.registry
    evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
    failed = check_gates(evaluation, reg.gates)
    result = publish(
        root / params.rlhf.out_dir,
        model_name=reg.model_name,
        dtype=reg.dtype,
        failed_gates=failed,
        tags=lineage_tags(params, root),
        champion_alias=reg.champion_alias,
        candidate_alias=reg.candidate_alias,
    )
    result["gates_passed"] = int(not failed)
    return result
