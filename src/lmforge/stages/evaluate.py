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
from lmforge.generation.chat import ChatEngine, default_device
from lmforge.harness.run import PRIMARY
from lmforge.ingest.build import load_split
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
        ("val bits per byte, per document", "val_text_bits_per_byte"),
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
        f"checked by a program; paired): **{stats.shown(metrics, 'task_gain', '.4f')}**, "
        f"p = {metrics['task_gain_p']:.4g} (McNemar's exact test).",
    ]
    lines += _harness_report(metrics)
    lines += [
        "",
        "## Samples (greedy)",
        "",
    ]
    for i, prompt in enumerate(prompts[:SAMPLES_IN_REPORT]):
        lines += [f"### {prompt[-1]['content'][:200]!r}", ""]
        lines += [f"- **{name}**: {reply[i][:300]!r}" for name, reply in replies.items()]
        lines.append("")
    return "\n".join(lines)


def _harness_report(metrics: dict) -> list[str]:
    harness = metrics.get("harness")
    if not harness:
        return []
    names = list(harness)
    tasks = list(dict.fromkeys(t for h in harness.values() for t in h))
    lines = [
        "",
        "## lm-evaluation-harness",
        "",
        "The bundled tasks (`src/lmforge/harness/tasks`), run in process through our engine; the same "
        "configs run against the served model (README). 95% intervals over each task's items.",
        "",
        "| task | figure | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for task in tasks:
        figure = PRIMARY[task]
        cells = [stats.shown(harness[n][task], figure, ".4f") for n in names]
        lines.append(
            f"| {task} ({harness[names[0]][task]['items']} items) | {figure} | " + " | ".join(cells) + " |"
        )
    agree = metrics.get("harness_agreement", {})
    if agree:
        lines += [
            "",
            "Agreement with our own code on the same items (largest difference over the models): "
            + ", ".join(f"{k} {v:g}" for k, v in agree.items())
            + ".",
        ]
    return lines


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
    texts: list  # held-out documents (the val split of the pretraining text)
    fingerprint: str


def held_out(root: Path, params: Params) -> HeldOut:
    ep = params.evaluate
    shard_dir = root / params.tokenizer.shards_dir
    info = ShardInfo.load(shard_dir)
    everything = conversations(root, params, "val")
    tasks = [d for d in everything if is_task(d)]
    dialogues = [d for d in everything if not is_task(d)]
    prompts = prompts_of(dialogues, ep.eval_prompts)
    texts = list(load_split(root, params.ingest.out_dir, "text", "val")["text"])
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(load_shard(shard_dir, "val", info)).tobytes())
    digest.update((root / params.tokenizer.out_dir / "tokenizer.json").read_bytes())
    settings = {"max_new_tokens": ep.max_new_tokens, "temperature": ep.temperature}
    digest.update(json.dumps([dialogues, prompts, tasks, texts, settings], sort_keys=True).encode())
    return HeldOut(shard_dir, info, dialogues, prompts, tasks, texts, digest.hexdigest()[:16])


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
        texts=data.texts,
    )


def figures(scores: dict, seed: int) -> dict:
    """A model's figures, each with its 95% interval over its items."""
    return {
        **stats.mean(scores["val_bits_per_byte"], seed=seed).fields("val_bits_per_byte"),
        **stats.ratio(scores["val_text_bits"], scores["val_text_bytes"], seed=seed).fields(
            "val_text_bits_per_byte", digits=6
        ),
        **stats.ratio(scores["assistant_nll"], scores["assistant_tokens"], seed=seed).fields(
            "assistant_loss"
        ),
        **stats.proportion(scores["end_of_turn_rate"]).fields("end_of_turn_rate"),
        **stats.mean(scores["mean_reward"], seed=seed).fields("mean_reward"),
        **stats.mean(scores["mean_length"], seed=seed).fields("mean_length"),
        **stats.proportion(scores["task_accuracy"]).fields("task_accuracy"),
    }


def run_harness(engine: ChatEngine, root: Path, params: Params, seed: int) -> dict:
    """The bundled lm-evaluation-harness tasks (``evaluate.harness_tasks``) on one model, in process."""
    from lmforge.harness.run import evaluate

    ep = params.evaluate
    return evaluate(
        engine,
        root,
        data=params.ingest.out_dir,
        tasks=ep.harness_tasks,
        max_gen_toks=ep.max_new_tokens,
        seed=seed,
    )


# Harness figure -> our own figure, computed by our code with the same rule on the same items.
AGREES = {
    ("lmforge_val_text", "bits_per_byte"): lambda s: sum(s["val_text_bits"]) / sum(s["val_text_bytes"]),
    ("lmforge_reverse", "exact_match"): lambda s: float(np.mean(s["task_accuracy"])),
}


def agreement(scores: dict, harness: dict) -> dict:
    """Per figure the harness measures as our own code does: the largest difference between the two
    over the models (0: they agree; the harness's figures are rounded to 6 digits)."""
    out: dict = {}
    for (task, figure), ours in AGREES.items():
        diffs = [
            abs(h["tasks"][task][figure] - ours(scores[name]))
            for name, h in harness.items()
            if task in h["tasks"]
        ]
        if diffs:
            out[f"{task}.{figure}"] = round(max(diffs), 6)
    return out


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
    harness: dict[str, dict] = {}
    for name, folder in models.items():
        model = load_gpt(root / folder).to(device)
        scores[name] = score(model, tok, data, params, seed, rm)
        metrics[name] = figures(scores[name], seed)
        if ep.harness_tasks:
            harness[name] = run_harness(ChatEngine(model, tok), root, params, seed)
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
    if harness:
        metrics["harness"] = {name: h["tasks"] for name, h in harness.items()}
        metrics["harness_agreement"] = agreement(scores, harness)
    # The tuned model's fixed-judge items: what the register stage compares with the champion's.
    tuned = {figure: judged_items(scores["tuned"], figure) for figure in FIXED_JUDGE}
    items_file = {"eval_set": data.fingerprint, "tuned": tuned}
    atomic_write_text(root / ITEMS, json.dumps(items_file, sort_keys=True) + "\n")
    replies = {name: s["replies"] for name, s in scores.items()}
    report = root / ep.report
    atomic_write_text(report, _report(metrics, data.prompts, replies) + "\n")
    mlflow.log_artifact(str(report))
    return metrics
