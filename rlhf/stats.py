"""Paired comparison statistics for evaluation: mean difference with a bootstrap CI, win/tie/loss rates."""

from __future__ import annotations

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
