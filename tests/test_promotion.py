"""Promotion that never regresses: a candidate is compared with the champion on the same held-out
items (the champion downloaded from the registry and re-scored), item by item, and only a
significant improvement on the primary figure, with no guarded figure significantly worse, moves
the alias. The whole tiny chain runs for real (`execute`, as `lmforge <stage>` does)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import copy_project, few_steps
from lmforge.params import Promotion, load_params
from lmforge.registry.publish import promotion_failures
from lmforge.stages import STAGES, execute, read_metrics

RELAXED = [  # the first version is judged by the absolute gates alone: let it through
    "registry.gates.min_reward_gain=-100",
    "registry.gates.min_reward_accuracy=0",
    "registry.gates.max_val_bits_per_byte=100",
    "registry.gates.min_end_of_turn_rate=0",
]
# rlhf.reward=mix: the chain also runs RL against the verifiable task's checker.
OVERRIDES = few_steps({"pretrain": 6, "sft": 4, "reward": 4, "rlhf": 2}) + RELAXED + ["rlhf.reward=mix"]


def scramble(model_dir: Path, scale: float) -> None:
    """A deliberately worse model: Gaussian noise on every weight matrix (seeded)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if w.dim() == 2:
            weights[name] = w + scale * w.std() * torch.randn(w.shape, generator=gen, dtype=w.dtype)
    save_file(weights, path)


@pytest.mark.slow
def test_a_worse_candidate_stays_candidate_and_an_equal_one_is_not_promoted_on_noise(tmp_path, monkeypatch):
    root = copy_project(tmp_path / "p")
    monkeypatch.chdir(root)
    monkeypatch.setenv("LMFORGE_ROOT", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(root / "params.yaml", OVERRIDES)
    for stage in STAGES:
        execute(stage, params, root)
    first = read_metrics(root, "register")
    assert first["alias"] == "champion" and first["champion"] == {}  # no champion before: gates alone
    good = tmp_path / "good-rlhf"
    shutil.copytree(root / "models" / "rlhf", good)

    # A corrupted candidate: worse on the held-out items, and the stage says which figure and test.
    scramble(root / "models" / "rlhf", scale=1.0)
    execute("evaluate", params, root)
    execute("register", params, root)
    worse = read_metrics(root, "register")
    assert worse["alias"] == "candidate" and worse["version"] == first["version"] + 1
    comparison = worse["champion"]
    assert comparison["version"] == first["version"]
    loss = comparison["figures"]["assistant_loss"]
    assert loss["difference"] > 0 and loss["difference_p"] < 0.01
    refused = " ".join(worse["promotion_refused"])
    assert "worse than the champion: assistant_loss" in refused and "paired bootstrap p =" in refused
    assert worse["failed_gates"] == []  # the absolute floors (relaxed) passed: the comparison decided

    # The champion's own weights again: equal within noise (here: identical), so not promoted.
    shutil.rmtree(root / "models" / "rlhf")
    shutil.copytree(good, root / "models" / "rlhf")
    execute("evaluate", params, root)
    execute("register", params, root)
    equal = read_metrics(root, "register")
    assert equal["alias"] == "candidate"
    assert equal["champion"]["figures"]["assistant_loss"]["difference"] == 0
    assert any("no significant improvement on the primary figure" in r for r in equal["promotion_refused"])
    # Every figure the summary and the model card show comes from the same comparison.
    from mlflow import MlflowClient

    card = MlflowClient().get_model_version("lmforge-chat", str(equal["version"])).description
    assert f"Against champion v{first['version']}" in card and "| assistant_loss |" in card


def comparison(difference: float, p: float, figure: str = "assistant_loss") -> dict:
    row = {
        "comparable": 1,
        "candidate": 3.0 + difference,
        "champion": 3.0,
        "difference": difference,
        "difference_ci_low": difference - 0.1,
        "difference_ci_high": difference + 0.1,
        "difference_p": p,
    }
    return {"version": 4, "figures": {figure: row}}


def test_the_promotion_rule():
    rule = Promotion(primary="assistant_loss")
    assert promotion_failures(comparison(-0.2, 0.001), rule) == []  # significantly better: promoted
    noise = promotion_failures(comparison(-0.01, 0.4), rule)
    assert len(noise) == 1 and noise[0].startswith("no significant improvement") and "champion v4" in noise[0]
    worse = promotion_failures(comparison(+0.2, 0.001), rule)
    assert worse[0].startswith("worse than the champion: assistant_loss") and "p = 0.001 < 0.05" in worse[0]
    eot = comparison(-0.3, 0.001, "end_of_turn_rate")  # higher is better: a fall is a regression
    eot["figures"]["assistant_loss"] = comparison(-0.2, 0.001)["figures"]["assistant_loss"]
    assert promotion_failures(eot, rule)[0].startswith("worse than the champion: end_of_turn_rate")
    other = {
        "version": 4,
        "figures": {"assistant_loss": {"comparable": 0, "why": "the champion has another tokenizer"}},
    }
    assert "another tokenizer" in promotion_failures(other, rule)[0]
    # The default primary figure: the verifiable task's accuracy (a program judges; any tokenizer).
    default = Promotion()
    assert default.primary == "task_accuracy"
    better = comparison(+0.1, 0.0004, "task_accuracy")
    better["figures"]["task_accuracy"]["test"] = "McNemar exact"
    assert promotion_failures(better, default) == []
    fell = comparison(-0.1, 0.0004, "task_accuracy")
    fell["figures"]["task_accuracy"]["test"] = "McNemar exact"
    reasons = promotion_failures(fell, default)
    assert (
        reasons[0].startswith("worse than the champion: task_accuracy")
        and "McNemar exact p = 0.0004" in reasons[0]
    )
