"""Paired comparison statistics for evaluation: mean difference with a bootstrap CI, win/tie/loss rates."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PairedComparison:
    n: int
    base_mean: float
    candidate_mean: float
    mean_diff: float  # candidate - base, averaged over (prompt, seed) pairs
    ci_low: float  # bootstrap 95% CI of mean_diff (percentile method)
    ci_high: float
    win_rate: float  # fraction of pairs where candidate > base by more than `tie_tolerance`
    tie_rate: float
    loss_rate: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def compare_paired(base: np.ndarray, candidate: np.ndarray, tie_tolerance: float = 0.0, resamples: int = 2000,
                   seed: int = 0, confidence: float = 0.95) -> PairedComparison:
    """Compare scores of the same (prompt, seed) items under two models."""
    base, candidate = np.asarray(base, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if base.shape != candidate.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(f"expected two equal, non-empty 1-D score arrays, got {base.shape} and {candidate.shape}")
    diff = candidate - base
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    wins, losses = diff > tie_tolerance, diff < -tie_tolerance
    return PairedComparison(
        n=int(diff.size),
        base_mean=float(base.mean()),
        candidate_mean=float(candidate.mean()),
        mean_diff=float(diff.mean()),
        ci_low=float(np.quantile(means, alpha)),
        ci_high=float(np.quantile(means, 1 - alpha)),
        win_rate=float(wins.mean()),
        tie_rate=float((~wins & ~losses).mean()),
        loss_rate=float(losses.mean()),
    )


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (e.g. 0.975 -> the half-width
    factor of a 95% interval), by bisection on the CDF integrated from the density with Simpson's rule:
    `pdf(x) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + x^2/df)^(-(df+1)/2)`."""
    if not 0.5 <= probability < 1 or df < 1:
        raise ValueError(f"expected 0.5 <= probability < 1 and df >= 1, got {probability}, {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        step = grid[1] - grid[0]
        integral = step / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
        return 0.5 + integral

    low, high = 0.0, 1.0
    while cdf(high) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def mean_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-based `confidence` interval (sample std with ddof=1) of independent replicate values, e.g. one
    gain per training seed: the interval then includes the run-to-run variance. (mean, nan, nan) for one value."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(1 - (1 - confidence) / 2, values.size - 1) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, mean - half, mean + half
