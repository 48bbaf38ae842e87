"""Shared test helpers: a throwaway copy of the project to run real stages, DVC and MLflow in, and
tiny models and CPU trainer configs for the unit tests (plain functions: `from conftest import ...`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lmforge.model import GPT, GPTConfig
    from lmforge.training import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> Path:
    """The files a pipeline run needs (params, dvc.yaml, raw data, sources), without state or outputs."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "data" / "raw", dest / "data" / "raw")
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh project folder with DVC initialised (no git) and the cwd set to it."""
    root = copy_project(tmp_path / "proj")
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    return root


def few_steps(steps: dict[str, int], checkpoint_every: dict[str, int] | None = None) -> list[str]:
    """`--set` overrides for a tiny chain: `steps` per training stage, validation twice per stage,
    small evaluations; `checkpoint_every` steps (rollouts for rlhf) where given."""
    out = []
    for stage, n in steps.items():
        out += [f"{stage}.max_steps={n}", f"{stage}.warmup_steps=1"]
        if stage != "rlhf":
            out += [f"{stage}.val_every_steps={max(1, n // 2)}", f"{stage}.val_batches=2"]
    for stage, n in (checkpoint_every or {}).items():
        out.append(f"{stage}.checkpoint_every_steps={n}")
    out += ["pretrain.sample_tokens=8", "sft.eval_prompts=4", "sft.sample_tokens=8"]
    out += ["rlhf.rollout_batch_size=2", "rlhf.max_new_tokens=8", "rlhf.eval_prompts=4"]
    return out + ["evaluate.eval_prompts=4", "evaluate.max_new_tokens=8"]


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition", poll_s: float = 0.05) -> float:
    """Poll ``condition()`` until it holds; the seconds that took. Fails naming ``what`` after
    ``timeout_s``."""
    import time

    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(poll_s)
    return time.monotonic() - started


def run_cmd(args, cwd, check=True, env=None):
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# ---------------------------------------------------------------------------- tiny models and configs
# torch and lmforge are imported inside these helpers, not at the top, so that loading this module
# (every session does) stays cheap and an import error in lmforge fails only the tests that use them.

# A small grouped-query model: head_dim 8, two query heads per key/value head. test_model's expected
# parameter counts and shapes assume these values (with vocab_size 64).
TINY_GPT = {"block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32}


def tiny_config(vocab_size: int = 64, **overrides: Any) -> GPTConfig:
    """`GPTConfig` with the `TINY_GPT` shape; `overrides` replace any field."""
    from lmforge.model import GPTConfig

    return GPTConfig(**{"vocab_size": vocab_size, **TINY_GPT, **overrides})


def tiny_gpt(vocab_size: int = 64, *, seed: int = 0, **overrides: Any) -> GPT:
    """A freshly initialised `GPT(tiny_config(vocab_size, **overrides))`, its weights drawn after
    `torch.manual_seed(seed)`. Left in train mode, as `GPT(...)` is."""
    import torch

    from lmforge.model import GPT

    torch.manual_seed(seed)
    return GPT(tiny_config(vocab_size, **overrides))


def cpu_trainer_config(max_steps: int, **overrides: Any) -> TrainerConfig:
    """`TrainerConfig` for one CPU process, no progress bar, logging every step; `overrides` replace any field."""
    from lmforge.training import TrainerConfig

    base = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "log_every_steps": 1}
    return TrainerConfig(**{"max_steps": max_steps, **base, **overrides})
