"""Time to first token with automatic prefix caching: a request made of a shared system prompt
(``--system-tokens``, 100) plus a short user message (``--user-tokens``, 12), cache cold vs warm.

Each repetition draws a new system prompt (so nothing of it is cached) and sends, one at a time,
to an engine with the prefix cache on (``--cache-mb``, the service's default 64):

* **cold** - the system prompt with user message A: a miss; its whole blocks are stored;
* **warm** - the same system prompt with user message B: its cached blocks are copied into the
  row's slot and only the rest is prefilled;

and the cold request again to an engine with the cache off (**off**: what the cache's lookup and
insert cost on a miss). TTFT is submit -> the first token's event, on the engine's own thread, as
the service's ``lmforge_time_to_first_token_seconds`` measures it. The figures are the median over
repetitions with a bootstrap 95% interval of the median, the speed-up (cold / warm medians, with a
bootstrap interval of the ratio of medians) and the hit rate (hit / queried prompt tokens, from the
engine's stats).

The model is a random-weight GPT of a params.yaml preset's shape (``--preset small``: 12 layers,
768 wide, 32768-token vocabulary, GPT-2-124M class): prefill cost depends on the shape, not the
weights. Replies are not compared here (tests/test_prefix_cache.py does that).

    .venv/bin/python benchmarks/prefix_cache.py                   # small preset, 15 repetitions
    .venv/bin/python benchmarks/prefix_cache.py --preset tiny --reps 30 --json /tmp/prefix.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from intervals import bootstrap, bootstrap_ratio  # noqa: E402
from lmforge.generation.driver import ModelFront  # noqa: E402
from lmforge.generation.engine import ServingEngine  # noqa: E402
from lmforge.generation.interface import EngineError, Finished, Request  # noqa: E402
from lmforge.generation.outputs import StreamChunk  # noqa: E402
from lmforge.generation.sampling_params import SamplingParams  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.params import load_params  # noqa: E402


def build_model(preset: str, params_path: Path, seed: int) -> GPT:
    from lmforge.stages.fitting import gpt_config

    params = load_params(params_path, {"preset": preset})
    config = gpt_config(params.model, params.tokenizer.vocab_size)
    torch.manual_seed(seed)
    return GPT(config).eval()


def ttft(engine: ServingEngine, prompt: list[int]) -> float:
    """Seconds from submit to the first token's event (emitted on the engine thread)."""
    first: list[float] = []
    done = threading.Event()

    def emit(_index: int, event: object) -> None:
        if isinstance(event, StreamChunk | Finished) and not first:
            first.append(time.perf_counter())
        if isinstance(event, Finished | EngineError):
            done.set()

    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    start = time.perf_counter()
    engine.submit(Request(prompt, params, chat=False, stream=True), emit)
    if not done.wait(120) or not first:
        raise RuntimeError("no first token within 120 s")
    return first[0] - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="params.yaml preset whose model shape is used")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--system-tokens", type=int, default=100)
    p.add_argument("--user-tokens", type=int, default=12)
    p.add_argument("--cache-mb", type=float, default=64.0)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.preset, args.params, seed=0)
    cfg = model.config
    n_params = sum(t.numel() for t in model.parameters())
    front = ModelFront(model)
    common = {"max_batch": args.max_batch, "prefill_chunk": args.prefill_chunk, "timeout_s": None}
    on = ServingEngine(front, prefix_cache_mb=args.cache_mb, prefix_block=args.block, **common)
    off = ServingEngine(front, prefix_cache_mb=0, **common)
    rng = random.Random(1234)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, cfg.vocab_size) for _ in range(n)]

    try:
        for engine in (on, off):  # warm-up: first calls allocate and pick kernels
            for _ in range(2):
                ttft(engine, tokens(args.system_tokens + args.user_tokens))
        base = dict(on.stats)
        cold, warm, cache_off = [], [], []
        for _ in range(args.reps):
            system = tokens(args.system_tokens)
            user_a, user_b = tokens(args.user_tokens), tokens(args.user_tokens)
            cold.append(ttft(on, system + user_a))
            warm.append(ttft(on, system + user_b))
            cache_off.append(ttft(off, system + user_a))
        stats = on.stats
    finally:
        on.close(5)
        off.close(5)

    queried = stats["prefix_cache_queried_tokens"] - base["prefix_cache_queried_tokens"]
    hit = stats["prefix_cache_hit_tokens"] - base["prefix_cache_hit_tokens"]
    warm_queried = args.reps * (args.system_tokens + args.user_tokens)

    def summary(values: list[float]) -> dict:
        lo, hi = bootstrap(values, statistics.median)
        return {
            "median_ms": 1e3 * statistics.median(values),
            "ci95_ms": [1e3 * lo, 1e3 * hi],
            "min_ms": 1e3 * min(values),
            "max_ms": 1e3 * max(values),
        }

    speedup = statistics.median(cold) / statistics.median(warm)
    report = {
        "model": {
            "preset": args.preset,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head,
            "vocab_size": cfg.vocab_size,
            "params_M": n_params / 1e6,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "torch_threads": torch.get_num_threads(),
        "device": str(front.device),
        "reps": args.reps,
        "prompt": {"system_tokens": args.system_tokens, "user_tokens": args.user_tokens, "block": args.block},
        "ttft": {"cold": summary(cold), "warm": summary(warm), "cache_off": summary(cache_off)},
        "speedup_cold_over_warm": speedup,
        "speedup_ci95": list(bootstrap_ratio(cold, warm)),
        "speedup_off_over_warm": statistics.median(cache_off) / statistics.median(warm),
        "hit_rate_all": hit / queried if queried else 0.0,
        "hit_rate_warm": hit / warm_queried,
        "engine_stats": stats,
    }
    print(
        f"model: preset {args.preset}, {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, "
        f"{n_params / 1e6:.0f}M params, {report['model']['dtype']}, {report['device']}, "
        f"{report['torch_threads']} threads"
    )
    print(
        f"prompt: {args.system_tokens}-token system prompt + {args.user_tokens}-token user message; "
        f"blocks of {args.block}; {args.reps} repetitions"
    )
    print(f"{'TTFT (ms)':<22}{'median':>9}{'95% CI':>22}{'min':>9}{'max':>9}")
    for name, key in (
        ("cache off", "cache_off"),
        ("cache on, cold (miss)", "cold"),
        ("cache on, warm (hit)", "warm"),
    ):
        s = report["ttft"][key]
        ci = f"[{s['ci95_ms'][0]:.1f}, {s['ci95_ms'][1]:.1f}]"
        print(f"{name:<22}{s['median_ms']:>9.1f}{ci:>22}{s['min_ms']:>9.1f}{s['max_ms']:>9.1f}")
    lo, hi = report["speedup_ci95"]
    print(
        f"speed-up cold/warm: {speedup:.2f}x (95% CI {lo:.2f}-{hi:.2f}); off/warm: {report['speedup_off_over_warm']:.2f}x"
    )
    print(
        f"hit rate: {report['hit_rate_warm']:.1%} of warm requests' prompt tokens, "
        f"{report['hit_rate_all']:.1%} of all looked up ({hit}/{queried})"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
