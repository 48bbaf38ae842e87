"""Stage `evaluate`: one report over the base, SFT and tuned models (+ the reward model).

Per model: val bits per byte, held-out assistant loss, end-of-turn rate and mean reward of
greedy replies to held-out prompts. Reward model: held-out preference accuracy and margin.
Every figure carries its 95% bootstrap interval over its held-out items (windows of the val text,
dialogues, prompts, pairs: :mod:`lmforge.stats`), as ``<figure>_ci_low`` / ``<figure>_ci_high``
beside it; the reward gain (tuned minus SFT, the same prompts) is a paired comparison with its
p-value. Writes `metrics/evaluate.json` (via the stage runner) and a markdown report with samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge import stats
from lmforge.atomic import atomic_write_text
from lmforge.evaluation import item_scores, judged_items, preference_margins
from lmforge.generation.chat import default_device
from lmforge.model_folder import load_gpt, load_reward_model
from lmforge.names import FIXED_JUDGE
from lmforge.params import Params
from lmforge.stages import begin
from lmforge.stages.dialogues import conversations, pairs, prompts_of
from lmforge.tokenizer import ChatTokenizer
from lmforge.training import ShardInfo, encode_pairs, load_shard
from lmforge.training.verifiable import is_task

SAMPLES_IN_REPORT = 6
ITEMS = Path("reports/evaluate_items.json")  # the tuned model's per-item scores (fixed judges)


def _report(metrics: dict, prompts: list[list[dict]], replies: dict[str, list[str]]) -> str:
    rows = [
        ("val bits per byte", "val_bits_per_byte"),
        ("held-out assistant loss", "assistant_loss"),
        ("end-of-turn rate", "end_of_turn_rate"),
        ("mean reward (RM)", "mean_reward"),
        ("mean reply tokens", "mean_length"),
        ("verifiable-task accuracy", "task_accuracy"),
    ]
    items = metrics["items"]
    lines = [
        "# lmforge evaluation",
        "",
        "Each figure with its 95% bootstrap interval over the held-out items: "
        f"{items['val_windows']} windows of the val text, {items['dialogues']} dialogues, "
        f"{items['prompts']} prompts, {items['pairs']} preference pairs.",
        "",
        "| metric | base | sft | tuned |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        lines.append(
            f"| {label} | "
            + " | ".join(stats.shown(metrics[m], key, ".4f") for m in ("base", "sft", "tuned"))
            + " |"
        )
    rm = metrics["reward_model"]
    lines += [
        "",
        f"Reward model: held-out accuracy **{stats.shown(rm, 'accuracy', '.4f')}**, mean margin {stats.shown(rm, 'margin', '.4f')}.",
        f"Tuned minus SFT mean reward (paired, the same prompts): **{stats.shown(metrics, 'reward_gain', '.4f')}**, "
        f"p = {metrics['reward_gain_p']:.4g}.",
        f"Tuned minus SFT accuracy on the verifiable task ({items['task_questions']} held-out questions, "
        f"checked by a program; paired): **{stats.shown(metrics, 'task_gain', '.4f')}**, p = {metrics['task_gain_p']:.4g}.",
        "",
        "## Samples (greedy)",
        "",
    ]
    for i, prompt in enumerate(prompts[:SAMPLES_IN_REPORT]):
        lines += [f"### {prompt[-1]['content'][:200]!r}", ""]
        lines += [f"- **{name}**: {reply[i][:300]!r}" for name, reply in replies.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass(frozen=True)
class HeldOut:
    """The held-out items every model is scored on, and their fingerprint (what a comparison
    across versions must share: the val tokens, the tokenizer, the dialogues and prompts, the
    reply settings)."""

    shard_dir: Path
    info: ShardInfo
    dialogues: list
    prompts: list
    tasks: list  # held-out verifiable-task dialogues (their questions are graded by a program)
    fingerprint: str


def held_out(root: Path, params: Params) -> HeldOut:
    ep = params.evaluate
    shard_dir = root / params.tokenizer.shards_dir
    info = ShardInfo.load(shard_dir)
    everything = conversations(root, params, "val")
    tasks = [d for d in everything if is_task(d)]
    dialogues = [d for d in everything if not is_task(d)]
    prompts = prompts_of(dialogues, ep.eval_prompts)
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(load_shard(shard_dir, "val", info)).tobytes())
    digest.update((root / params.tokenizer.out_dir / "tokenizer.json").read_bytes())
    settings = {"max_new_tokens": ep.max_new_tokens, "temperature": ep.temperature}
    digest.update(json.dumps([dialogues, prompts, tasks, settings], sort_keys=True).encode())
    return HeldOut(shard_dir, info, dialogues, prompts, tasks, digest.hexdigest()[:16])


def score(model, tok: ChatTokenizer, data: HeldOut, params: Params, seed: int, rm=None) -> dict:
    """A model's per-item scores on the held-out items (:func:`lmforge.evaluation.item_scores`)."""
    ep = params.evaluate
    return item_scores(
        model,
        tok,
        shard_dir=data.shard_dir,
        info=data.info,
        dialogues=data.dialogues,
        prompts=data.prompts,
        max_new_tokens=ep.max_new_tokens,
        temperature=ep.temperature,
        seed=seed,
        rm=rm,
        tasks=data.tasks,
    )


def figures(scores: dict, seed: int) -> dict:
    """A model's figures, each with its 95% interval over its items."""
    return {
        **stats.mean(scores["val_bits_per_byte"], seed=seed).fields("val_bits_per_byte"),
        **stats.ratio(scores["assistant_nll"], scores["assistant_tokens"], seed=seed).fields(
            "assistant_loss"
        ),
        **stats.proportion(scores["end_of_turn_rate"]).fields("end_of_turn_rate"),
        **stats.mean(scores["mean_reward"], seed=seed).fields("mean_reward"),
        **stats.mean(scores["mean_length"], seed=seed).fields("mean_length"),
        **stats.proportion(scores["task_accuracy"]).fields("task_accuracy"),
    }


def run(params: Params, root: Path) -> dict:
    import mlflow

    ep = params.evaluate
    seed = begin(params, "evaluate")
    tok = ChatTokenizer.load(root / params.tokenizer.out_dir)
    device = default_device()  # the GPU when there is one ($LMFORGE_DEVICE overrides)
    rm = load_reward_model(root / params.reward.out_dir).to(device)
    data = held_out(root, params)
    models = {"base": params.pretrain.out_dir, "sft": params.sft.out_dir, "tuned": params.rlhf.out_dir}
    metrics: dict = {}
    scores: dict[str, dict] = {}
    for name, folder in models.items():
        scores[name] = score(load_gpt(root / folder).to(device), tok, data, params, seed, rm)
        metrics[name] = figures(scores[name], seed)
    val_pairs, _ = encode_pairs(tok, pairs(root, params, "val"), rm.config.block_size)
    margins = preference_margins(rm, val_pairs, tok.pad_id)
    metrics["reward_model"] = {
        **stats.proportion(margins > 0).fields("accuracy"),
        **stats.mean(margins, seed=seed).fields("margin"),
    }
    gain = stats.paired(scores["sft"]["mean_reward"], scores["tuned"]["mean_reward"], seed=seed)
    metrics.update(gain.fields("reward_gain"))
    task = stats.paired(scores["sft"]["task_accuracy"], scores["tuned"]["task_accuracy"], seed=seed)
    metrics.update(task.fields("task_gain"))
    metrics["items"] = {
        "val_windows": len(scores["tuned"]["val_bits_per_byte"]),
        "dialogues": len(scores["tuned"]["assistant_nll"]),
        "prompts": len(data.prompts),
        "task_questions": len(data.tasks),
        "pairs": len(margins),
    }
    metrics["eval_set"] = data.fingerprint
    # The tuned model's fixed-judge items: what the register stage compares with the champion's.
    tuned = {figure: judged_items(scores["tuned"], figure) for figure in FIXED_JUDGE}
    items_file = {"eval_set": data.fingerprint, "tuned": tuned}
    atomic_write_text(root / ITEMS, json.dumps(items_file, sort_keys=True) + "\n")
    replies = {name: s["replies"] for name, s in scores.items()}
    report = root / ep.report
    atomic_write_text(report, _report(metrics, data.prompts, replies) + "\n")
    mlflow.log_artifact(str(report))
    return metrics
