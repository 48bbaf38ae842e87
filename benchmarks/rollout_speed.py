"""RLHF rollout speed: generated tokens per second of ``lmforge.training.rollouts.rollout`` on the pipeline's
SFT policy, with the rollout shape and sampling of params.yaml's rlhf section (GRPO: each prompt
``group_size`` times, ``rollout_batch_size`` prompts per batch; ``temperature``, ``top_k``, the chat
stop tokens, ``max_new_tokens``) and the prompts of the ingested training dialogues.

The baseline for issue 23 (one generation engine everywhere): run it before and after a change to
the decode path, back to back on the same machine, and compare the means with their spread.

    .venv/bin/python benchmarks/rollout_speed.py                       # models/sft, 10 rollout batches
    .venv/bin/python benchmarks/rollout_speed.py --repeats 20 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "sft")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--repeats", type=int, default=10, help="rollout batches timed (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmforge.generation.sampling_params import SamplingParams
    from lmforge.model_folder import load_gpt
    from lmforge.params import load_params
    from lmforge.stages.dialogues import conversations, prompts_of
    from lmforge.tokenizer import ChatTokenizer
    from lmforge.training.rollouts import rollout

    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"rollout_speed: no model folder at {args.model_dir} (run `make pipeline` first)")
    params = load_params(args.params)
    rp = params.rlhf
    policy, tok = load_gpt(args.model_dir).eval(), ChatTokenizer.load(args.model_dir)
    limit = policy.config.block_size - rp.max_new_tokens
    chats = prompts_of(conversations(ROOT, params, "train"), 10_000)  # what the rollouts sample from
    prompts = [
        ids for ids in (tok.render_chat(c, add_generation_prompt=True).ids for c in chats) if len(ids) < limit
    ]
    group = rp.group_size if rp.algorithm == "grpo" else 1
    per_batch = rp.rollout_batch_size
    if len(prompts) < per_batch:
        sys.exit(f"rollout_speed: only {len(prompts)} prompts fit the context")

    def batch(i: int) -> list[list[int]]:
        chosen = [prompts[(i * per_batch + j) % len(prompts)] for j in range(per_batch)]
        return [p for p in chosen for _ in range(group)]

    def sampling(i: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=rp.max_new_tokens,
            temperature=rp.temperature,
            top_k=rp.top_k,
            stop_token_ids=tok.stop_ids(chat=True),
            seed=1000 + i,
        )

    rollout(policy, batch(0), sampling(0), tok.pad_id)  # warm-up
    rates, tokens, seconds = [], [], []
    for i in range(1, args.repeats + 1):
        started = time.perf_counter()
        replies = rollout(policy, batch(i), sampling(i), tok.pad_id)
        took = time.perf_counter() - started
        count = sum(len(r) for r in replies)
        rates.append(count / took)
        tokens.append(count)
        seconds.append(took)
    figures = {
        "model_dir": str(args.model_dir),
        "rows_per_batch": per_batch * group,
        "max_new_tokens": rp.max_new_tokens,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "tokens_per_s_mean": statistics.mean(rates),
        "tokens_per_s_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
        "tokens_per_batch_mean": statistics.mean(tokens),
        "seconds_per_batch_mean": statistics.mean(seconds),
    }
    print(
        f"rollout: {figures['rows_per_batch']} rows x up to {rp.max_new_tokens} new tokens, "
        f"{figures['threads']} torch threads, {args.repeats} batches: "
        f"{figures['tokens_per_s_mean']:,.0f} ± {figures['tokens_per_s_std']:,.0f} tokens/s "
        f"({figures['tokens_per_batch_mean']:.0f} tokens in {figures['seconds_per_batch_mean'] * 1000:.0f} ms per batch)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
