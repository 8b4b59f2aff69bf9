"""Statistics of the timing gate: a rank test and a bootstrap interval of the median ratio.

Why these: timings are skewed and have outliers (a scheduler hiccup), so a rank test (Mann-Whitney U) judges
whether head's samples tend to be larger without assuming a distribution; the size of a change is the ratio of
medians, with a percentile-bootstrap confidence interval so a log says how sure the number is.
"""

from __future__ import annotations

import math
import random
import statistics


def mann_whitney(base: list[float], head: list[float]) -> tuple[float, float]:
    """(U of head, one-sided p that head tends to be larger), by the normal approximation with tie and
    continuity corrections (scipy.stats.mannwhitneyu(head, base, alternative="greater", method="asymptotic"))."""
    n1, n2 = len(head), len(base)
    if not n1 or not n2:
        raise ValueError("mann_whitney needs samples on both sides")
    ranks = _ranks([*head, *base])
    u = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    n = n1 + n2
    ties = sum(t**3 - t for t in _tie_counts([*head, *base]))
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    if var <= 0:  # every sample equal
        return u, 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return u, 0.5 * math.erfc(z / math.sqrt(2))


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _tie_counts(values: list[float]) -> list[int]:
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return [c for c in counts.values() if c > 1]


def median_ratio_interval(base: list[float], head: list[float], level: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(head) / median(base), resampling each side independently."""
    rng = random.Random(seed)

    def median_of_resample(x: list[float]) -> float:
        return statistics.median(rng.choices(x, k=len(x)))

    ratios = sorted(median_of_resample(head) / median_of_resample(base) for _ in range(resamples))
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return ratios[int(lo * (resamples - 1))], ratios[int(math.ceil(hi * (resamples - 1)))]
