"""Bootstrap intervals for benchmark figures (standard library only, so a benchmark that must not
import lmforge can use them): the median of repeated timings and the ratio of two medians."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence


def bootstrap(values: Sequence[float], stat: Callable = statistics.median, n: int = 2000, seed: int = 0):
    """95% percentile-bootstrap interval of ``stat(values)``."""
    rng = random.Random(seed)
    draws = sorted(stat([rng.choice(values) for _ in values]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], n: int = 2000, seed: int = 0):
    """95% interval of median(num) / median(den), repetitions resampled in pairs."""
    rng = random.Random(seed)
    idx = range(len(num))
    draws = []
    for _ in range(n):
        pick = [rng.choice(idx) for _ in idx]
        draws.append(statistics.median(num[i] for i in pick) / statistics.median(den[i] for i in pick))
    draws.sort()
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]
