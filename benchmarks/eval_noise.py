"""Seed noise of the evaluation figures: how far each figure moves when only the seed changes.

Runs the post-training chain (by default reward -> rlhf -> evaluate, on this project's pretrained and
SFT models, as `lmforge <stage> --set seed=S`) once per seed in a scratch copy of the project, and
prints, per figure of `metrics/evaluate.json`, its mean, standard deviation and range over the seeds
beside the mean half-width of its own 95% interval (the held-out items' noise within one run). A
gate, or a promotion rule, should not react to differences smaller than these.

    .venv/bin/python benchmarks/eval_noise.py --seeds 1 2 3 4 5            # ~3 min per seed on 2 cores
    .venv/bin/python benchmarks/eval_noise.py --seeds 1 2 3 --stages sft reward rlhf evaluate --json out.json

The project's own models, metrics and MLflow store are not touched: inputs are linked read-only
into the scratch folder, whose `.lmforge/` holds the runs' MLflow state.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ("data", "models/pretrain", "models/sft", "models/reward", "models/rlhf")  # linked unless rewritten
FIGURES = (
    "sft.task_accuracy",
    "tuned.task_accuracy",
    "task_gain",
    "reward_model.accuracy",
    "reward_gain",
    "sft.mean_reward",
    "tuned.mean_reward",
    "tuned.end_of_turn_rate",
    "tuned.val_bits_per_byte",
    "tuned.assistant_loss",
    "tuned.mean_length",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_seed(seed: int, stages: list[str], scratch: Path, overrides: list[str] = ()) -> dict:
    """The evaluate figures after running `stages` with the run seed `seed` in `scratch`."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", scratch / "params.yaml")
    shutil.copy(ROOT / "dvc.yaml", scratch / "dvc.yaml")  # marks the folder as a project root
    rewritten = {f"models/{s}" for s in stages}
    for rel in INPUTS:
        if rel in rewritten:
            continue
        target = scratch / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(ROOT / rel)
    env = {**os.environ, "LMFORGE_ROOT": str(scratch), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    lmforge = Path(sys.executable).parent / "lmforge"
    for stage in stages:
        cmd = [str(lmforge), stage, "--params", str(scratch / "params.yaml"), "--set", f"seed={seed}"]
        cmd += [arg for o in overrides for arg in ("--set", o)]
        done = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}, stage {stage} failed:\n{done.stderr[-3000:]}")
    return _flat(json.loads((scratch / "metrics" / "evaluate.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--stages", nargs="+", default=["reward", "rlhf", "evaluate"])
    parser.add_argument("--json", type=Path, help="also write every seed's figures here")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override for every stage, e.g. --set rlhf.reward=verifier (repeatable)",
    )
    args = parser.parse_args()
    if args.stages[-1] != "evaluate":
        raise SystemExit("--stages must end with evaluate")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-noise-") as tmp:
        for seed in args.seeds:
            runs[seed] = run_seed(seed, args.stages, Path(tmp) / f"seed{seed}", args.overrides)
            print(f"seed {seed}: " + ", ".join(f"{k}={runs[seed].get(k)}" for k in FIGURES), flush=True)
    print()
    print(f"| figure | mean over {len(runs)} seeds | std | range | mean 95% CI half-width (one run) |")
    print("|---|---|---|---|---|")
    for key in FIGURES:
        values = [r[key] for r in runs.values() if isinstance(r.get(key), int | float)]
        if not values:
            continue
        halves = [
            (r[f"{key}_ci_high"] - r[f"{key}_ci_low"]) / 2
            for r in runs.values()
            if isinstance(r.get(f"{key}_ci_high"), int | float)
        ]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        half = f"{statistics.mean(halves):.4f}" if halves else "-"
        print(
            f"| {key} | {statistics.mean(values):.4f} | {std:.4f} | {min(values):.4f} to {max(values):.4f} | {half} |"
        )
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
