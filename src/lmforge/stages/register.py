"""Stage `register`: the tuned policy into the MLflow registry behind a gated alias, with lineage."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

from lmforge import stats, tracking
from lmforge.names import FIXED_JUDGE, TOKENIZER_BOUND
from lmforge.params import SECTIONS, Params
from lmforge.registry.publish import check_gates, comparison_markdown, dvc_hashes, promotion_failures, publish
from lmforge.stages import begin, read_metrics

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


EVALUATED = ("base", "sft", "tuned")


def model_card(
    params: Params, tags: dict[str, str], evaluation: dict, failed: list[str], comparison: dict | None = None
) -> str:
    """The registered version's description: what it was made from, with what, how it scores (95%
    intervals over the held-out items) and why it got its alias."""
    lines = [
        f"# {params.registry.model_name}: the `{params.preset}` preset",
        "",
        "**Decision:** "
        + ("every gate passed." if not failed else "kept as candidate; failed gates: " + "; ".join(failed)),
        "",
        "## Evaluation (95% intervals over the held-out items)",
        "",
        "| figure | base | sft | tuned |",
        "|---|---|---|---|",
    ]
    keys = ("val_bits_per_byte", "assistant_loss", "end_of_turn_rate", "mean_reward", "mean_length")
    for key in keys:
        cells = " | ".join(stats.shown(evaluation.get(m, {}), key) for m in EVALUATED)
        lines.append(f"| {key} | {cells} |")
    rm = evaluation.get("reward_model", {})
    items = evaluation.get("items", {})
    lines += [
        "",
        f"- reward-model accuracy on {items.get('pairs', '?')} held-out pairs: {stats.shown(rm, 'accuracy')}",
        f"- reward gain of the tuned policy over SFT on {items.get('prompts', '?')} prompts (paired, scored "
        f"by this version's own reward model): {stats.shown(evaluation, 'reward_gain')}, "
        f"p = {evaluation.get('reward_gain_p', float('nan')):.3g}",
        "",
        *(
            comparison_markdown(comparison)
            if comparison
            else ["", "No champion before this version: the absolute gates alone decided.", ""]
        ),
        "## Made from",
        "",
        f"- git commit `{tags.get('lmforge.git_commit', '?')}`, seed {params.seed}, "
        f"deterministic {params.deterministic}",
        f"- params.yaml overrides: `{tags.get('lmforge.params_overrides', '{}')}`",
    ]
    lines += [
        f"- `{k.removeprefix('lmforge.dvc.')}`: DVC md5 `{v}`"
        for k, v in sorted(tags.items())
        if k.startswith("lmforge.dvc.")
    ]
    lines += [
        f"- stage run `{k.removeprefix('lmforge.run.')}`: MLflow run `{v}`"
        for k, v in tags.items()
        if k.startswith("lmforge.run.")
    ]
    return "\n".join(lines) + "\n"


def champion_comparison(params: Params, root: Path, seed: int) -> dict | None:
    """The candidate against the current champion on the same held-out items: the champion is
    downloaded from the registry and re-scored here, with today's evaluation code and data, and each
    fixed-judge figure compared item by item (paired bootstrap; McNemar's exact test for 0/1 items).
    None when there is no champion."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lmforge.evaluation import judged_items
    from lmforge.generation.chat import default_device
    from lmforge.model_folder import load_gpt
    from lmforge.stages.evaluate import ITEMS, held_out, score
    from lmforge.tokenizer import ChatTokenizer

    reg = params.registry
    try:
        version = MlflowClient().get_model_version_by_alias(reg.model_name, reg.champion_alias)
    except MlflowException:  # no such model or alias yet: the first version
        return None
    candidate = json.loads((root / ITEMS).read_text())
    data = held_out(root, params)
    if candidate["eval_set"] != data.fingerprint:
        raise ValueError(f"{ITEMS} was scored on another evaluation set; run the evaluate stage again")
    ours = (root / params.tokenizer.out_dir / "tokenizer.json").read_bytes()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # else a line per file in the log
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(f"models:/{reg.model_name}/{version.version}", dst_path=tmp)
        )
        folder = local / "artifacts" / "model_dir"
        model = load_gpt(folder).float().to(default_device())
        same_tokens = (folder / "tokenizer.json").read_bytes() == ours
        scores = score(model, ChatTokenizer.load(folder), data, params, seed)
    out: dict = {"version": int(version.version), "eval_set": data.fingerprint, "figures": {}}
    for figure in FIXED_JUDGE:
        theirs, mine = judged_items(scores, figure), candidate["tuned"][figure]
        if figure in TOKENIZER_BOUND and not same_tokens:
            out["figures"][figure] = {"comparable": 0, "why": "the champion has another tokenizer"}
        elif not mine:
            out["figures"][figure] = {"comparable": 0, "why": "no held-out items"}
        elif len(theirs) != len(mine):
            out["figures"][figure] = {"comparable": 0, "why": "the champion has another context length"}
        else:
            test = stats.paired(theirs, mine, seed=seed)
            row = {"comparable": 1, "candidate": float(np.mean(mine)), "champion": float(np.mean(theirs))}
            out["figures"][figure] = {**row, **test.fields("difference"), "test": test.test}
    return out


def run(params: Params, root: Path) -> dict:
    import mlflow

    reg = params.registry
    evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
    failed = check_gates(evaluation, reg.gates)
    comparison = None
    if reg.promotion.compare_with_champion:
        comparison = champion_comparison(params, root, begin(params, "register"))
    # The absolute gates judge every version (and alone the first); the comparison, a later one.
    refused = promotion_failures(comparison, reg.promotion) if comparison else []
    # The evaluation's figures (with their intervals) on this run: the registered version's metrics.
    mlflow.log_metrics(
        {f"eval.{k}": v for k, v in tracking.numeric(evaluation).items() if k != "stage_seconds"}
    )
    tags = lineage_tags(params, root)
    result = publish(
        root / params.rlhf.out_dir,
        model_name=reg.model_name,
        dtype=reg.dtype,
        failed_gates=failed + refused,
        tags=tags,
        description=model_card(params, tags, evaluation, failed + refused, comparison),
        champion_alias=reg.champion_alias,
        candidate_alias=reg.candidate_alias,
    )
    result["gates_passed"] = int(not failed)
    # What the registry held decides these (a re-run may meet another champion): the run record.
    result["failed_gates"] = failed
    result["champion"] = comparison or {}
    result["promotion_refused"] = refused
    return result
