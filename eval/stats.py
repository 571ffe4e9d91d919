"""Statistics of a comparison over training seeds: mean +- std, a paired bootstrap interval of the
difference of two models, and the verdict it allows.

Seed ``i`` of both models shares the data order and the sampling noise, so their metrics are paired:
the interval is over the per-seed differences ``d_i = candidate_i - baseline_i``, resampled by seed.
For few seeds (the usual case: 3 to 10) the bootstrap distribution is enumerated exactly (every
multiset of seeds, weighted by its multinomial probability) rather than drawn, so the interval is
a deterministic function of the numbers; more seeds take a seeded Monte-Carlo bootstrap.

With few seeds the percentile bootstrap is too narrow: with 2 or 3 seeds its 95% interval is the
range of the differences, which excludes 0 whenever they share a sign (by chance, half or a quarter
of the time). So a verdict also needs the paired Student-t interval, which accounts for the few
degrees of freedom, to exclude 0.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 100_000  # largest number of distinct resamples enumerated exactly (n <= 10 seeds)
MONTE_CARLO_RESAMPLES = 20_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for one value
    n: int


def summarize(values: list[float]) -> Summary:
    return Summary(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def paired_bootstrap_interval(candidate: list[float], baseline: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``candidate[i] - baseline[i]``, resampled over
    ``i``; None with fewer than two pairs (one difference says nothing about its spread)."""
    if len(candidate) != len(baseline):
        raise ValueError(f"paired values need the same seeds: {len(candidate)} vs {len(baseline)}")
    differences = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if len(differences) < 2:
        return None
    means, weights = bootstrap_means(differences)
    order = np.argsort(means, kind="stable")
    means, cdf = means[order], np.cumsum(weights[order])
    tail = (1 - level) / 2
    # The smallest mean whose CDF reaches the quantile (the inverse CDF of a discrete distribution);
    # the tolerance keeps exact ties (e.g. a CDF of exactly 0.025) from falling one value too far.
    lower = means[np.searchsorted(cdf, tail - 1e-12)]
    upper = means[min(np.searchsorted(cdf, 1 - tail - 1e-12), len(means) - 1)]
    return float(lower), float(upper)


def bootstrap_means(differences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means of bootstrap resamples of ``differences`` and their probabilities."""
    n = len(differences)
    if math.comb(2 * n - 1, n) <= EXACT_LIMIT:
        means, weights = [], []
        for multiset in itertools.combinations_with_replacement(range(n), n):
            counts = Counter(multiset).values()
            # multinomial probability of drawing this multiset in n uniform draws
            weights.append(math.factorial(n) / math.prod(math.factorial(c) for c in counts) / n**n)
            means.append(differences[list(multiset)].mean())
        return np.array(means), np.array(weights)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    picks = rng.integers(0, n, size=(MONTE_CARLO_RESAMPLES, n))
    return differences[picks].mean(axis=1), np.full(MONTE_CARLO_RESAMPLES, 1 / MONTE_CARLO_RESAMPLES)


# 97.5% quantiles of Student's t for 1..30 degrees of freedom (two-sided 95%); beyond, a
# Cornish-Fisher expansion around the normal quantile (error < 1e-4 from 30 on).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964


def t_quantile_975(df: int) -> float:
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_t_interval(candidate: list[float], baseline: list[float]) -> tuple[float, float] | None:
    """Student-t 95% interval of the mean difference (None with fewer than two pairs)."""
    differences = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(differences)
    if n < 2:
        return None
    half = t_quantile_975(n - 1) * differences.std(ddof=1) / math.sqrt(n)
    return float(differences.mean() - half), float(differences.mean() + half)


def verdict(*intervals: tuple[float, float] | None, lower_is_better: bool = True) -> str:
    """``better``/``worse`` when every interval of candidate - baseline excludes 0 on the same side,
    else ``not distinguishable``."""
    if not intervals or any(i is None for i in intervals):
        return "not distinguishable"
    if all(i[1] < 0 for i in intervals):
        return "better" if lower_is_better else "worse"
    if all(i[0] > 0 for i in intervals):
        return "worse" if lower_is_better else "better"
    return "not distinguishable"
