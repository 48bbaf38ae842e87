"""Where a training step's time goes on this machine: torch profiler over Lightning steps.

    python benchmarks/profile_step.py                      # tiny preset, as params.yaml has it
    python benchmarks/profile_step.py --set model.mlp=relu2 --steps 30

Trains the preset on tiny-shakespeare's first 90% exactly as `train_protocol.py` does (the shared
Lightning core, random windows), lets `--warmup` steps pass, then records `--steps` steps with
torch.profiler. Prints the wall time per step and how the operators' own CPU time splits:

- matmul: aten::mm / addmm / bmm / baddbmm (the Linear layers, forward and backward);
- attention: the fused SDPA kernels (flash attention for CPU, forward and backward);
- optimizer: AdamW's foreach ops (Muon's Newton-Schulz iterations are matmuls, counted there);
- everything else by operator (elementwise, norms, softmax/cross-entropy, copies...);

and the rest of the wall time, spent outside any operator: Python, Lightning's loop, logging and
data loading. The matmul share is matmul time / wall time. Training core only.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_protocol import protocol_run  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product_flash_attention"


class StepProfiler(L.Callback):
    """Profiles steps [warmup, warmup + steps) and times them."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.prof: torch.profiler.profile | None = None
        self.t0 = self.wall = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.prof is None:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            )
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.prof is not None and not self.wall and trainer.global_step == self.warmup + self.steps:
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)


def split(prof: torch.profiler.profile) -> dict[str, float]:
    """Self CPU time (s) by category: matmul, attention, optimizer (foreach ops), else by operator."""
    by: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        seconds = e.self_cpu_time_total / 1e6
        if e.key in MATMUL:
            by["matmul"] += seconds
        elif e.key.startswith(ATTENTION_PREFIX):
            by["attention (SDPA kernels)"] += seconds
        elif e.key.startswith("aten::_foreach"):
            by["optimizer (foreach ops)"] += seconds
        else:
            by[e.key] += seconds
    return by


def shapes(prof: torch.profiler.profile, op: str, top: int = 6) -> list[tuple[str, float, int]]:
    """The input shapes `op` ran on that took the most self time: (shapes, seconds, calls)."""
    rows = [
        (str(e.input_shapes), e.self_cpu_time_total / 1e6, e.count)
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == op
    ]
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="operators listed besides matmul")
    parser.add_argument("--shapes", action="append", default=[], metavar="OP", help="e.g. aten::mul")
    args = parser.parse_args()
    total = args.warmup + args.steps
    profiler = StepProfiler(args.warmup, args.steps)
    run = protocol_run(args.preset, total, sets=args.set, compile_model=args.compile, callbacks=[profiler])
    run.fit()
    assert profiler.prof is not None and profiler.wall, "the profiled steps did not run"
    by = split(profiler.prof)
    ops = sum(by.values())
    wall = profiler.wall
    print(f"levers: {' '.join(args.set) or '(none)'}{' compile' if args.compile else ''}")
    print(f"{args.steps} steps after {args.warmup}: {wall / args.steps * 1e3:.1f} ms per step (profiled)")
    print(f"{'':34s} {'ms/step':>8s} {'share':>6s}")
    rows = sorted(by.items(), key=lambda kv: -kv[1])
    named = [r for r in rows if r[0] in ("matmul", "attention (SDPA kernels)")]
    rest = [r for r in rows if r not in named]
    for name, seconds in named + rest[: args.top]:
        print(f"  {name[:32]:32s} {seconds / args.steps * 1e3:8.2f} {seconds / wall:6.1%}")
    other = sum(s for _, s in rest[args.top :])
    print(f"  {'(other operators)':32s} {other / args.steps * 1e3:8.2f} {other / wall:6.1%}")
    outside = max(wall - ops, 0.0)
    print(
        f"  {'(outside operators: Python etc.)':32s} {outside / args.steps * 1e3:8.2f} {outside / wall:6.1%}"
    )
    for op in args.shapes:
        print(f"{op} by input shapes (ms/step, calls/step):")
        for shape, seconds, calls in shapes(profiler.prof, op):
            print(f"  {seconds / args.steps * 1e3:8.2f} {calls / args.steps:6.1f}  {shape}")
    print(f"matmul share of step time: {by['matmul'] / wall:.1%}")


if __name__ == "__main__":
    main()
