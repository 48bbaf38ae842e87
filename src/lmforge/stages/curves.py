"""A training stage's loss curves as an image: `plots/<stage>/loss.png` from the CSVs `LossCurve` writes.

Left panel: `train.csv`'s loss columns; right panel: `val.csv`'s metrics, or, where a stage has no
validation rows (PPO/GRPO), `train.csv`'s other columns (the rollout metrics, on a symlog axis since
their scales differ). DVC shows the PNG as an image plot (`dvc plots show`) and the stage logs it to
its MLflow run.

The bytes depend only on the CSVs (and the matplotlib and Pillow versions): the Agg canvas is used
directly (no pyplot, no display), matplotlib's default style replaces any user matplotlibrc, and the
PNG carries no "Software" (version) metadata. Edge code: the training core never imports matplotlib.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from lmforge.atomic import atomic_write_bytes

WIDTH, HEIGHT, DPI = 9.0, 4.0, 100  # 900 x 400 px
FILENAME = "loss.png"


def read_curve(path: Path) -> dict[str, list[tuple[int, float]]]:
    """`{column: [(step, value), ...]}` for each non-step column of a curve CSV; empty cells and
    non-finite values are skipped. A missing file or a header-only file gives `{}` or empty series."""
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        series: dict[str, list[tuple[int, float]]] = {c: [] for c in reader.fieldnames or [] if c != "step"}
        for row in reader:
            try:
                step = int(float(row["step"]))
            except (KeyError, TypeError, ValueError):
                continue
            for column, points in series.items():
                try:
                    value = float(row.get(column) or "nan")
                except ValueError:
                    continue
                if math.isfinite(value):
                    points.append((step, value))
    return series


def _draw(
    ax, series: dict[str, list[tuple[int, float]]], title: str, ylabel: str, marker: str | None
) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    drawn = False
    for name in sorted(series):
        points = series[name]
        if points:
            steps, values = zip(*points)
            # A lone point draws no line: mark it.
            ax.plot(
                steps, values, marker=marker or ("o" if len(points) == 1 else None), markersize=4, label=name
            )
            drawn = True
    if drawn:
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(
            0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="0.5", transform=ax.transAxes
        )


def render_png(train_csv: Path, val_csv: Path, stage: str) -> bytes:
    """The PNG bytes of the two-panel figure for `stage`."""
    from matplotlib import style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = read_curve(train_csv), read_curve(val_csv)
    losses = {k: v for k, v in train.items() if "loss" in k}
    others = {k: v for k, v in train.items() if k not in losses and v}
    with style.context("default"):
        fig = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2)
        fig.suptitle(f"{stage}: loss curves")
        _draw(left, losses, "train (train.csv)", "loss", None)
        if any(val.values()) or not others:
            _draw(right, val, "validation (val.csv)", "value", "o")
        else:
            _draw(right, others, "train metrics (train.csv)", "value (symlog)", None)
            right.set_yscale("symlog", linthresh=0.1)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def loss_png(root: Path, stage: str) -> Path:
    """Where `stage`'s loss-curve image is: `<root>/plots/<stage>/loss.png`."""
    return Path(root) / "plots" / stage / FILENAME


def write_loss_png(folder: Path, stage: str) -> Path:
    """Render `folder/train.csv` and `folder/val.csv` to `folder/loss.png`, atomically; returns its path."""
    folder = Path(folder)
    return atomic_write_bytes(folder / FILENAME, render_png(folder / "train.csv", folder / "val.csv", stage))


def log_to_mlflow(paths: list[Path], artifact_path: str = "plots") -> bool:
    """Log `paths` as artifacts of the active MLflow run under `artifact_path`; False when none is active."""
    import mlflow

    if mlflow.active_run() is None:
        return False
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
    return True
