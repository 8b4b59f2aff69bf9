"""The uncertainty of a report's numbers: intervals, and paired tests between two variants.

* RULER accuracy: a Wilson score interval over the cell's samples, pooled over seeds. A sample's RULER score can
  be a fraction (string_match_all over several references); the scores' sum counts as the successes.
* Two variants on the same RULER samples (same task, length and seed: the prompts are identical): the mean
  per-sample difference with a normal 95% interval, and a two-sided sign test on the samples where they differ
  (McNemar's exact test when the scores are 0/1, as `harness compare` uses). With partial scores the sign test
  can favour the variant whose mean is lower: such a difference is significant neither way.
* Perplexity: mean ± sd over seeds; two variants are paired by seed (the evaluation tokens are the same), with
  Student's t interval and test of the mean difference (no interval from one seed).

Marks use ALPHA = 0.05 per comparison, not adjusted for the number of comparisons a report makes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALPHA = 0.05
Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in [0, 1]."""
    if n <= 0:
        raise ValueError("wilson needs at least one trial")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def mcnemar_exact(lost: int, won: int) -> float:
    """Two-sided exact p of `lost` against `won` discordant pairs (binomial with p = 1/2): McNemar's exact test."""
    n = lost + won
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, won) + 1)) / 2**n
    return min(1.0, 2 * tail)


def fisher_exact(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    """Two-sided p of Fisher's exact test on two independent samples' successes (hits of n each): the chance,
    given the total hits, of a split as unlikely as the one seen. For accuracies with no samples in common."""
    hits = hits_a + hits_b

    def prob(k: int) -> float:  # hypergeometric: k of the hits in sample a
        return math.comb(n_a, k) * math.comb(n_b, hits - k) / math.comb(n_a + n_b, hits)

    seen = prob(hits_a)
    splits = [prob(k) for k in range(max(0, hits - n_b), min(hits, n_a) + 1)]
    return min(1.0, sum(q for q in splits if q <= seen * (1 + 1e-9)))


@dataclass(frozen=True)
class Difference:
    """b - a: the estimate, its 95% interval, the two-sided p, how many pairs it rests on, and whether the test
    favours the side the estimate does not (a sign test on partial scores)."""

    estimate: float
    low: float
    high: float
    p: float
    n: int
    against: bool = False

    @property
    def significant(self) -> bool:
        return self.p < ALPHA and not self.against

    @property
    def sign(self) -> int:
        """+1 or -1 where the difference is significant, else 0."""
        return 0 if not self.significant else (1 if self.estimate > 0 else -1)


def paired_samples(a: Mapping[str, float], b: Mapping[str, float]) -> Difference | None:
    """b - a over the samples both scored ({sample id: score in [0, 1]}); None when they share none."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    d = [float(b[s]) - float(a[s]) for s in shared]
    n, mean = len(d), statistics.fmean(d)
    half = Z95 * (statistics.stdev(d) / math.sqrt(n) if n > 1 else math.inf)
    lost, won = sum(x < 0 for x in d), sum(x > 0 for x in d)
    against = (won > lost) - (won < lost) != (mean > 0) - (mean < 0)
    return Difference(mean, mean - half, mean + half, mcnemar_exact(lost, won), n, against)


def paired_t(diffs: Sequence[float]) -> Difference | None:
    """Student's t on paired differences (one per seed); None without any. From one, or from several that are all
    equal (the seeds changed nothing either side compared, so they are one measurement repeated, not replicates),
    no interval and p = 1."""
    n = len(diffs)
    if n == 0:
        return None
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else 0.0
    if sd == 0:
        return Difference(mean, -math.inf, math.inf, 1.0, n)
    se = sd / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    return Difference(mean, mean - half, mean + half, 1 - t_central(abs(mean) / se, n - 1), n)


def t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with an integer `df` (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    if df < 1:
        raise ValueError("t needs df >= 1")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(q: float, df: int) -> float:
    """The `q` quantile (q > 0.5) of Student's t with an integer `df`, by bisection on `t_central`."""
    target, lo, hi = 2 * q - 1, 0.0, 1.0
    while t_central(hi, df) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample sd; None from one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None
