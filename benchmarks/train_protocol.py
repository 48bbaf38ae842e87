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
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch
import yaml
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lmforge.evaluation import text_bits_per_byte  # noqa: E402
from lmforge.model import GPT, GPTConfig  # noqa: E402
from lmforge.tokenizer import ChatTokenizer, train_bpe  # noqa: E402
from lmforge.training import CausalLMModule, OptimConfig, TrainerConfig, build_trainer  # noqa: E402
from lmforge.training.data import RandomWindows  # noqa: E402
from train_throughput import ROOT, preset_sections  # noqa: E402

TEXT = ROOT / "data" / "raw" / "tinyshakespeare" / "input.txt"
# The pretrain keys that configure the optimizer: OptimConfig's own fields (max_steps is the run's).
OPTIM_KEYS = tuple(f.name for f in fields(OptimConfig) if f.name != "max_steps")


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


@dataclass
class ProtocolRun:
    """One protocol run, set up: the tokenizer trained on the head, the model, the data, the trainer."""

    text: str
    head: str
    tail: str
    tok: ChatTokenizer
    cfg: GPTConfig
    module: CausalLMModule
    windows: RandomWindows
    trainer: L.Trainer
    curve: Curve
    prep_s: float
    workdir: tempfile.TemporaryDirectory

    def fit(self) -> float:
        """Trains; returns the seconds it took."""
        t = time.perf_counter()
        with self.workdir:
            loader = DataLoader(self.windows, batch_size=None, num_workers=0)
            self.trainer.fit(self.module, train_dataloaders=loader)
        return time.perf_counter() - t

    def tail_bits_per_byte(self) -> float:
        return text_bits_per_byte(self.module.model, self.tok, self.tail, self.cfg.block_size)[0]


def parse_sets(sets: list[str], model_cfg: dict, pre: dict) -> None:
    """Apply `section.key=value` items (a YAML value) to the preset's model / pretrain sections."""
    for item in sets:
        key, eq, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in ("model", "pretrain") or not name or not eq:
            raise SystemExit(f"--set {item!r}: expected model.KEY=VALUE or pretrain.KEY=VALUE")
        (model_cfg if section == "model" else pre)[name] = yaml.safe_load(value)


def protocol_run(
    preset: str,
    steps: int | None = None,
    *,
    text_path: Path = TEXT,
    batch_size: int | None = None,
    seed: int = 1337,
    sets: list[str] = (),
    compile_model: bool = False,
    callbacks: list[L.Callback] = (),
) -> ProtocolRun:
    """Set up the protocol for `preset` (+ `sets` overrides): nothing is trained yet."""
    model_cfg, pre = preset_sections(preset)
    parse_sets(list(sets), model_cfg, pre)
    vocab = int(preset_vocab(preset))
    steps = steps or int(pre.get("max_steps", 1000))
    batch_size = batch_size or int(pre.get("batch_size", 32))

    text = text_path.read_text(encoding="utf-8")
    head, tail = split_text(text)
    t = time.perf_counter()
    tok = ChatTokenizer(train_bpe([p for p in head.split("\n\n") if p.strip()], vocab_size=vocab))
    train_ids = np.asarray(tok.encode(head), dtype=np.int64)
    prep_s = time.perf_counter() - t

    L.seed_everything(seed, workers=True, verbose=False)
    cfg = GPTConfig(vocab_size=tok.vocab_size, **model_cfg)
    optim = OptimConfig(max_steps=steps, **{k: pre[k] for k in OPTIM_KEYS if k in pre})
    module = CausalLMModule(GPT(cfg), optim, compile_model=compile_model or bool(pre.get("compile")))
    curve = Curve(every=max(1, steps // 10))
    windows = RandomWindows(train_ids, cfg.block_size, batch_size, seed)
    workdir = tempfile.TemporaryDirectory()
    trainer = build_trainer(
        TrainerConfig(
            max_steps=steps,
            val_every_steps=0,
            val_batches=0,
            checkpoint_every_steps=0,
            log_every_steps=max(1, steps // 10),
            seed=seed,
            enable_progress_bar=False,
        ),
        default_root_dir=workdir.name,
        callbacks=[curve, *callbacks],
    )
    return ProtocolRun(text, head, tail, tok, cfg, module, windows, trainer, curve, prep_s, workdir)


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
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a model.* or pretrain.* value of the preset (a lever), e.g. model.qk_norm=true",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = protocol_run(
        args.preset,
        args.steps,
        text_path=args.text,
        batch_size=args.batch_size,
        seed=args.seed,
        sets=args.set,
        compile_model=args.compile,
    )
    train_s = run.fit()
    t = time.perf_counter()
    bpb = run.tail_bits_per_byte()
    eval_s = time.perf_counter() - t
    cfg, steps, batch_size = run.cfg, run.trainer.max_steps, run.windows.batch_size
    tokens = steps * batch_size * cfg.block_size
    n_params = sum(p.numel() for p in run.module.model.parameters())
    print(f"text: {args.text} ({len(run.text):,} chars; head {len(run.head):,}, tail {len(run.tail):,})")
    print(
        f"preset {args.preset}: {cfg.n_layer} layers x {cfg.n_embd}, block {cfg.block_size}, "
        f"vocab {run.tok.vocab_size}, {n_params:,} parameters; {steps} steps x {batch_size} windows"
    )
    print(f"levers: {' '.join(args.set) or '(none)'}{' compile' if args.compile else ''}")
    print("train loss curve (step, loss, seconds):")
    for step, loss, sec in run.curve.rows:
        print(f"  {step:6d}  {loss:7.4f}  {sec:7.1f}")
    print(
        f"tokenizer + encode: {run.prep_s:.1f} s; training: {train_s:.1f} s ({tokens / train_s:,.0f} tokens/s); "
        f"scoring: {eval_s:.1f} s"
    )
    print(f"wall time: {time.perf_counter() - wall:.1f} s")
    print(f"tail bits/byte: {bpb:.4f}   (reference: 2.739 in 100 s, issue 17)")


def preset_vocab(preset: str) -> int:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {**raw["presets"][preset].get("tokenizer", {}), **(raw.get("tokenizer") or {})}.get(
        "vocab_size", 4096
    )


if __name__ == "__main__":
    main()
