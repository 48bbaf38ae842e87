"""What determinism costs: training tokens/s with and without each reproducibility switch.

    python benchmarks/determinism_cost.py --preset tiny --steps 40 --repeats 3

Each setting trains the preset's GPT from the same seed on the same batches, in its own process
(MKL reads MKL_CBWR once, when it starts), with the repeats alternated so that machine noise spreads
over all settings. Prints the best tokens/s of each setting, its cost against the baseline, and
whether its repeats gave bitwise equal weights. Settings:

- baseline: no deterministic algorithms; MKL started before MKL_CBWR is set (MKL's default);
- deterministic: torch.use_deterministic_algorithms(True) (and cudnn.deterministic on CUDA);
- deterministic+cbwr-auto: plus MKL_CBWR=AUTO, what lmforge runs with (params deterministic: true);
- deterministic+cbwr-compatible: plus MKL_CBWR=COMPATIBLE (results equal across CPU generations).

Needs only the training core, so it runs on a bare GPU image too (where MKL_CBWR does nothing and
CUBLAS_WORKSPACE_CONFIG is the switch that matters).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "baseline": {"deterministic": False, "MKL_CBWR": None},
    "deterministic": {"deterministic": True, "MKL_CBWR": None},
    "deterministic+cbwr-auto": {"deterministic": True, "MKL_CBWR": "AUTO"},
    "deterministic+cbwr-compatible": {"deterministic": True, "MKL_CBWR": "COMPATIBLE"},
}


def child(setting: str, preset: str, steps: int, warmup: int) -> dict:
    """Train in this process under one setting; the timing and a hash of the final weights."""
    import torch

    spec = SETTINGS[setting]
    if spec["MKL_CBWR"] is None:
        torch.ones(8, 8) @ torch.ones(8, 8)  # MKL starts now, before lmforge sets MKL_CBWR
    import hashlib
    import time

    import numpy as np
    import yaml

    from lmforge.model import GPT, GPTConfig
    from lmforge.seeding import seed_everything, use_deterministic
    from lmforge.training import OptimConfig, build_optimizer
    from lmforge.training.module import causal_lm_loss

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    chosen = raw["presets"][preset]
    cfg = GPTConfig(vocab_size=chosen["tokenizer"]["vocab_size"], **chosen["model"])
    batch_size = chosen["pretrain"]["batch_size"]
    use_deterministic(spec["deterministic"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(0)
    model = GPT(cfg).to(device)
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0, max_steps=steps + warmup))
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, cfg.vocab_size, (steps + warmup, batch_size, cfg.block_size + 1)))
    start = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x = data[i].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = causal_lm_loss(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().float().cpu().numpy().tobytes())
    return {
        "tokens_per_s": steps * batch_size * cfg.block_size / seconds,
        "weights": h.hexdigest()[:16],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.preset, args.steps, args.warmup)))
        return

    results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(args.repeats):
        for setting, spec in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
            if spec["MKL_CBWR"] is not None:
                env["MKL_CBWR"] = spec["MKL_CBWR"]
            cmd = [sys.executable, __file__, "--child", setting, "--preset", args.preset]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = results["baseline"][0]
    print(f"preset={args.preset} device={first['device']} threads={first['threads']} steps={args.steps}")
    base = max(r["tokens_per_s"] for r in results["baseline"])
    print(f"{'setting':32s} {'tokens/s':>10s} {'vs baseline':>12s}  repeats bitwise equal")
    for setting, runs in results.items():
        best = max(r["tokens_per_s"] for r in runs)
        equal = len({r["weights"] for r in runs}) == 1
        print(f"{setting:32s} {best:10,.0f} {best / base - 1:+11.1%}  {equal}")


if __name__ == "__main__":
    main()
