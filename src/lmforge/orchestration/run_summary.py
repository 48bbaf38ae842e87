"""A pipeline run's summary: its key metrics beside the champion's, the gate decision, the links.

The champion is read from the registry *before* the run (the version this run would replace):
its figures come from the MLflow runs its lineage tags name (`lmforge.run.<stage>`), this run's
from the metrics files the stages wrote. Rendered as Markdown (the Prefect flow publishes it as
the `lmforge-summary` artifact; `lmforge summary` could print it anywhere).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge import stats, tracking
from lmforge.orchestration.pipeline_run import model_version_link, run_link
from lmforge.registry.publish import comparison_markdown
from lmforge.stages import TRAINING_STAGES, read_metrics
from lmforge.stages.curves import loss_png


@dataclass(frozen=True)
class KeyMetric:
    label: str
    stage: str  # whose metrics file / MLflow run holds it
    key: str  # flattened key in that file / run
    better: Literal["lower", "higher"]
    # Scored by each version's own reward model: shown, never called better or worse across versions.
    own_judge: bool = False


KEY_METRICS = (
    KeyMetric("base model val bits/byte", "pretrain", "val_bits_per_byte", "lower"),
    KeyMetric("tuned model val bits/byte", "evaluate", "tuned.val_bits_per_byte", "lower"),
    KeyMetric("SFT assistant loss", "evaluate", "sft.assistant_loss", "lower"),
    KeyMetric("tuned assistant loss", "evaluate", "tuned.assistant_loss", "lower"),
    KeyMetric("reward-model accuracy (held-out pairs)", "evaluate", "reward_model.accuracy", "higher"),
    KeyMetric("held-out reward, tuned policy *", "evaluate", "tuned.mean_reward", "higher", own_judge=True),
    KeyMetric("reward gain over SFT *", "evaluate", "reward_gain", "higher", own_judge=True),
    KeyMetric("KL to the SFT policy (held out)", "rlhf", "held_out_kl", "lower"),
    KeyMetric("end-of-turn rate, tuned policy", "evaluate", "tuned.end_of_turn_rate", "higher"),
)
STAGES_READ = tuple(dict.fromkeys(m.stage for m in KEY_METRICS))


@dataclass
class Champion:
    """The version holding the champion alias when the run started (None fields: no champion)."""

    model_name: str
    alias: str
    version: int | None = None
    run_ids: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> key -> value


def champion_snapshot(model_name: str, alias: str = "champion", client=None) -> Champion:
    """The current holder of `alias` and the figures of the stage runs that produced it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tracking.setup()
    client = client or MlflowClient()
    snap = Champion(model_name, alias)
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:  # no such model or alias yet: the first run
        return snap
    snap.version = int(version.version)
    for stage in STAGES_READ:
        run_id = version.tags.get(f"lmforge.run.{stage}")
        if not run_id:
            continue
        snap.run_ids[stage] = run_id
        try:
            snap.metrics[stage] = dict(client.get_run(run_id).data.metrics)
        except MlflowException:  # the run was deleted: the row shows "-"
            snap.metrics[stage] = {}
    return snap


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


def _number(figures: dict, key: str) -> float | None:
    value = figures.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _compare(
    metric: KeyMetric,
    new: float | None,
    old: float | None,
    intervals: tuple[tuple[float, float] | None, tuple[float, float] | None] = (None, None),
) -> tuple[str, int]:
    """('better'/'worse'/'same'/'within noise'/'', +1/-1/0). Two figures whose 95% intervals overlap
    are "within noise": neither counts as better or worse."""
    if new is None or old is None:
        return "", 0
    if math.isclose(new, old, rel_tol=1e-9, abs_tol=1e-12):
        return "same", 0
    ours, theirs = intervals
    if ours is not None and theirs is not None and ours[0] <= theirs[1] and theirs[0] <= ours[1]:
        return "within noise", 0
    improved = new < old if metric.better == "lower" else new > old
    return ("better", 1) if improved else ("worse", -1)


def metrics_table(root: Path, champion: Champion) -> tuple[list[str], int, int]:
    """Markdown rows of the key metrics; returns (lines, metrics better, metrics worse)."""
    ours = {stage: tracking.flatten(read_metrics(root, stage)) for stage in STAGES_READ}
    title = f"champion v{champion.version}" if champion.version is not None else "champion (none yet)"
    lines = [f"| metric | goal | this run [95% CI] | {title} | change | |", "|---|---|---:|---:|---:|---|"]
    better = worse = 0
    for m in KEY_METRICS:
        mine, theirs = ours.get(m.stage, {}), champion.metrics.get(m.stage, {})
        new, old = _number(mine, m.key), _number(theirs, m.key)
        intervals = (stats.interval_of(mine, m.key), stats.interval_of(theirs, m.key))
        verdict, sign = (
            ("own reward model", 0) if m.own_judge and old is not None else _compare(m, new, old, intervals)
        )
        better, worse = better + (sign > 0), worse + (sign < 0)
        delta = f"{new - old:+.4g}" if new is not None and old is not None else ""
        mark = {"better": "better", "worse": "**worse**", "same": "same"}.get(verdict, verdict)
        row = f"| {m.label} | {m.better} | {stats.shown(mine, m.key)} | {stats.shown(theirs, m.key)} | {delta} | {mark} |"
        lines.append(row)
    return lines, better, worse


def gates_table(root: Path) -> list[str]:
    from lmforge.params import load_params
    from lmforge.registry.publish import gate_results

    gates = load_params(root / "params.yaml").registry.gates
    lines = ["| gate | bound | this run | result |", "|---|---:|---:|---|"]
    for row in gate_results(read_metrics(root, "evaluate"), gates):
        lines.append(
            f"| `{row['metric']}` | {row['op']} {row['bound']:g} | {_fmt(row['value'])} | "
            f"{'pass' if row['passed'] else '**FAIL**'} |"
        )
    return lines


def png_markdown(path: Path, alt: str) -> str:
    """An image embedded as a data URI (the Prefect UI shows it with no file server behind it)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"![{alt}](data:image/png;base64,{data})"


def summary_markdown(
    root: Path,
    champion: Champion,
    *,
    parent_run_id: str | None = None,
    experiment_id: str | None = None,
    stage_status: dict[str, str] | None = None,
    stage_links: dict[str, str] | None = None,
    curves: bool = True,
) -> str:
    """The whole summary: decision first, then the comparison, the gates, links and loss curves."""
    reg = read_metrics(root, "register")
    version, alias = reg.get("version"), reg.get("alias")
    failed = [*(reg.get("failed_gates") or []), *(reg.get("promotion_refused") or [])]
    name = reg.get("model_name") or champion.model_name
    lines = ["# lmforge run summary", ""]
    if version is None:
        lines.append("**No model registered** (the register stage wrote no version).")
    elif champion.version == version:
        lines.append(
            f"**No new version:** `register` was up to date, so `{name}` v{version} stays `{alias}`; "
            "the figures below are its own."
        )
    elif not failed:
        replaced = f"replaces v{champion.version}" if champion.version is not None else "first champion"
        lines.append(f"**Promoted:** `{name}` v{version} is now `{alias}` ({replaced}): every gate passed.")
    else:
        kept = f"v{champion.version} stays `champion`" if champion.version is not None else "no champion"
        lines.append(
            f"**Not promoted:** `{name}` v{version} is `{alias}`, {kept}. Failed gates: "
            + "; ".join(failed)
            + "."
        )
    table, better, worse = metrics_table(root, champion)
    if champion.version is not None and champion.version != version:
        lines += [
            "",
            f"Against champion v{champion.version}: better on {better}, worse on {worse} of the "
            f"{sum(not m.own_judge for m in KEY_METRICS)} key metrics a fixed judge scores (overlapping "
            "95% intervals count as neither).",
        ]
    lines += [*comparison_markdown(reg.get("champion") or {}), "", "## Key metrics", "", *table]
    lines += [
        "",
        "\\* scored by each run's own reward model: on another scale in every run, so never called "
        "better or worse here (5 seeds moved the SFT policy's reward by 2.3 with the reward model alone; "
        "docs/benchmarks.md).",
        "",
        "## Gates (from params.yaml `registry.gates`)",
        "",
        *gates_table(root),
        "",
    ]
    lines += ["## Links", ""]
    if version is not None:
        lines.append(
            f"- registered version: [{name} v{version}]({model_version_link(name, version)}) "
            f"(`models:/{name}@{alias}`)"
        )
    if parent_run_id and experiment_id:
        lines.append(f"- MLflow parent run: [{parent_run_id}]({run_link(parent_run_id, experiment_id)})")
    for stage, link in (stage_links or {}).items():
        status = (stage_status or {}).get(stage, "")
        lines.append(
            f"- `{stage}`: {f'[MLflow run]({link})' if link else 'no MLflow run'} {status and f'({status})'}"
        )
    if champion.version is not None and champion.version != version:
        lines.append(
            f"- champion before this run: [{name} v{champion.version}]"
            f"({model_version_link(name, champion.version)})"
        )
    lines.append(
        f"- tracking URI: `{tracking.tracking_uri()}` (browse: `mlflow ui --backend-store-uri "
        f"{tracking.tracking_uri()}`)"
    )
    if curves:
        images = [(s, png) for s in TRAINING_STAGES if (png := loss_png(root, s)).is_file()]
        if images:
            lines += ["", "## Loss curves", ""]
            for stage, path in images:
                lines += [f"### {stage}", "", png_markdown(path, f"{stage} loss curve"), ""]
    return "\n".join(lines).rstrip() + "\n"
