"""A stop or a raise decided on one rank must be reached by every rank (issue 25): a rank that
stopped alone left the others waiting forever in the next all-reduce. Two CPU processes (DDP over
gloo on 127.0.0.1) run GRPO; only rank 1's reward turns NaN. Before the fix rank 1 raised alone and
rank 0 went on into the gradient all-reduce, where it died only because gloo saw its peer's socket
close ("Connection closed by peer"; a live peer, as under NCCL, leaves it waiting); now both raise
the same error, naming where it happened."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    sys.path.insert(0, sys.argv[2])  # tests/, for conftest's tiny model
    from conftest import tiny_gpt
    from lmforge.training import OptimConfig, TrainerConfig, fit
    from lmforge.training.config import RLConfig
    from lmforge.training.policy_rl import PolicyRLModule, PromptDataModule, RLDivergenceError

    def reward(prompts, replies):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        bad = rank == 1 and os.environ.get("NAN_ON_RANK_1") == "1"
        return torch.full((len(replies),), float("nan") if bad else 1.0)

    def main(out):
        cfg = RLConfig(algorithm="grpo", rollout_batch_size=2, group_size=2, max_new_tokens=4, seed=0,
                       kl_max=float(os.environ.get("KL_MAX", "1e9")))
        model = tiny_gpt(vocab_size=16, block_size=24, n_layer=1, n_head=2, n_kv_head=2)
        module = PolicyRLModule(model, reward, cfg, OptimConfig(lr=1e-2, warmup_steps=0, max_steps=4),
                                end_id=1, pad_id=0)
        tcfg = TrainerConfig(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", val_every_steps=0,
                             checkpoint_every_steps=0, enable_progress_bar=False, log_every_steps=1)
        prompts = [[2, 3], [4, 5, 6], [7, 8], [9, 10, 11]]
        try:
            trainer = fit(module, PromptDataModule(prompts, cfg), tcfg, resume=False, default_root_dir=out)
        except RLDivergenceError as err:
            report(f"RAISED {os.environ.get('LOCAL_RANK', '0')} {err}")
            sys.exit(3)
        report(f"DONE {trainer.global_rank} {trainer.global_step} {module.stop_reason}")

    def report(line):  # a file per rank: two ranks printing to one pipe can splice their lines
        with open(os.path.join(sys.argv[1] + "-results", os.environ.get("LOCAL_RANK", "0")), "w") as f:
            f.write(line)

    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def run_workers(tmp_path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the two ranks; returns the process and each rank's one-line report."""
    import os
    from pathlib import Path

    script = tmp_path / "rl_worker.py"
    script.write_text(WORKER)
    tests = str(Path(__file__).resolve().parent)
    (tmp_path / "out-results").mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), tests],
        env={**os.environ, **env, "MASTER_ADDR": "127.0.0.1"},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    return done, [f.read_text() for f in sorted((tmp_path / "out-results").iterdir())]


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    done, reports = run_workers(tmp_path, NAN_ON_RANK_1="1")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    raised = [line for line in reports if line.startswith("RAISED")]
    assert len(raised) == 2, (reports, out[-3000:])  # both ranks, not rank 1 alone
    assert any("(rank 1: here)" in line for line in raised) and any(
        "(rank 0: on another rank)" in line for line in raised
    )


@pytest.mark.slow
def test_a_kl_bound_crossed_stops_every_rank_together(tmp_path):
    done, reports = run_workers(
        tmp_path, KL_MAX="1e-9"
    )  # the first update moves the policy past it on a rank
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    finished = [line for line in reports if line.startswith("DONE")]
    assert len(finished) == 2 and all("exceeded kl_max" in line for line in finished), (reports, out[-3000:])
