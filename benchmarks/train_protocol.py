"""The tiny-shakespeare protocol: train on the first 90% of a text file, score bits/byte on the rest.

    python benchmarks/train_protocol.py                          # tiny preset, bundled input.txt
    python benchmarks/train_protocol.py --steps 300 --preset tiny --text path/to/input.txt

The rule (issue 17): cut the raw text at character int(len * 0.9). A byte-level BPE tokenizer
(the preset's vocab size) is trained on the head only, and the preset's model is pretrained on the
head as one token stream, so blank lines and speaker turns are kept as the text has them. Training
uses random windows of the block size and the Lightning core, `lmforge.training`. The tail is then
encoded whole. Each token is predicted from the tokens before it, in non-overlapping windows of the
block size (the tail's first token has no context and is not scored). bits/byte = summed NLL /
(ln 2 x the UTF-8 bytes of the predicted tokens).

Prints wall time, training seconds, tokens/s, the train-loss curve, and the tail's bits/byte.
Reference point (issue 17, same machine, 2 cores): a well-known character-level baseline (4 layers
x 128, block 64, 2,000 iterations) reaches 2.739 bits/byte in 100 s. Training core only (torch,
lightning, tokenizers, numpy, pyyaml): runs on a bare GPU image too.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmforge.model import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizer import ChatTokenizer, train_bpe  # noqa: E402
from lmforge.training import CausalLMModule, OptimConfig, TrainerConfig, build_trainer  # noqa: E402
from lmforge.training.data import RandomWindows  # noqa: E402
from train_throughput import ROOT, preset_sections  # noqa: E402

TEXT = ROOT / "data" / "raw" / "tinyshakespeare" / "input.txt"
OPTIM_KEYS = ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "warmup_steps", "grad_clip")


class Curve(L.Callback):
    """(step, train loss, seconds since fit start) every `every` steps."""

    def __init__(self, every: int) -> None:
        self.every, self.rows, self.start = every, [], 0.0

    def on_train_start(self, trainer, module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.rows.append((step, float(loss), time.perf_counter() - self.start))


def split_text(text: str, fraction: float = 0.9) -> tuple[str, str]:
    cut = int(len(text) * fraction)
    return text[:cut], text[cut:]


@torch.inference_mode()
def tail_bits_per_byte(model: GPT, tok: ChatTokenizer, ids: list[int], block: int, batch: int = 16) -> float:
    """Summed NLL of ids[1:] over non-overlapping windows of `block`, per UTF-8 byte of those tokens."""
    model.eval()
    device = next(model.parameters()).device
    data = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(ids) - 1, block))
    nll = 0.0
    for i in range(0, len(starts), batch):
        chunk = starts[i : i + batch]
        width = max(min(block, len(ids) - 1 - s) for s in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, s in enumerate(chunk):
            n = min(block, len(ids) - 1 - s)
            x[row, :n], y[row, :n] = data[s : s + n], data[s + 1 : s + 1 + n]
        logits = model(x.to(device)).float()
        nll += torch.nn.functional.cross_entropy(
            logits.view(-1, logits.size(-1)), y.to(device).view(-1), ignore_index=-100, reduction="sum"
        ).item()
    predicted_bytes = sum(len(b) for b, _ in tok.token_bytes(ids[1:]))
    return nll / (math.log(2) * predicted_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument(
        "--steps", type=int, help="optimizer steps (default: the preset's pretrain.max_steps)"
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, pre = preset_sections(args.preset)
    vocab = int(preset_vocab(args.preset))
    steps = args.steps or int(pre.get("max_steps", 1000))
    batch_size = args.batch_size or int(pre.get("batch_size", 32))

    text = args.text.read_text(encoding="utf-8")
    head, tail = split_text(text)
    t = time.perf_counter()
    tok = ChatTokenizer(train_bpe([p for p in head.split("\n\n") if p.strip()], vocab_size=vocab))
    train_ids = np.asarray(tok.encode(head), dtype=np.int64)
    tail_ids = tok.encode(tail)
    prep_s = time.perf_counter() - t

    L.seed_everything(args.seed, workers=True, verbose=False)
    cfg = GPTConfig(vocab_size=tok.vocab_size, **model_cfg)
    model = GPT(cfg)
    optim = OptimConfig(max_steps=steps, **{k: pre[k] for k in OPTIM_KEYS if k in pre})
    module = CausalLMModule(model, optim)
    curve = Curve(every=max(1, steps // 10))
    windows = RandomWindows(train_ids, cfg.block_size, batch_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            TrainerConfig(
                max_steps=steps,
                val_every_steps=0,
                val_batches=0,
                checkpoint_every_steps=0,
                log_every_steps=max(1, steps // 10),
                seed=args.seed,
                enable_progress_bar=False,
            ),
            default_root_dir=tmp,
            callbacks=[curve],
        )
        t = time.perf_counter()
        trainer.fit(module, train_dataloaders=DataLoader(windows, batch_size=None, num_workers=0))
        train_s = time.perf_counter() - t
    t = time.perf_counter()
    bpb = tail_bits_per_byte(model, tok, tail_ids, cfg.block_size)
    eval_s = time.perf_counter() - t
    tokens = steps * batch_size * cfg.block_size
    print(f"text: {args.text} ({len(text):,} chars; head {len(head):,}, tail {len(tail):,})")
    print(
        f"preset {args.preset}: {cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, vocab {vocab}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {steps} steps x {batch_size} windows"
    )
    print("train loss curve (step, loss, seconds):")
    for step, loss, sec in curve.rows:
        print(f"  {step:6d}  {loss:7.4f}  {sec:7.1f}")
    print(
        f"tokenizer + encode: {prep_s:.1f} s; training: {train_s:.1f} s ({tokens / train_s:,.0f} tokens/s); "
        f"scoring: {eval_s:.1f} s"
    )
    print(f"wall time: {time.perf_counter() - wall:.1f} s")
    print(f"tail bits/byte: {bpb:.4f}   (reference: 2.739 in 100 s, issue 17)")


def preset_vocab(preset: str) -> int:
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {**raw["presets"][preset].get("tokenizer", {}), **(raw.get("tokenizer") or {})}.get(
        "vocab_size", 4096
    )


if __name__ == "__main__":
    main()
