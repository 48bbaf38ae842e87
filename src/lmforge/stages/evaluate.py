"""Stage `evaluate`: one report over the base, SFT and tuned models (+ the reward model).

Per model: val bits per byte, held-out assistant loss, end-of-turn rate and mean reward of
greedy replies to held-out prompts. Reward model: held-out preference accuracy and margin.
Writes `metrics/evaluate.json` (via the stage runner) and a markdown report with samples.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.evaluation import assistant_loss, full_val_loss, preference_accuracy, reply_stats
from lmforge.generation.chat import ChatEngine, default_device
from lmforge.model_folder import load_gpt, load_reward_model
from lmforge.params import Params
from lmforge.stages import begin
from lmforge.stages.dialogues import conversations, pairs, prompts_of
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import ShardInfo, bits_per_byte, encode_pairs, encode_sft

SAMPLES_IN_REPORT = 6


def _report(metrics: dict, prompts: list[list[dict]], replies: dict[str, list[str]]) -> str:
    rows = [
        ("val bits per byte", "val_bits_per_byte"),
        ("held-out assistant loss", "assistant_loss"),
        ("end-of-turn rate", "end_of_turn_rate"),
        ("mean reward (RM)", "mean_reward"),
        ("mean reply tokens", "mean_length"),
    ]
    lines = ["# lmforge evaluation", "", "| metric | base | sft | tuned |", "|---|---|---|---|"]
    for label, key in rows:
        lines.append(
            f"| {label} | " + " | ".join(f"{metrics[m][key]:.4f}" for m in ("base", "sft", "tuned")) + " |"
        )
    rm = metrics["reward_model"]
    lines += [
        "",
        f"Reward model: held-out accuracy **{rm['accuracy']:.3f}**, mean margin {rm['margin']:.3f}.",
        f"Tuned minus SFT mean reward: **{metrics['reward_gain']:+.4f}**.",
        "",
        "## Samples (greedy)",
        "",
    ]
    for i, prompt in enumerate(prompts[:SAMPLES_IN_REPORT]):
        lines += [f"### {prompt[-1]['content'][:200]!r}", ""]
        lines += [f"- **{name}**: {reply[i][:300]!r}" for name, reply in replies.items()]
        lines.append("")
    return "\n".join(lines)


def run(params: Params, root: Path) -> dict:
    import mlflow

    ep = params.evaluate
    seed = begin(params, "evaluate")
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    shard_dir = root / params.tokenizer.shards_dir
    info = ShardInfo.load(shard_dir)
    device = default_device()  # the GPU when there is one ($LMFORGE_DEVICE overrides)
    rm = load_reward_model(root / params.reward.out_dir).to(device)
    val_convs = conversations(root, params, "val")
    prompts = prompts_of(val_convs, ep.eval_prompts)
    models = {"base": params.pretrain.out_dir, "sft": params.sft.out_dir, "tuned": params.rlhf.out_dir}
    metrics: dict = {}
    replies: dict[str, list[str]] = {}
    for name, folder in models.items():
        model = load_gpt(root / folder).to(device)
        block = model.config.block_size
        val_examples, _ = encode_sft(tok, val_convs, block)
        loss = full_val_loss(model, shard_dir, info, block)
        stats = reply_stats(
            ChatEngine(model, tok),
            prompts,
            max_new_tokens=ep.max_new_tokens,
            temperature=ep.temperature,
            seed=seed,
            rm=rm,
        )
        replies[name] = stats.pop("replies")
        metrics[name] = {
            "val_bits_per_byte": round(float(bits_per_byte(loss, info.tokens_per_byte("val"))), 4),
            "assistant_loss": round(assistant_loss(model, val_examples, block, tok.pad_id), 4),
            **{k: round(v, 4) for k, v in stats.items()},
        }
    val_pairs, _ = encode_pairs(tok, pairs(root, params, "val"), rm.config.block_size)
    metrics["reward_model"] = {
        k: round(v, 4) for k, v in preference_accuracy(rm, val_pairs, tok.pad_id).items()
    }
    metrics["reward_gain"] = round(metrics["tuned"]["mean_reward"] - metrics["sft"]["mean_reward"], 4)
    report = root / ep.report
    atomic_write_text(report, _report(metrics, prompts, replies) + "\n")
    mlflow.log_artifact(str(report))
    return metrics
