"""`lmforge verify <stage>`: re-run one stage from its recorded inputs in a scratch copy and compare
what it makes with what `dvc.lock` and the stage's metrics file record.

This is how a team checks a run it pulled (`dvc pull`) instead of rebuilding: the workspace's inputs
of the stage must be the ones `dvc.lock` names (else the comparison means nothing, and verify says
which differ). The stage runs with `dvc repro --single-item --force` in a scratch folder that holds
only the stage's dependencies, `params.yaml`, `dvc.yaml` and `dvc.lock`, with a tracking store of its
own (a verification never adds runs or model versions to the team's registry). Then, per output, the
hash it got against the recorded one (and, inside a folder that differs, which files); per metric,
the relative difference.

Verdicts: `bitwise` (every output hash equal: same kind of machine), `within tolerance` (some bytes
differ, as across CPU generations or devices, but every metric is within `rtol`), `drift` (a metric
moved further, or an output or metric is missing). Exit status 0, 0 and 1; 2 when the stage cannot be
verified here (inputs differ from the lock, unknown stage).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class VerifyError(RuntimeError):
    """The stage cannot be verified here; the message says why."""


@dataclass
class Report:
    stage: str
    verdict: str = ""
    rtol: float = 0.0
    outputs: list[dict] = field(default_factory=list)  # path, recorded, got, same, differing files
    metrics: list[dict] = field(default_factory=list)  # file, key, recorded, got, rel_diff, within
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _lock_entry(root: Path, stage: str) -> dict:
    lock = root / "dvc.lock"
    if not lock.is_file():
        raise VerifyError(f"{lock}: no dvc.lock (run the pipeline, or git pull one)")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise VerifyError(f"dvc.lock has no stage {stage!r}; it has: {', '.join(stages)}")
    return stages[stage]


def _dvc(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(src, dest)


def _files(path: Path) -> dict[str, str]:
    """sha256 of each file under `path` (or of `path`), by path relative to it."""
    items = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {
        (str(p.relative_to(path)) if path.is_dir() else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in items
    }


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics file, by dotted key."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, bool) or not isinstance(tree, int | float):
        return {}
    return {prefix.rstrip("."): float(tree)}


def rel_diff(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def verify(root: Path, stage: str, rtol: float = 0.02, keep: Path | None = None) -> Report:
    """Re-run `stage` of the project at `root` in a scratch copy and compare; see the module docstring."""
    import time

    entry = _lock_entry(root, stage)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LMFORGE_ROOT")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # dvc, lmforge
    status = _dvc(["status", "--json", stage], root, env)
    if status.returncode:
        raise VerifyError(f"dvc status {stage} failed: {status.stderr.strip()[-1000:]}")
    changed = [
        (path, what)
        for item in json.loads(status.stdout or "{}").get(stage, [])
        if isinstance(item, dict)
        for path, what in item.get("changed deps", {}).items()
    ]
    missing = [d["path"] for d in entry.get("deps", []) if not (root / d["path"]).exists()]
    if changed or missing:
        listed = [f"{p} ({w})" for p, w in changed] + [f"{p} (missing)" for p in missing]
        raise VerifyError(
            f"{stage}: the workspace's inputs are not the ones dvc.lock records: {', '.join(listed)}; "
            "dvc pull (or check out the commit that made the lock) first"
        )

    report = Report(stage=stage, rtol=rtol)
    scratch = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"lmforge-verify-{stage}-"))
    started = time.perf_counter()
    try:
        for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
            _copy(root / name, scratch / name)
        for dep in entry.get("deps", []):
            _copy(root / dep["path"], scratch / dep["path"])
        init = _dvc(["init", "--no-scm", "-q"], scratch, env)
        if init.returncode:
            raise VerifyError(f"dvc init in {scratch} failed: {init.stderr.strip()[-1000:]}")
        run = _dvc(["repro", "--single-item", "--force", stage], scratch, env)
        if run.returncode:
            raise VerifyError(f"{stage} failed in {scratch}:\n{(run.stderr or run.stdout).strip()[-3000:]}")
        got = {o["path"]: o for o in _lock_entry(scratch, stage).get("outs", [])}
        for out in entry.get("outs", []):
            path, mine = out["path"], got.get(out["path"], {})
            row = {"path": path, "recorded": out.get("md5"), "got": mine.get("md5")}
            row["same"] = row["recorded"] == row["got"] and row["got"] is not None
            if not row["same"] and (root / path).exists() and (scratch / path).exists():
                here, there = _files(root / path), _files(scratch / path)
                row["differing_files"] = sorted(
                    k for k in here.keys() | there.keys() if here.get(k) != there.get(k)
                )
            report.outputs.append(row)
            if path.endswith(".json") and path.startswith("metrics/"):
                report.metrics += _compare_metrics(root / path, scratch / path, rtol)
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report.seconds = round(time.perf_counter() - started, 1)
    if all(o["same"] for o in report.outputs):
        report.verdict = "bitwise"
    elif report.metrics and all(m["within"] for m in report.metrics):
        report.verdict = "within tolerance"
    else:
        report.verdict = "drift"
    return report


def _compare_metrics(recorded: Path, got: Path, rtol: float) -> list[dict]:
    if not recorded.is_file() or not got.is_file():
        return [{"file": str(recorded.name), "key": "*", "recorded": None, "got": None, "within": False}]
    a, b = _numbers(json.loads(recorded.read_text())), _numbers(json.loads(got.read_text()))
    rows = []
    for key in sorted(a.keys() | b.keys()):
        if key not in a or key not in b:
            rows.append(
                {
                    "file": recorded.name,
                    "key": key,
                    "recorded": a.get(key),
                    "got": b.get(key),
                    "within": False,
                }
            )
            continue
        d = rel_diff(a[key], b[key])
        rows.append(
            {
                "file": recorded.name,
                "key": key,
                "recorded": a[key],
                "got": b[key],
                "rel_diff": d,
                "within": d <= rtol,
            }
        )
    return rows


def render(report: Report) -> str:
    lines = [f"lmforge verify {report.stage}: {report.verdict} (re-ran in {report.seconds:.0f} s)"]
    for o in report.outputs:
        mark = "same bytes" if o["same"] else f"differs ({o['recorded']} recorded, {o['got']} now)"
        lines.append(f"  output {o['path']}: {mark}")
        for f in o.get("differing_files", [])[:20]:
            lines.append(f"    {f}")
    moved = [m for m in report.metrics if m.get("rel_diff", 1.0) > 0 or not m["within"]]
    if moved:
        lines.append(f"  metrics that moved (rtol {report.rtol:g}):")
        for m in moved:
            diff = f"{m['rel_diff']:.2%}" if "rel_diff" in m else "missing"
            flag = "" if m["within"] else "  <- beyond tolerance"
            lines.append(f"    {m['file']} {m['key']}: {m['recorded']} -> {m['got']} ({diff}){flag}")
    elif report.metrics:
        lines.append("  every metric is equal")
    return "\n".join(lines)
