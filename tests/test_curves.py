"""The loss-curve image every training stage writes beside its CSVs (`plots/<stage>/loss.png`)."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conftest import cpu_trainer_config, tiny_gpt
from lmforge.stages import curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TRAIN = "step,train_loss\n" + "".join(f"{s},{7.0 - 0.1 * s:.5f}\n" for s in range(1, 31))
VAL = "step,val_bits_per_byte,val_loss\n10,2.5,4.9\n20,2.2,4.4\n30,2.1,4.2\n"
# PPO/GRPO: rollout metrics in train.csv (one of them missing at a step), no validation rows.
RL_TRAIN = (
    "step,rl_kl,rl_response_length,rl_reward_mean,train_loss\n"
    "1,0.07,21.3,0.84,-0.04\n2,0.28,,2.98,-0.02\n3,0.38,23.9,1.92,-0.03\n"
)


def write_csvs(folder: Path, train: str, val: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.csv").write_text(train)
    (folder / "val.csv").write_text(val)
    return folder


def assert_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decodes every chunk: a truncated or corrupt file raises here
        assert img.format == "PNG" and img.size == (900, 400)
        assert "Software" not in img.info  # no matplotlib version in the bytes
    assert b"matplotlib" not in data.lower()


def test_render_writes_a_900x400_png_atomically(tmp_path):
    folder = write_csvs(tmp_path / "plots" / "pretrain", TRAIN, VAL)
    path = curves.write_loss_png(folder, "pretrain")
    assert path == folder / "loss.png"
    assert_png(path.read_bytes())
    assert sorted(p.name for p in folder.iterdir()) == ["loss.png", "train.csv", "val.csv"]  # no temporaries


def test_stage_without_val_rows_plots_its_other_train_columns(tmp_path):
    folder = write_csvs(tmp_path / "rlhf", RL_TRAIN, "step\n")
    assert_png(curves.write_loss_png(folder, "rlhf").read_bytes())
    series = curves.read_curve(folder / "train.csv")
    assert series["rl_response_length"] == [(1, 21.3), (3, 23.9)]  # the empty cell is skipped
    assert curves.read_curve(folder / "val.csv") == {}


@pytest.mark.parametrize(
    "train,val", [("step,train_loss\n", "step,val_loss\n"), ("step\n", "step\n"), ("", "")]
)
def test_empty_csvs_give_a_no_data_image(tmp_path, train, val):
    folder = write_csvs(tmp_path / "sft", train, val)
    empty = curves.write_loss_png(folder, "sft").read_bytes()
    assert_png(empty)
    full = write_csvs(tmp_path / "full", TRAIN, VAL)
    assert empty != curves.render_png(full / "train.csv", full / "val.csv", "sft")
    # Missing files render the same "no data" figure.
    assert curves.render_png(tmp_path / "none.csv", tmp_path / "none.csv", "sft") == empty


def test_same_csvs_give_the_same_bytes_in_separate_processes(tmp_path):
    folder = write_csvs(tmp_path / "reward", TRAIN, VAL)
    code = textwrap.dedent(
        f"""
        import hashlib, sys
        from pathlib import Path
        from lmforge.stages.curves import render_png
        folder = Path({str(folder)!r})
        data = render_png(folder / "train.csv", folder / "val.csv", "reward")
        print(hashlib.sha256(data).hexdigest())
        """
    )
    digests = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    here = hashlib.sha256(curves.render_png(folder / "train.csv", folder / "val.csv", "reward")).hexdigest()
    assert digests[0] == digests[1] == here


def test_no_active_mlflow_run_logs_nothing(tmp_path):
    assert curves.log_to_mlflow([tmp_path / "missing.png"]) is False


def test_fit_stage_writes_the_png_and_logs_it_to_the_stage_run(tmp_path, monkeypatch):
    import mlflow

    from lmforge import tracking
    from lmforge.stages.fitting import fit_stage
    from lmforge.training import CausalLMModule, OptimConfig, TokenShardDataModule
    from test_training import random_shard

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    monkeypatch.setenv("LMFORGE_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    shard = random_shard(tmp_path / "shard", n=2000)
    module = CausalLMModule(
        tiny_gpt(vocab_size=64, block_size=16),
        OptimConfig(lr=1e-3, warmup_steps=1, max_steps=4),
        val_tokens_per_byte=0.5,
    )
    data = TokenShardDataModule(shard, block_size=16, batch_size=4, seed=0, val_batches=1)
    cfg = cpu_trainer_config(4, val_every_steps=2, val_batches=1, checkpoint_every_steps=0)
    with tracking.stage_run("pretrain", {}, "tiny") as run:
        trainer, _ = fit_stage(
            "pretrain",
            module,
            data,
            cfg,
            root=tmp_path,
            resume=False,
            curve_keys=("train/loss", "val/loss", "val/bits_per_byte"),
        )
    assert trainer.global_step == 4
    folder = tmp_path / "plots" / "pretrain"
    png = (folder / "loss.png").read_bytes()
    assert_png(png)
    assert png == curves.render_png(folder / "train.csv", folder / "val.csv", "pretrain")
    assert len(curves.read_curve(folder / "train.csv")["train_loss"]) == 4
    assert len(curves.read_curve(folder / "val.csv")["val_bits_per_byte"]) == 2

    client = mlflow.MlflowClient()
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots"))
    assert logged == ["plots/loss.png", "plots/train.csv", "plots/val.csv"]
    local = client.download_artifacts(run.info.run_id, "plots/loss.png", str(tmp_path / "download"))
    assert Path(local).read_bytes() == png
