"""kill -9, then the same command again: the run resumes and ends with the uninterrupted run's bytes.

Real `lmforge <stage>` processes are killed with SIGKILL: from outside once a checkpoint exists, and
from inside halfway through writing a checkpoint (`LMFORGE_FAULT_KILL_IN_SAVE`). A half-written
file is never read back, and a corrupt checkpoint is refused with a message naming it, the previous
good one taking its place. The reference runs go through `execute` in this process, as the CLI does.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, copy_project, few_steps
from lmforge.params import load_params
from lmforge.stages import execute, runs_dir
from lmforge.training.checkpointing import FAULT_ENV, LAST_CKPT, PREV_CKPT

STEPS = few_steps(
    {"pretrain": 12, "sft": 10, "reward": 4, "rlhf": 6}, checkpoint_every={"pretrain": 2, "sft": 2, "rlhf": 1}
)
OUTPUTS = {"pretrain": "models/pretrain", "sft": "models/sft", "rlhf": "models/rlhf"}
CKPT_RUN = {"pretrain": "pretrain", "sft": "sft", "rlhf": "rlhf-grpo"}


def result(root: Path, stage: str) -> dict[str, str]:
    """The bytes a run must reproduce: its model folder, loss curves and metrics."""
    files = [root / "metrics" / f"{stage}.json", *sorted((root / "plots" / stage).glob("*.csv"))]
    files += sorted(p for p in (root / OUTPUTS[stage]).iterdir() if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def command(stage: str) -> list[str]:
    return [str(BIN / "lmforge"), stage, *(a for s in STEPS for a in ("--set", s))]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LMFORGE_ROOT")}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **extra}


def finish(root: Path, stage: str, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run(command(stage), cwd=root, capture_output=True, text=True, env=environment(**env))
    assert out.returncode == 0, f"lmforge {stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def kill_after_first_checkpoint(root: Path, stage: str) -> None:
    ckpt = runs_dir(root) / CKPT_RUN[stage] / "checkpoints" / LAST_CKPT
    proc = subprocess.Popen(
        command(stage), cwd=root, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"lmforge {stage} ended before it could be killed"
    assert ckpt.is_file()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Upstream outputs (ingest .. reward) and the uninterrupted results of pretrain, sft and rlhf."""
    root = copy_project(tmp_path_factory.mktemp("crash") / "proj")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("LMFORGE_ROOT", raising=False)
    params = load_params(root / "params.yaml", STEPS)
    expected = {}
    try:
        for stage in ("ingest", "tokenizer", "shards", "pretrain", "sft", "reward", "rlhf"):
            execute(stage, params, root)
            if stage in OUTPUTS:
                expected[stage] = result(root, stage)
    finally:
        mp.undo()
    return root, expected


@pytest.mark.slow
def test_pretrain_killed_in_a_save_then_corrupt_checkpoint_resumes_to_the_same_bytes(project):
    root, expected = project
    folder = runs_dir(root) / "pretrain" / "checkpoints"
    # Killed halfway through writing its 3rd checkpoint (steps 2 and 4 saved, step 6 half-written).
    out = subprocess.run(
        command("pretrain"), cwd=root, capture_output=True, env=environment(**{FAULT_ENV: "3"})
    )
    assert out.returncode == -signal.SIGKILL
    half_written = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert half_written, "the killed save should have left its temporary file"
    assert {LAST_CKPT, PREV_CKPT} <= {p.name for p in folder.iterdir()}
    # The newest checkpoint is then damaged too: the resume must refuse it and take the previous one.
    last = folder / LAST_CKPT
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])

    resumed = finish(root, "pretrain")
    assert f"{last}: unreadable checkpoint" in resumed.stderr
    assert f"resuming from the previous checkpoint {folder / PREV_CKPT}" in resumed.stderr
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert not any(p.name.endswith(".tmp") for p in folder.parent.rglob("*")), "stale temporary kept"
    assert result(root, "pretrain") == expected["pretrain"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rlhf"])
def test_killed_stage_resumes_to_the_same_bytes(project, stage):
    root, expected = project
    kill_after_first_checkpoint(root, stage)
    resumed = finish(root, stage)
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert result(root, stage) == expected[stage]
    assert not (runs_dir(root) / CKPT_RUN[stage] / "checkpoints").exists(), "checkpoints kept after finishing"
