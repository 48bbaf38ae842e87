"""Uncertainty of evaluation figures: bootstrap intervals over held-out items, and paired tests.

Every figure the evaluate stage reports is a mean (or a ratio of sums) over held-out items: prompts,
preference pairs, dialogues, windows of the val text. Resampling those items with replacement
(the percentile bootstrap, ``RESAMPLES`` draws, seeded) gives its 95% interval: how far the figure
would move on another held-out set of the same size. A share of 0/1 outcomes (a rate, an accuracy)
gets the Wilson score interval instead, which stays honest at 0% and 100%. Two models scored on the *same* items are
compared item by item (:func:`paired`): the interval and a two-sided p-value of the mean difference.

numpy only; every draw comes from the seed the caller passes (the stage's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
_BLOCK = 250  # resamples drawn at a time: memory stays at _BLOCK x n indices


@dataclass(frozen=True)
class Figure:
    """A figure with its 95% bootstrap interval over ``n`` items."""

    value: float
    low: float
    high: float
    n: int

    def fields(self, name: str, digits: int = 4) -> dict[str, float | int]:
        """``{name, name_ci_low, name_ci_high}``: the figure and its interval as flat numbers (metrics
        files, MLflow)."""
        return {
            name: round(self.value, digits),
            f"{name}_ci_low": round(self.low, digits),
            f"{name}_ci_high": round(self.high, digits),
        }

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def interval_of(figures: Mapping, key: str) -> tuple[float, float] | None:
    """The 95% interval :meth:`Figure.fields` stored beside ``figures[key]`` (None: none stored)."""
    low, high = figures.get(f"{key}_ci_low"), figures.get(f"{key}_ci_high")
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (low, high))
    return (float(low), float(high)) if numbers else None


def shown(figures: Mapping, key: str, spec: str = ".4g") -> str:
    """``figures[key]`` as ``value [low, high]`` (reports, model cards, summaries); the value alone
    when no interval is stored; "-" when the figure is missing or not finite."""
    value = figures.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    interval = interval_of(figures, key)
    if interval is None:
        return format(value, spec)
    return f"{value:{spec}} [{interval[0]:{spec}}, {interval[1]:{spec}}]"


def _resampled_sums(columns: Sequence[np.ndarray], seed: int, resamples: int) -> list[np.ndarray]:
    """For each column [n], its sum over each of ``resamples`` bootstrap samples of the n items (the
    same samples for every column: a ratio or a difference keeps its pairing)."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    out = [np.empty(resamples) for _ in columns]
    for start in range(0, resamples, _BLOCK):
        size = min(_BLOCK, resamples - start)
        idx = rng.integers(0, n, size=(size, n))
        for col, sums in zip(columns, out, strict=True):
            sums[start : start + size] = col[idx].sum(axis=1)
    return out


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def mean(
    values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> Figure:
    """The mean of ``values`` (one per item) with its bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return Figure(math.nan, math.nan, math.nan, 0)
    (sums,) = _resampled_sums([x], seed, resamples)
    return Figure(float(x.mean()), *_interval(sums / len(x), level), len(x))


def proportion(outcomes: Sequence[float], *, level: float = LEVEL) -> Figure:
    """The share of 1s among 0/1 ``outcomes`` with its Wilson score interval (a bootstrap of 64 out
    of 64 would say [1, 1]; Wilson says [0.94, 1], what 64 items can show)."""
    x = np.asarray(outcomes, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Figure(math.nan, math.nan, math.nan, 0)
    if not np.isin(x, (0.0, 1.0)).all():
        raise ValueError("proportion: outcomes must be 0 or 1")
    z = _z(level)
    p = float(x.mean())
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Figure(p, max(0.0, center - half), min(1.0, center + half), n)


def _z(level: float) -> float:
    """The standard normal quantile for a two-sided ``level`` interval (1.96 for 95%)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def ratio(
    numerators: Sequence[float],
    denominators: Sequence[float],
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> Figure:
    """sum(numerators) / sum(denominators) (e.g. a token-weighted loss: per item its summed loss and
    its token count) with its bootstrap interval, items resampled whole."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) != len(den):
        raise ValueError(f"ratio: {len(num)} numerators for {len(den)} denominators")
    if len(num) == 0 or den.sum() == 0:
        return Figure(math.nan, math.nan, math.nan, len(num))
    top, bottom = _resampled_sums([num, den], seed, resamples)
    return Figure(float(num.sum() / den.sum()), *_interval(top / np.maximum(bottom, 1e-300), level), len(num))


@dataclass(frozen=True)
class Paired:
    """``b - a`` on the same items: the mean difference, its interval, and the two-sided p-value of
    "no difference" (for 0/1 outcomes McNemar's exact test, otherwise the share of bootstrap
    differences on the far side of 0, doubled)."""

    difference: Figure
    p_value: float
    test: str = "paired bootstrap"  # or "McNemar exact" (0/1 items)

    def fields(self, name: str) -> dict[str, float | int]:
        return {**self.difference.fields(name), f"{name}_p": round(self.p_value, 6)}


def paired(
    a: Sequence[float], b: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES, level: float = LEVEL
) -> Paired:
    """Compare two models scored on the same items (``a[i]`` and ``b[i]`` are item i's scores): the
    difference's bootstrap interval, and its p-value, exact where the items are 0/1 outcomes
    (:func:`mcnemar`)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired: {len(x)} scores against {len(y)}: the items must be the same")
    diff = y - x
    if len(diff) == 0:
        return Paired(Figure(math.nan, math.nan, math.nan, 0), math.nan)
    (sums,) = _resampled_sums([diff], seed, resamples)
    means = sums / len(diff)
    observed = float(diff.mean())
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    if not np.any(diff):
        return Paired(
            Figure(0.0, 0.0, 0.0, len(diff)), 1.0, "McNemar exact" if binary else "paired bootstrap"
        )
    if binary:
        return Paired(Figure(observed, *_interval(means, level), len(diff)), mcnemar(x, y), "McNemar exact")
    # The bootstrap distribution shifted to mean 0 is the null; p = how often it reaches |observed|.
    centered = means - observed
    p = float((np.abs(centered) >= abs(observed)).mean())
    p = max(p, 1.0 / (resamples + 1))  # never 0 from a finite number of resamples
    return Paired(Figure(observed, *_interval(means, level), len(diff)), p)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> float:
    """McNemar's exact test of two sets of 0/1 outcomes on the same items: the two-sided binomial
    p-value of the items only one side got right splitting as they did, if either side were as
    likely to be the one (1.0 when no item differs)."""
    x, y = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    only_b = int(((y == 1) & (x == 0)).sum())
    only_a = int(((x == 1) & (y == 0)).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)
