"""Training throughput: the Lightning core vs a plain PyTorch loop on the same model and batch.

    python benchmarks/train_throughput.py --preset tiny --steps 30
    python benchmarks/train_throughput.py --preset small --steps 50 --compile   # on a GPU

Prints tokens/s for both, Lightning's overhead as a ratio, and MFU on CUDA. Needs only the
training core (torch, lightning, numpy, pyyaml), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch
import yaml

from lmforge.model import GPT, GPTConfig
from lmforge.training import CausalLMModule, OptimConfig, TrainerConfig, build_optimizer, build_trainer
from lmforge.training.module import causal_lm_loss, peak_flops
from lmforge.training.trainer import resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def preset_sections(preset: str) -> tuple[dict, dict]:
    """model and pretrain sections of a preset (+ params.yaml overrides), without pydantic."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    chosen = raw["presets"][preset]
    return {**chosen.get("model", {}), **(raw.get("model") or {})}, {
        **chosen.get("pretrain", {}),
        **(raw.get("pretrain") or {}),
    }


class SameBatch(torch.utils.data.Dataset):
    """The same fixed batch every step, so both loops see identical work."""

    def __init__(self, batch: dict[str, torch.Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batch


def lightning_tokens_per_s(
    cfg: GPTConfig, batch: dict, steps: int, warmup: int, trainer_cfg: TrainerConfig, compile_model: bool
) -> float:
    timings: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings.append(time.perf_counter())

    module = CausalLMModule(
        GPT(cfg), OptimConfig(max_steps=steps, warmup_steps=1), compile_model=compile_model
    )
    trainer = build_trainer(trainer_cfg, default_root_dir="/tmp/lmforge-bench", callbacks=[Timer()])
    trainer.fit(
        module, train_dataloaders=torch.utils.data.DataLoader(SameBatch(batch, steps), batch_size=None)
    )
    tokens = batch["input_ids"].numel()
    return tokens * (len(timings) - warmup - 1) / (timings[-1] - timings[warmup])


def plain_tokens_per_s(
    cfg: GPTConfig, batch: dict, steps: int, warmup: int, precision: str, compile_model: bool
) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT(cfg).to(device)
    if compile_model:
        model.compile()
    opt, sched = build_optimizer(model, OptimConfig(max_steps=steps, warmup_steps=1))
    x, y = batch["input_ids"].to(device), batch["labels"].to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    stamps = []
    for _ in range(steps):
        with autocast:
            loss = causal_lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return x.numel() * (len(stamps) - warmup - 1) / (stamps[-1] - stamps[warmup])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (compile, allocator)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's tokenizer size")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--repeats", type=int, default=2, help="alternate the two loops this many times; best of each"
    )
    args = ap.parse_args()

    model_sec, train_sec = preset_sections(args.preset)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    vocab = args.vocab_size or raw["presets"][args.preset].get("tokenizer", {}).get("vocab_size", 4096)
    cfg = GPTConfig(vocab_size=vocab, **model_sec)
    bs = args.batch_size or train_sec.get("batch_size", 32)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, vocab, size=(bs, cfg.block_size + 1)).astype(np.int64))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    tcfg = TrainerConfig(
        max_steps=args.steps,
        val_every_steps=0,
        val_batches=0,
        checkpoint_every_steps=10**9,
        enable_progress_bar=False,
        devices=1,
    )
    precision = resolve_precision(tcfg)
    torch.manual_seed(0)
    # Alternate and keep the best of each: the first loop in a process pays for warm-up (allocator,
    # thread pools, CPU frequency), which would otherwise be charged to whichever runs first.
    lit = plain = 0.0
    for _ in range(args.repeats):
        plain = max(plain, plain_tokens_per_s(cfg, batch, args.steps, args.warmup, precision, args.compile))
        lit = max(lit, lightning_tokens_per_s(cfg, batch, args.steps, args.warmup, tcfg, args.compile))
    model = GPT(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"preset={args.preset} device={torch.cuda.get_device_name() if device == 'cuda' else f'cpu x{torch.get_num_threads()} threads'} "
        f"precision={precision} compile={args.compile}"
    )
    print(
        f"model: {model.num_params() / 1e6:.2f}M params ({model.num_params(True) / 1e6:.2f}M non-embedding), "
        f"block {cfg.block_size}, batch {bs} x {cfg.block_size} = {bs * cfg.block_size} tokens/step"
    )
    print(f"lightning: {lit:,.0f} tokens/s")
    print(f"plain torch: {plain:,.0f} tokens/s")
    print(f"lightning / plain: {lit / plain:.3f}")
    if device == "cuda":
        peak = peak_flops(torch.device("cuda"))
        fpt = model.flops_per_token()
        print(
            f"MFU lightning: {fpt * lit / peak:.1%}  plain: {fpt * plain / peak:.1%}  (peak {peak / 1e12:.0f} TFLOP/s)"
        )


if __name__ == "__main__":
    main()
