"""Run the bundled lm-evaluation-harness tasks on a model in process, offline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from lmforge import stats
from lmforge.generation.chat import ChatEngine

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS = ("lmforge_preference", "lmforge_val_text", "lmforge_reverse")
# The figure each task reports, and how its per-item results become the figure.
PRIMARY = {
    "lmforge_preference": "acc",
    "lmforge_val_text": "bits_per_byte",
    "lmforge_reverse": "exact_match",
    "lmforge_gsm8k": "exact_match",  # opt-in (the small preset): a tiny model scores 0
}
FOLLOWS_MAX_NEW_TOKENS = ("lmforge_reverse",)  # its replies are as long as the stage's own task replies


def task_manager(root: Path, data: str):
    """The bundled tasks only (not the harness's hundreds), reading the splits under ``root/data``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR), include_defaults=False, metadata={"root": str(root), "data": data}
    )


def evaluate(
    engine: ChatEngine,
    root: Path,
    *,
    data: str = "data/processed",
    tasks: Sequence[str] = TASKS,
    max_gen_toks: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    max_length: int | None = None,
) -> dict:
    """``{"tasks": {task: {figure, figure_ci_low, figure_ci_high, items}}, "samples": {task: ...}}``:
    each task's figure with its 95% interval, and its per-item results in item order (what the
    figure is the mean or ratio of; a generation task's replies too)."""
    from lm_eval import simple_evaluate

    from lmforge.harness.lm import LmforgeLM

    model = LmforgeLM(engine, seed=seed, max_length=max_length)
    # max_gen_toks bounds the replies of the tasks that follow evaluate.max_new_tokens; the others
    # (GSM8K's worked answers) keep their own configs' length.
    bounded = [t for t in tasks if t in FOLLOWS_MAX_NEW_TOKENS and max_gen_toks]
    runs = [(bounded, {"max_gen_toks": max_gen_toks}), ([t for t in tasks if t not in bounded], None)]
    out: dict = {"results": {}, "samples": {}}
    for names, gen_kwargs in runs:
        if not names:
            continue
        done = simple_evaluate(
            model=model,
            tasks=names,
            task_manager=task_manager(root, data),
            apply_chat_template=True,
            gen_kwargs=gen_kwargs,
            limit=limit,
            bootstrap_iters=0,  # intervals come from lmforge.stats, like every other figure
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="ERROR",  # not its per-task notes on custom datasets and default aggregations
        )
        out["results"].update(done["results"])
        out["samples"].update(done["samples"])
    figures: dict = {}
    samples: dict = {}
    for task in tasks:
        metric = PRIMARY[task]
        logged = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        items = [s[metric] for s in logged]
        value = out["results"][task][f"{metric},none"]
        if metric == "bits_per_byte":  # items: (log-likelihood, bytes) per document
            ll, size = zip(*items, strict=True)
            figure = stats.ratio([-x / math.log(2) for x in ll], size, seed=seed)
            samples[task] = {"loglikelihood": list(ll), "bytes": list(size)}
        else:
            figure = stats.proportion([float(x) for x in items])
            samples[task] = {metric: [float(x) for x in items]}
            if metric == "acc":  # multiple choice: each choice's log-likelihood
                samples[task]["loglikelihoods"] = [[float(r[0][0]) for r in s["resps"]] for s in logged]
            if metric == "exact_match":  # a generation task: its replies, in item order
                samples[task]["replies"] = [s["resps"][0][0] for s in logged]
        if not math.isclose(figure.value, value, rel_tol=1e-9, abs_tol=1e-12):
            raise RuntimeError(f"{task}: the harness reports {metric} {value}, its items give {figure.value}")
        figures[task] = {**figure.fields(metric, digits=6), "items": figure.n}
    return {"tasks": figures, "samples": samples}
