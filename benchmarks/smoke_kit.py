"""What benchmarks/gpu_smoke.py's steps share: the run context (device, shape, scale), timing and
memory on the device, determinism toggled for a block, probes that record an error as a figure, the
SDPA kernel torch picks per attention path, and the runner that writes the report after every step.
Training core only (torch, numpy, lmforge's core modules)."""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from lmforge.atomic import atomic_write_text
from lmforge.generation.driver import generate
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT, GPTConfig
from lmforge.seeding import seed_everything, use_deterministic
from lmforge.training import OptimConfig, build_optimizer
from lmforge.training.module import causal_lm_loss

BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
TINY = {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64}
# The work of each step: full on one GPU at the preset's shape; tiny in seconds on a CPU.
FULL_SCALE = {"batch": 32, "steps": 30, "warmup": 5, "fit_steps": 10, "fit_batch": 8, "sft_rows": 8}
FULL_SCALE |= {"prompts": 16, "group": 4, "new_tokens": 128, "engine_rows": 32, "mem_batch": 8}
TINY_SCALE = {"batch": 4, "steps": 6, "warmup": 2, "fit_steps": 4, "fit_batch": 4, "sft_rows": 4}
TINY_SCALE |= {"prompts": 4, "group": 2, "new_tokens": 16, "engine_rows": 8, "mem_batch": 2}


@dataclass
class Ctx:
    device: torch.device
    cfg: GPTConfig  # the benchmarked shape: the preset's, or TINY
    scale: dict
    tiny: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def model(self, cfg: GPTConfig | None = None) -> GPT:
        seed_everything(0)
        return GPT(cfg or self.cfg).to(self.device)

    def tokens(self, *shape: int, seed: int = 0) -> torch.Tensor:
        ids = np.random.default_rng(seed).integers(2, self.cfg.vocab_size, shape)
        return torch.from_numpy(ids).to(self.device)


# --------------------------------------------------------------------------- helpers


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def autocast(ctx: Ctx):
    """bf16 autocast on CUDA (what precision auto, bf16-mixed, trains with); fp32 elsewhere."""
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda)


def reset_peak(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_gib(ctx: Ctx) -> float | None:
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


@contextlib.contextmanager
def determinism(on: bool):
    """`seeding.use_deterministic(on)` for the block, torch's flags restored after."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    use_deterministic(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def attempt(fn: Callable[[], object]) -> dict:
    """{"ok": True} or the error's first line, with the warnings given (why a kernel was refused)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            out: dict = {"ok": True}
        except Exception as e:  # noqa: BLE001 - a probe's failure is its figure
            out = {"ok": False, "error": first_line(e)}
    said = list(dict.fromkeys(str(w.message).splitlines()[0][:200] for w in caught))[:3]
    return out | ({"warnings": said} if said else {})


class SDPAChoice(TorchFunctionMode):
    """The kernel of each SDPA call, as torch's own selection picks it (`torch._fused_sdp_choice`, which
    SDPA dispatches on), for the dtype autocast hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.picked: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            qkv, kind = args[:3], args[0].device.type
            if torch.is_autocast_enabled(kind):
                qkv = [t.to(torch.get_autocast_dtype(kind)) for t in qkv]
            self.picked.add(SDPBackend(torch._fused_sdp_choice(*qkv, *args[3:], **kwargs)).name)
        return func(*args, **kwargs)


def chosen_backend(fn: Callable[[], object]) -> str:
    """The SDPA kernel(s) torch picks on its own for `fn` (prefill and decode may differ), or the error."""
    try:
        with SDPAChoice() as choice:
            fn()
    except Exception as e:  # noqa: BLE001
        return "error: " + first_line(e)
    return "+".join(sorted(choice.picked))


def train_steps(ctx: Ctx, model: GPT, data: torch.Tensor, steps: int) -> dict:
    """The plain loop of `determinism_cost.child` and `train_throughput.plain_tokens_per_s`: AdamW,
    autocast, batch i = data[i % len]; the median step after the warm-up ones."""
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0, max_steps=steps))
    times = []
    for i in range(steps):
        t0, x = time.perf_counter(), data[i % len(data)]
        with autocast(ctx):
            loss = causal_lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(ctx)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[ctx.scale["warmup"] :])
    tps = data[0, :, 1:].numel() / step
    return {"tokens_per_s": tps, "step_ms": 1e3 * step, "first_step_s": times[0], "loss": loss.item()}


def attention_paths(ctx: Ctx, model: GPT, batch: int, length: int) -> dict[str, Callable[[], object]]:
    """Every way the model calls SDPA (grouped-query: n_kv_head < n_head), training ones forward and
    backward. Only the causal one passes no boolean attn_mask (model.py: `_attention_inputs`,
    `_segment_inputs`, `forward_slots`)."""
    x = ctx.tokens(batch, length)
    left_pad = torch.ones_like(x)
    left_pad[0, : length // 4] = 0  # reward / DPO / scoring rows: padding the fused path cannot skip
    segments = (torch.arange(length, device=ctx.device) * 3 // length + 1).expand(batch, -1)

    def train(**extra: torch.Tensor) -> Callable[[], object]:
        def run() -> None:
            with autocast(ctx):
                causal_lm_loss(model(x, **extra), x).backward()
            sync(ctx)

        return run

    # Serving runs the model in its own dtype (chat.serving_dtype: bf16 on a GPU), without autocast.
    served = copy.deepcopy(model).to(torch.bfloat16) if ctx.cuda else model

    def decode() -> None:
        generate(served, x[:, : length // 2].tolist(), SamplingParams(max_new_tokens=2, temperature=0))

    return {
        "causal (pretrain)": train(),
        "masked, padded (reward, DPO, scoring)": train(attention_mask=left_pad),
        "masked, packed (SFT)": train(segment_ids=segments),
        "masked, kv cache (serving, rollouts)": decode,
    }


# --------------------------------------------------------------------------- the runner


def run_steps(steps: dict, ctx: Ctx, out: Path, budget_s: float = 1e9, meta: dict | None = None) -> dict:
    """Run the steps in turn, recording status (ok / error / skipped), seconds and figures, and rewrite
    `out` atomically after each one: a failing step never stops those after it."""
    report = {
        "meta": {**(meta or {}), "finished": False},
        "steps": dict.fromkeys(steps, {"status": "pending"}),
    }
    atomic_write_text(out, json.dumps(report, indent=2))
    begun = time.perf_counter()
    for name, fn in steps.items():
        rec: dict = {"status": "skipped", "reason": f"skipped: the time budget of {budget_s:.0f} s was spent"}
        if time.perf_counter() - begun <= budget_s:
            t0 = time.perf_counter()
            try:
                rec = {"status": "ok", "figures": fn(ctx)}
            except Exception as e:  # noqa: BLE001 - recorded; the next step runs
                rec = {"status": "error", "error": first_line(e), "traceback": traceback.format_exc()[-4000:]}
            rec["seconds"] = time.perf_counter() - t0
            torch._dynamo.reset()
            reset_peak(ctx)
        report["steps"][name] = rec
        atomic_write_text(out, json.dumps(report, indent=2, default=str))
        detail = rec.get("figures", {}).get("summary") or rec.get("error") or rec.get("reason")
        print(f"[{name}] {rec['status']} {rec.get('seconds', 0):.1f}s: {detail}", flush=True)
    report["meta"] |= {"finished": True, "seconds": time.perf_counter() - begun}
    atomic_write_text(out, json.dumps(report, indent=2, default=str))
    return report
