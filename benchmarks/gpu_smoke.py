"""GPU smoke benchmark: each path of the training core once, with its figures, in a few minutes.

    python benchmarks/gpu_smoke.py --out smoke.json                  # one H100, the `small` preset: < 8 min
    python benchmarks/gpu_smoke.py --device cpu --tiny --out s.json  # a tiny model: well under a minute
    python benchmarks/gpu_smoke.py --only sdpa engine --out s.json

Each step records its status (ok, or error with the message; the next step runs all the same), seconds
and figures, and prints one line. The JSON is rewritten atomically after every step, so a run cut short
keeps what finished. Exit status 1 when a step failed. Imports only the training core (torch,
pytorch_lightning, numpy, pyyaml and lmforge's core modules), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as L
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmforge.generation.driver import ModelFront, generate
from lmforge.generation.engine import ServingEngine
from lmforge.generation.interface import Request
from lmforge.generation.sampling_params import SamplingParams
from lmforge.model import GPT, GPTConfig
from lmforge.seeding import environment
from lmforge.training import (
    CausalLMModule,
    OptimConfig,
    SFTDataModule,
    TokenShardDataModule,
    TrainerConfig,
    build_optimizer,
    fit,
)
from lmforge.training import rl_losses as rl
from lmforge.training.module import causal_lm_loss, peak_flops
from lmforge.training.rollouts import rollout
from lmforge.training.trainer import checkpoint_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke_kit import (  # noqa: E402
    BACKENDS,
    FULL_SCALE,
    TINY,
    TINY_SCALE,
    Ctx,
    attempt,
    attention_paths,
    autocast,
    chosen_backend,
    determinism,
    first_line,
    peak_gib,
    reset_peak,
    run_steps,
    sync,
    train_steps,
)
from train_throughput import ROOT, preset_sections  # noqa: E402

# --------------------------------------------------------------------------- the steps


def step_environment(ctx: Ctx) -> dict:
    with torch.device("meta"):
        fpt = GPT(ctx.cfg).flops_per_token()
    out = {"torch": torch.__version__, "lightning": L.__version__, "cuda": torch.version.cuda}
    out |= {"flops_per_token": fpt, "environment": environment(ctx.device), "device_name": "cpu"}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out |= {"device_name": props.name, "capability": f"{props.major}.{props.minor}"}
        out |= {"bf16_supported": torch.cuda.is_bf16_supported(), "peak_flops": peak_flops(ctx.device)}
        out |= {"memory_gib": props.total_memory / 2**30, "cudnn": torch.backends.cudnn.version()}
    else:
        bf16 = torch.ones(2, 2, dtype=torch.bfloat16)
        out |= {"bf16_supported": attempt(lambda: bf16 @ bf16)["ok"], "peak_flops": None}
    peak = f"peak {out['peak_flops'] / 1e12:.0f} TFLOP/s" if out["peak_flops"] else "no peak"
    out["summary"] = f"{out['device_name']}, torch {torch.__version__}, bf16 {out['bf16_supported']}, {peak}"
    return out


def step_sdpa(ctx: Ctx) -> dict:
    probe = replace(ctx.cfg, n_layer=1, block_size=min(ctx.cfg.block_size, 256))
    assert probe.n_kv_head < probe.n_head, "the probe must exercise grouped-query attention"
    model, out = ctx.model(probe), {"head_dim": probe.head_dim, "n_head": probe.n_head}
    for det in (False, True):
        for name, fn in attention_paths(ctx, model, 2, probe.block_size).items():
            with determinism(det):
                row = {"default": chosen_backend(fn)}
                for backend in BACKENDS:
                    with sdpa_kernel([getattr(SDPBackend, backend)]):
                        row[backend] = attempt(fn)
            out.setdefault(name, {})[f"deterministic={det}"] = row
    picks = []
    for path, v in out.items():
        if isinstance(v, dict):
            off, on = v["deterministic=False"]["default"], v["deterministic=True"]["default"]
            picks.append(f"{path.split(' (')[0]} {off}" + (f" (deterministic: {on})" if on != off else ""))
    out["summary"] = "; ".join(picks)
    if not ctx.cuda:
        out["peak_memory_gib"] = "skipped: needs cuda"
        return out
    # Peak memory of a forward + backward at the benchmarked shape: fused causal vs the masked paths.
    model, mem = ctx.model(), {"batch": ctx.scale["mem_batch"], "seq_len": ctx.cfg.block_size}
    for name, fn in list(attention_paths(ctx, model, mem["batch"], mem["seq_len"]).items())[:3]:
        reset_peak(ctx)
        result = attempt(fn)
        mem[name] = peak_gib(ctx) if result["ok"] else result["error"]
        model.zero_grad(set_to_none=True)
    out["peak_memory_gib"] = mem
    out["summary"] += "; peak GiB " + ", ".join(f"{v:.1f}" for v in mem.values() if isinstance(v, float))
    return out


def step_deterministic_probes(ctx: Ctx) -> dict:
    cfg = ctx.cfg if ctx.tiny else replace(ctx.cfg, block_size=128)
    model, x = ctx.model(cfg), ctx.tokens(2, cfg.block_size)

    def optimizer_step(kind: str) -> Callable[[], object]:
        def run() -> None:
            opt, sched = build_optimizer(model, OptimConfig(optimizer=kind, warmup_steps=0, max_steps=2))
            with autocast(ctx):
                causal_lm_loss(model(x), x).backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

        return run

    def rl_losses() -> None:  # PPO/GRPO's token log-probs (gather), GAE, whitening, entropy
        with autocast(ctx):
            logits = model(x)
        logp, mask = rl.token_logprobs(logits, x), torch.ones_like(x[:, 1:], dtype=torch.float)
        adv, _ = rl.gae(torch.randn_like(logp), logp.detach(), mask, 1.0, 0.95)
        loss = rl.ppo_policy_loss(logp, logp.detach(), rl.masked_whiten(adv, mask), mask, 0.2)[0]
        (loss + rl.masked_mean(rl.entropy_from_logits(logits[:, :-1]), mask)).backward()

    def sampling() -> None:  # every row-wise logits processor of the engine
        knobs = {"top_k": 20, "top_p": 0.9, "min_p": 0.01, "repetition_penalty": 1.1, "logprobs": 2}
        knobs |= {"presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 0}
        generate(model, x[:, : cfg.block_size // 2].tolist(), SamplingParams(max_new_tokens=4, **knobs))

    probes = {"adamw step": optimizer_step("adamw"), "muon step": optimizer_step("muon")}
    probes |= {f"fwd/bwd {k}": v for k, v in attention_paths(ctx, model, 2, cfg.block_size).items()}
    probes |= {"rl losses": rl_losses, "sampling": sampling}
    with determinism(True):
        out = {name: attempt(fn) for name, fn in probes.items()}
    failed = [k for k, v in out.items() if not v["ok"]]
    summary = f"{len(out) - len(failed)}/{len(out)} ran" + "".join(f"; {k} raised" for k in failed)
    return {"all_ok": not failed, "probes": out, "summary": summary}


def step_train_small(ctx: Ctx) -> dict:
    data = torch.stack([ctx.tokens(ctx.scale["batch"], ctx.cfg.block_size + 1, seed=i) for i in range(4)])
    # Inductor spends ~30 s compiling C++ on a CPU even for the tiny model: there --tiny only traces.
    backend = "aot_eager" if ctx.tiny and not ctx.cuda else "inductor"
    out: dict = {"batch": ctx.scale["batch"], "seq_len": ctx.cfg.block_size, "compile_backend": backend}
    for mode in ("eager", "compiled"):
        model = ctx.model()
        try:  # a compile failure (no compiler, a graph that does not trace) keeps the eager figures
            if mode == "compiled":
                model.compile(backend=backend)
            reset_peak(ctx)
            r = out[mode] = train_steps(ctx, model, data, ctx.scale["steps"])
        except Exception as e:  # noqa: BLE001
            out[mode] = {"error": first_line(e)}
            continue
        r["peak_memory_gib"] = peak_gib(ctx)
        r["mfu"] = model.flops_per_token() * r["tokens_per_s"] / peak_flops(ctx.device) if ctx.cuda else None
        r["compile_s"] = r["first_step_s"] - r["step_ms"] / 1e3  # the first step less a steady one
    lines = []
    for mode, r in ((m, out[m]) for m in ("eager", "compiled")):
        if "error" in r:
            lines.append(f"{mode} {r['error'][:160]}")
            continue
        lines.append(
            f"{mode} {r['tokens_per_s']:,.0f} tok/s"
            + (f" ({backend}, compile {r['compile_s']:.1f} s)" if mode == "compiled" else "")
        )
        if ctx.cuda:
            lines[-1] += f" MFU {r['mfu']:.1%} peak {r['peak_memory_gib']:.1f} GiB"
    return out | {"summary": "; ".join(lines)}


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(
            float(trainer.callback_metrics["train/loss"])
        )  # as logged; outputs are / accumulation


def step_pretrain(ctx: Ctx) -> dict:
    cfg, steps, log = ctx.cfg, ctx.scale["fit_steps"], LossLog()
    with tempfile.TemporaryDirectory() as tmp:
        shards, run = Path(tmp) / "shards", Path(tmp) / "run"
        shards.mkdir()
        tokens = {"train": 64 * cfg.block_size, "val": 8 * cfg.block_size}
        for split, n in tokens.items():
            ctx.tokens(n).cpu().numpy().astype(np.uint16).tofile(shards / f"{split}.bin")
        sidecar = dict(
            dtype="uint16", vocab_size=cfg.vocab_size, tokens=tokens, bytes=tokens, bos_id=0, eos_id=1
        )
        (shards / "shards.json").write_text(json.dumps(sidecar))
        tcfg = TrainerConfig(
            max_steps=steps,
            accumulate_grad_batches=2,
            val_every_steps=steps,
            val_batches=2,
            checkpoint_every_steps=steps,
            enable_progress_bar=False,
            devices=1,
            accelerator="gpu" if ctx.cuda else "cpu",
        )
        module = CausalLMModule(ctx.model().cpu(), OptimConfig(lr=1e-3, warmup_steps=1, max_steps=steps))
        data = TokenShardDataModule(shards, cfg.block_size, ctx.scale["fit_batch"], seed=0, val_batches=2)
        started = time.perf_counter()
        trainer = fit(module, data, tcfg, resume=False, default_root_dir=run, callbacks=[log])
        seconds = time.perf_counter() - started
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        out = {"steps": trainer.global_step, "micro_batches": len(log.losses), "seconds": seconds}
        out |= {"loss_first": log.losses[0], "loss_last": log.losses[-1], "val_loss": m.get("val/loss")}
        out |= {"tokens_per_s": m.get("throughput/tokens_per_sec"), "mfu": m.get("throughput/mfu")}
        out["checkpoint_exists"] = (checkpoint_dir(run) / "last.ckpt").is_file()
    loss = f"loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}, val {out['val_loss']:.3f}"
    out["summary"] = f"{out['steps']} steps x 2 micro-batches in {seconds:.1f} s, {loss}, last.ckpt"
    out["summary"] += " saved" if out["checkpoint_exists"] else " MISSING"
    return out


def step_sft_packed(ctx: Ctx) -> dict:
    T, rng, examples = ctx.cfg.block_size, np.random.default_rng(0), []
    for n in rng.integers(T // 8, T // 2, ctx.scale["sft_rows"] * 6).tolist():  # (ids, assistant mask)
        examples.append(
            (rng.integers(2, ctx.cfg.vocab_size, n).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
        )
    data = SFTDataModule(examples, examples[:4], ctx.scale["sft_rows"], pad_id=0, block_size=T, pack=True)
    batch = {k: v.to(ctx.device) for k, v in next(iter(data.train_dataloader())).items()}
    module, fwd, bwd = CausalLMModule(ctx.model(), OptimConfig()), [], []
    for _ in range(6):
        t0 = time.perf_counter()
        with autocast(ctx):
            loss = module.compute_loss(batch)[0]
        sync(ctx)
        t1 = time.perf_counter()
        loss.backward()
        sync(ctx)
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
        module.model.zero_grad(set_to_none=True)
    real, f, b = int(batch["attention_mask"].sum()), statistics.median(fwd[1:]), statistics.median(bwd[1:])
    out = {"shape": list(batch["input_ids"].shape), "fill": real / batch["input_ids"].numel()}
    out |= {"segments_per_row": batch["segment_ids"].amax(1).float().mean().item(), "loss": loss.item()}
    out |= {"forward_ms": 1e3 * f, "backward_ms": 1e3 * b, "tokens_per_s": real / (f + b)}
    out["summary"] = f"{out['shape']} packed, {out['segments_per_row']:.1f} per row, fill {out['fill']:.0%}: "
    out["summary"] += f"fwd {1e3 * f:.1f} ms, bwd {1e3 * b:.1f} ms, {real / (f + b):,.0f} tok/s"
    return out


def step_rollouts(ctx: Ctx) -> dict:
    s, model, rng = ctx.scale, ctx.model().eval(), np.random.default_rng(0)
    lengths = rng.integers(8, max(9, ctx.cfg.block_size // 4), s["prompts"]).tolist()
    prompts = [rng.integers(2, ctx.cfg.vocab_size, n).tolist() for n in lengths for _ in range(s["group"])]
    out, lines = {"rows": len(prompts), "max_new_tokens": s["new_tokens"]}, []
    # PolicyRLModule samples inside its training step: under autocast when precision is bf16-mixed.
    modes = {
        "fp32": contextlib.nullcontext,
        "autocast bf16": lambda: torch.autocast(ctx.device.type, torch.bfloat16),
    }
    for mode, cast in modes.items():
        rates = []
        try:
            for i in range(3):  # the first is a warm-up
                params = SamplingParams(max_new_tokens=s["new_tokens"], temperature=1.0, top_k=50, seed=i)
                started = time.perf_counter()
                with cast():
                    tokens = sum(len(r) for r in rollout(model, prompts, params, pad_id=0))
                rates.append(tokens / (time.perf_counter() - started))
            out[mode] = {"tokens_per_s": statistics.mean(rates[1:])}
            lines.append(f"{mode} {out[mode]['tokens_per_s']:,.0f} tok/s")
        except Exception as e:  # noqa: BLE001 - recorded with the mode
            out[mode] = {"error": first_line(e)}
            lines.append(f"{mode} {out[mode]['error'][:160]}")
    return out | {"summary": f"{len(prompts)} rows x {s['new_tokens']} tokens: " + "; ".join(lines)}


def engine_run(model: GPT, rows: int, prompt_len: int, new_tokens: int) -> dict:
    """A ServingEngine driven on this thread as `driver.run` drives it, each iteration timed."""
    engine = ServingEngine(ModelFront(model), max_batch=rows, max_queue=rows, timeout_s=None, thread=False)
    params = SamplingParams(max_new_tokens=new_tokens, top_p=0.95, seed=0)
    rng, decode = np.random.default_rng(0), []
    with torch.inference_mode():
        for i in range(rows):
            prompt = rng.integers(2, model.config.vocab_size, prompt_len).tolist()
            engine.submit(Request(prompt, params, chat=False, seed_index=i), lambda *_: None)
        started = time.perf_counter()
        while not engine.idle:
            before, t0 = dict(engine.stats), time.perf_counter()
            engine.iterate()
            if engine.stats["prefill_chunks"] == before["prefill_chunks"]:  # a decode step alone
                decode.append(time.perf_counter() - t0)
        tps = engine.stats["tokens"] / (time.perf_counter() - started)
    step_ms = 1e3 * statistics.median(decode)
    return {"tokens": engine.stats["tokens"], "tokens_per_s": tps, "decode_step_ms": step_ms}


def step_engine(ctx: Ctx) -> dict:
    out, lines, prompt_len, new = {}, [], min(64, ctx.cfg.block_size // 4), ctx.scale["new_tokens"]
    for dtype in (torch.float32, torch.bfloat16):
        model = ctx.model().eval().to(dtype)
        for rows in (1, ctx.scale["engine_rows"]):
            key = f"{str(dtype)[6:]} x{rows}"
            try:
                engine_run(model, rows, prompt_len, new)  # warm-up
                r = out[key] = engine_run(model, rows, prompt_len, new)
                lines.append(f"{key} {r['tokens_per_s']:,.0f} tok/s {r['decode_step_ms']:.2f} ms/step")
            except Exception as e:  # noqa: BLE001 - bf16 on a CPU may not work: recorded
                out[key] = {"error": first_line(e)}
                lines.append(f"{key} {out[key]['error'][:80]}")
    return out | {"summary": "; ".join(lines)}


def step_determinism_cost(ctx: Ctx) -> dict:
    """`determinism_cost.py`'s comparison in this process: the same seed and batches in both settings,
    repeats alternated, the best tokens/s of each; and whether each setting's repeats are bitwise equal."""
    data = torch.stack([ctx.tokens(ctx.scale["batch"], ctx.cfg.block_size + 1, seed=i) for i in range(4)])
    best, weights = {}, {}
    for _ in range(2):
        for name in ("baseline", "deterministic"):
            with determinism(name == "deterministic"):
                model = ctx.model()
                tps = train_steps(ctx, model, data, ctx.scale["steps"])["tokens_per_s"]
            best[name] = max(best.get(name, 0.0), tps)
            blob = b"".join(p.detach().float().cpu().numpy().tobytes() for p in model.parameters())
            weights.setdefault(name, set()).add(hashlib.sha256(blob).hexdigest())
    cost, equal = 1 - best["deterministic"] / best["baseline"], {k: len(v) == 1 for k, v in weights.items()}
    summary = f"tok/s {best['baseline']:,.0f}, deterministic {best['deterministic']:,.0f} (cost {cost:+.1%})"
    return {"tokens_per_s": best, "cost": cost, "repeats_bitwise_equal": equal, "summary": summary}


STEPS: dict[str, Callable[[Ctx], dict]] = {
    "environment": step_environment,
    "sdpa": step_sdpa,
    "deterministic_probes": step_deterministic_probes,
    "train_small": step_train_small,
    "pretrain": step_pretrain,
    "sft_packed": step_sft_packed,
    "rollouts": step_rollouts,
    "engine": step_engine,
    "determinism_cost": step_determinism_cost,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny model and few steps (seconds on a CPU)")
    ap.add_argument("--out", type=Path, default=Path("gpu_smoke.json"), help="the JSON report")
    ap.add_argument("--only", nargs="+", choices=list(STEPS), metavar="STEP", help=", ".join(STEPS))
    ap.add_argument("--preset", default="small", help="the params.yaml preset benchmarked without --tiny")
    ap.add_argument("--budget-s", type=float, default=420.0, help="steps not begun by then are skipped")
    ap.add_argument("--fail-step", choices=list(STEPS), help="make this step raise (tests the runner)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible (use --device cpu)")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lmforge.serving").setLevel(logging.CRITICAL)  # failures are recorded per step
    warnings.filterwarnings("ignore", ".*(does not have many workers|Tensor Cores|LeafSpec).*")
    cfg = GPTConfig(**TINY)
    # Without --tiny: the preset's model section with params.yaml's overrides, as train_throughput reads it.
    if not args.tiny:
        tokenizer = yaml.safe_load((ROOT / "params.yaml").read_text())["presets"][args.preset]["tokenizer"]
        cfg = GPTConfig(vocab_size=tokenizer["vocab_size"], **preset_sections(args.preset)[0])
    ctx = Ctx(torch.device(args.device), cfg, TINY_SCALE if args.tiny else FULL_SCALE, args.tiny)
    steps = {k: v for k, v in STEPS.items() if not args.only or k in args.only}
    if args.fail_step in steps:

        def fail(ctx: Ctx) -> dict:
            raise RuntimeError(f"forced by --fail-step {args.fail_step}")

        steps[args.fail_step] = fail
    meta = {"argv": sys.argv[1:] if argv is None else argv, "device": args.device, "model": cfg.to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run_steps(steps, ctx, args.out, args.budget_s, meta | {"tiny": args.tiny, "preset": args.preset})
    return 1 if any(r["status"] == "error" for r in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
