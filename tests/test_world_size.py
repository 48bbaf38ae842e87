"""World-size invariance (issue 25): the same global batch trained as 1 process x 4 accumulated
micro-batches, 2 processes x 2 and 4 processes x 1 (DDP over gloo on 127.0.0.1) gives the same model,
and so the same loss curve. The ranks take disjoint, interleaved micro-batches of the one stream a
single process draws, and the gradient is the mean over all of them; the global batch in tokens
(`pretrain.global_batch_tokens`) derives each layout's accumulation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import tiny_gpt
from lmforge.model_folder import load_weights
from lmforge.params import load_params
from lmforge.stages.fitting import trainer_config
from lmforge.training.distributed import accumulation, world_size
from test_training import BLOCK, SHAPE, repetitive_shard

GLOBAL_TOKENS = 8 * BLOCK  # 8 sequences per optimizer step
MICRO = 2
STEPS = 4

WORKER = textwrap.dedent(
    f"""
    import json, sys
    from pathlib import Path

    import numpy as np
    import pytorch_lightning as L
    import torch
    from lmforge.model import GPT, GPTConfig
    from lmforge.model_folder import export_weights
    from lmforge.training import CausalLMModule, OptimConfig, TokenShardDataModule, TrainerConfig, build_trainer
    from lmforge.training.distributed import accumulation

    class HeldOutCurve(L.Callback):
        # After every optimizer step (the weights agree on every rank), rank 0 scores fixed val windows.
        def __init__(self, shard):
            data = torch.from_numpy(np.fromfile(Path(shard) / "val.bin", dtype=np.uint16).astype(np.int64))
            self.x, self.y = data[: 32 * {BLOCK}].view(32, {BLOCK}), data[1 : 32 * {BLOCK} + 1].view(32, {BLOCK})
            self.curve = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if (batch_idx + 1) % trainer.accumulate_grad_batches or not trainer.is_global_zero:
                return
            module.model.eval()
            with torch.no_grad():
                logits = module.model(self.x)
                self.curve.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), self.y.flatten())))
            module.model.train()

    def main(out, shard, devices):
        L.seed_everything(0)
        model = GPT(GPTConfig(vocab_size={SHAPE["vocab_size"]}, block_size={BLOCK}, n_layer=2, n_head=4,
                              n_kv_head=4, n_embd=32))
        module = CausalLMModule(model, OptimConfig(lr=3e-3, warmup_steps=0, max_steps={STEPS}))
        accumulate = accumulation({GLOBAL_TOKENS}, {MICRO}, {BLOCK}, devices)
        cfg = TrainerConfig(max_steps={STEPS}, accelerator="cpu", devices=devices, accumulate_grad_batches=accumulate,
                            strategy="ddp" if devices > 1 else "auto", val_every_steps=0,
                            checkpoint_every_steps=0, enable_progress_bar=False, log_every_steps=1)
        curve = HeldOutCurve(shard)
        trainer = build_trainer(cfg, default_root_dir=out, callbacks=[curve])
        trainer.fit(module, datamodule=TokenShardDataModule(shard, block_size={BLOCK}, batch_size={MICRO}, seed=0))
        if trainer.is_global_zero:
            export_weights(module.model, Path(out) / "weights.safetensors")
            Path(out, "run.json").write_text(json.dumps({{"accumulate": accumulate, "world": trainer.world_size,
                                                         "steps": trainer.global_step, "curve": curve.curve}}))

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    """
)


def test_the_global_batch_decides_the_accumulation(tmp_path):
    assert [accumulation(GLOBAL_TOKENS, MICRO, BLOCK, w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="not a multiple of batch_size 2 x block_size 16 x 3 processes"):
        accumulation(GLOBAL_TOKENS, MICRO, BLOCK, 3)
    assert world_size(8, 2) == 16 and world_size("auto", 1, "cpu") == 1
    params = load_params(
        "params.yaml",
        [
            "pretrain.global_batch_tokens=65536",
            "pretrain.batch_size=16",
            "pretrain.devices=2",
            "pretrain.num_nodes=2",
        ],
    )
    assert trainer_config(params, "pretrain").accumulate_grad_batches == 65536 // (16 * 128 * 4)
    params = load_params("params.yaml", ["pretrain.global_batch_tokens=1000"])
    with pytest.raises(ValueError, match="pretrain.global_batch_tokens 1000 is not a multiple"):
        trainer_config(params, "pretrain")


@pytest.mark.slow
def test_one_two_and_four_processes_train_the_same_model(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    shard = repetitive_shard(tmp_path / "s")  # a pattern to learn: the held-out loss falls
    models, curves = {}, {}
    for devices in (1, 2, 4):
        out = tmp_path / f"w{devices}"
        out.mkdir()
        done = subprocess.run(
            [sys.executable, str(script), str(out), str(shard), str(devices)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        run = json.loads((out / "run.json").read_text())
        curves[devices] = run.pop("curve")
        assert run == {"accumulate": 4 // devices, "world": devices, "steps": STEPS}
        model = tiny_gpt(seed=devices, **SHAPE)
        load_weights(model, out / "weights.safetensors")
        models[devices] = model.eval()
    # The same weights, and so the same held-out loss after every layout's 4 steps.
    data = torch.from_numpy(np.fromfile(shard / "val.bin", dtype=np.uint16).astype(np.int64))
    x = data[: 32 * BLOCK].view(32, BLOCK)
    y = data[1 : 32 * BLOCK + 1].view(32, BLOCK)
    with torch.no_grad():
        losses = {
            d: float(torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()))
            for d, m in models.items()
        }
    init = tiny_gpt(seed=99, **SHAPE)
    assert len(curves[1]) == STEPS and curves[1][-1] < curves[1][0]  # it learned
    for d in (2, 4):
        assert curves[d] == pytest.approx(curves[1], rel=1e-3), curves  # the held-out loss, step by step
        assert losses[d] == pytest.approx(losses[1], rel=1e-3), losses
        for (name, a), b in zip(models[1].state_dict().items(), models[d].state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=5e-5, rtol=1e-3), (d, name)
    assert any(
        not torch.allclose(a, b) for a, b in zip(models[1].state_dict().values(), init.state_dict().values())
    )
