"""Log the tuned chat model to MLflow, register a new version, gate its alias, tag its lineage.

`champion` moves only when every evaluation gate passes; otherwise the version gets the
`candidate` alias and the failed gates are recorded as tags. The version's tags alone say
how to reproduce it: git commit, DVC hashes of data/tokenizer/weights, preset and
overrides, and the MLflow run id of every upstream stage.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from lmforge.model_folder import TOKENIZER, WEIGHTS
from lmforge.names import FIXED_JUDGE
from lmforge.params import Gates, Promotion
from lmforge.registry import CANDIDATE, CHAMPION

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SAMPLING_DEFAULTS = {
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "seed": -1,
}


# What the registered model imports to load and serve (the pyfunc, lmforge.generation.chat and its closure;
# tests/test_layering.py checks that nothing else is needed). lmforge itself travels as code_paths.
SERVING_DISTRIBUTIONS = ("torch", "tokenizers", "safetensors", "numpy", "pandas", "mlflow")


def serving_requirements() -> list[str]:
    """`SERVING_DISTRIBUTIONS` pinned to the versions this model was trained and tested with."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in SERVING_DISTRIBUTIONS]


GATE_CHECKS = (  # (gate field, evaluation key, comparison)
    ("min_reward_gain", "reward_gain", ">="),
    ("max_val_bits_per_byte", "tuned.val_bits_per_byte", "<="),
    ("min_reward_accuracy", "reward_model.accuracy", ">="),
    ("min_end_of_turn_rate", "tuned.end_of_turn_rate", ">="),
)


def gate_results(evaluation: dict, gates: Gates) -> list[dict]:
    """Each gate as {gate, metric, op, bound, value, passed, reason} (value None: missing)."""
    rows = []
    for field, key, op in GATE_CHECKS:
        node: object = evaluation
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value, bound = node, getattr(gates, field)
        if value is None:
            passed, reason = False, f"{key} missing from the evaluation"
        else:
            passed = value >= bound if op == ">=" else value <= bound
            reason = f"{key}={value:.4g} {'passes' if passed else 'fails'} {op} {bound:g}"
        rows.append(
            {
                "gate": field,
                "metric": key,
                "op": op,
                "bound": bound,
                "value": value,
                "passed": passed,
                "reason": reason,
            }
        )
    return rows


def check_gates(evaluation: dict, gates: Gates) -> list[str]:
    """Failed gates as readable reasons (empty list: all passed)."""
    return [row["reason"] for row in gate_results(evaluation, gates) if not row["passed"]]


def promotion_failures(comparison: dict, promotion: Promotion) -> list[str]:
    """Why a candidate may not replace the champion (empty: it may), from the paired comparison the
    register stage made (``figures``: per figure its ``difference`` = candidate - champion, the
    interval, the two-sided ``p`` and its ``test`` (paired bootstrap, McNemar exact), or ``comparable: 0``).

    No guarded figure may be worse with p < alpha; the primary figure must be better with p < alpha
    (a candidate equal to the champion within noise is not promoted on noise)."""
    version, alpha = comparison["version"], promotion.alpha
    reasons = []

    def described(figure: str, row: dict) -> str:
        return (
            f"{figure}: {row['candidate']:.4g} against champion v{version}'s {row['champion']:.4g}, difference "
            f"{row['difference']:+.4g} [{row['difference_ci_low']:+.4g}, {row['difference_ci_high']:+.4g}], "
            f"{row.get('test', 'paired bootstrap')} p = {row['difference_p']:.3g}"
        )

    def improved(figure: str, row: dict) -> bool:
        return row["difference"] < 0 if FIXED_JUDGE[figure] == "lower" else row["difference"] > 0

    for figure in promotion.guarded:
        row = comparison["figures"].get(figure, {})
        if (
            row.get("comparable")
            and not improved(figure, row)
            and row["difference"] != 0
            and row["difference_p"] < alpha
        ):
            reasons.append(f"worse than the champion: {described(figure, row)} < {alpha:g}")
    row = comparison["figures"].get(promotion.primary, {})
    if not row.get("comparable"):
        reasons.append(
            f"{promotion.primary} cannot be compared with champion v{version}: {row.get('why', 'not scored')}"
        )
    elif not (improved(promotion.primary, row) and row["difference_p"] < alpha):
        reasons.append(
            f"no significant improvement on the primary figure: {described(promotion.primary, row)} (needs < {alpha:g})"
        )
    return reasons


def comparison_markdown(comparison: dict) -> list[str]:
    """The paired comparison with the champion as a Markdown section (the model card and the run
    summary show the same table); empty when there was no champion."""
    if not comparison.get("figures"):
        return []
    lines = [
        "",
        f"## Against champion v{comparison['version']}: paired tests on the same held-out items",
        "",
        "The champion re-scored with this run's evaluation code and data "
        f"(eval set `{comparison.get('eval_set', '?')}`); difference = candidate - champion, "
        "95% paired-bootstrap interval, two-sided p of the named test (McNemar's exact test for 0/1 items).",
        "",
        "| figure | candidate | champion | difference [95% CI] | p | test |",
        "|---|---:|---:|---|---:|---|",
    ]
    for figure, row in comparison["figures"].items():
        if not row.get("comparable"):
            lines.append(f"| `{figure}` | - | - | not comparable: {row.get('why', '')} | - | - |")
            continue
        low, high = row["difference_ci_low"], row["difference_ci_high"]
        lines.append(
            f"| `{figure}` | {row['candidate']:.4g} | {row['champion']:.4g} | "
            f"{row['difference']:+.4g} [{low:+.4g}, {high:+.4g}] | {row['difference_p']:.3g} | "
            f"{row.get('test', 'paired bootstrap')} |"
        )
    return [*lines, ""]


def dvc_hashes(root: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """md5 of each output path as recorded in dvc.lock (what `dvc checkout` would restore)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    found = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") in paths:
                found[out["path"]] = out.get("md5", "")
    return found


def _artifact_dir(model_dir: Path, dtype: str, into: Path) -> Path:
    """The files the logged model carries; weights cast to bf16 when asked."""
    into.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", TOKENIZER, "chat_template.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, into / name)
    if dtype == "bf16":
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(model_dir / WEIGHTS)
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, into / WEIGHTS)
    else:
        shutil.copy(model_dir / WEIGHTS, into / WEIGHTS)
    return into


def publish(
    model_dir: Path,
    *,
    model_name: str,
    dtype: str,
    failed_gates: list[str],
    tags: dict[str, str],
    champion_alias: str = CHAMPION,
    candidate_alias: str = CANDIDATE,
    description: str | None = None,
) -> dict:
    """Log + register the model in the active MLflow run; returns version, alias and reasons.
    ``description`` (Markdown) becomes the version's description: its model card."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    example = pd.DataFrame({"prompt": ["Once upon a time"], "messages": [""]})
    output = pd.DataFrame({"text": ["..."], "finish_reason": ["length"], "completion_tokens": [1]})
    inferred = infer_signature(example, output, params=SAMPLING_DEFAULTS)
    # A row gives a `prompt` or a `messages` (JSON list of {role, content}): each column is optional.
    inputs = Schema(
        [ColSpec("string", "prompt", required=False), ColSpec("string", "messages", required=False)]
    )
    signature = ModelSignature(inputs=inputs, outputs=inferred.outputs, params=inferred.params)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = _artifact_dir(model_dir, dtype, Path(tmp) / "model_dir")
        info = mlflow.pyfunc.log_model(
            name="chat_model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model_dir": str(artifacts)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=serving_requirements(),
            registered_model_name=model_name,
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    alias = candidate_alias if failed_gates else champion_alias
    client.set_registered_model_alias(model_name, alias, version)
    all_tags = {
        **tags,
        "lmforge.gates": "passed" if not failed_gates else "failed",
        "lmforge.gate_failures": json.dumps(failed_gates),
        "lmforge.weights_dtype": dtype,
    }
    for key, value in all_tags.items():
        client.set_model_version_tag(model_name, version, key, str(value)[:5000])
    if description:
        client.update_model_version(model_name, version, description=description)
    return {
        "model_name": model_name,
        "version": int(version),
        "alias": alias,
        "failed_gates": failed_gates,
        "model_uri": f"models:/{model_name}@{alias}",
    }
