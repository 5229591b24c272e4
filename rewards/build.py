"""Build the configured scorers and run them: batched scoring of rollouts, the weighted training reward.

`build_scorers` loads every scorer of a `RewardsConfig` once (scorers that use the same CLIP weights
share one copy), frozen, on the configured device. `score_videos` scores many videos in chunks
without gradients (rollout scoring, evaluation); `weighted_reward` is the differentiable sum the
reward-gradient trainer maximises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from rewards.base import ModelCache, Scorer
from rewards.config import SOURCE, RewardsConfig, scorer_specs
from rlhf.config import config_from_dict
from rlhf.devices import resolve_device
from rlhf.errors import UserError


class WeightedScorer(NamedTuple):
    """A built scorer and the weight of its score in the combined reward."""

    scorer: Scorer
    weight: float


def build_scorers(config: RewardsConfig | Mapping[str, Any]) -> dict[str, WeightedScorer]:
    """Load the scorers of `config` (a RewardsConfig or its dict form, `{"scorers": {...}, ...}`).

    Returns `{entry name: (scorer, weight)}` in config order, each scorer frozen, in eval mode and on
    `config.device`. A missing or unreadable weight file is a UserError naming the entry and path.
    """
    if not isinstance(config, RewardsConfig):
        config = config_from_dict(RewardsConfig, config, source="rewards")
    device = resolve_device(config.device)
    cache = ModelCache()
    built: dict[str, WeightedScorer] = {}
    for spec in scorer_specs(config):
        try:
            scorer = spec.cls(spec.options, cache)
        except UserError as err:
            raise UserError(f"{SOURCE}.{spec.name}: {err}") from None
        scorer.name = spec.name
        built[spec.name] = WeightedScorer(scorer.eval().requires_grad_(False).to(device), spec.weight)
    return built


@torch.no_grad()
def score_videos(scorers: Mapping[str, WeightedScorer], frames: torch.Tensor, prompts: Sequence[str],
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Score `(N, T, 3, H, W)` videos in [0, 1] with every scorer, `batch_size` at a time.

    Each chunk is moved to its scorer's device, and every scorer scores a chunk before the next chunk (scorers
    sharing a model, as `videoreward`'s dimensions, then reuse its forward pass). Returns `{name: (N,) float32 on
    the CPU}`.
    """
    if len(prompts) != frames.shape[0]:
        raise ValueError(f"expected {frames.shape[0]} prompts, got {len(prompts)}")
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in scorers}
    for i in range(0, frames.shape[0], batch_size):
        for name, (scorer, _) in scorers.items():
            device = scorer.device or frames.device
            chunks[name].append(scorer(frames[i:i + batch_size].to(device), list(prompts[i:i + batch_size])).cpu())
    return {name: torch.cat(parts) for name, parts in chunks.items()}


class RewardNormalization(NamedTuple):
    """Per-reward centre and scale: the combined reward uses `(score - centre) / scale`."""

    centre: dict[str, float]
    scale: dict[str, float]


def weighted_reward(scorers: Mapping[str, WeightedScorer], frames: torch.Tensor, prompts: Sequence[str],
                    normalization: RewardNormalization | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sum_k weight_k * z_k` `(B,)` with gradients, and each scorer's raw scores (detached).

    `z_k = (score_k(frames) - centre_k) / scale_k` with `normalization`, else the raw score (then a weight
    multiplies a reward's own units: aesthetic 1-10 outweighs a CLIP cosine ~20x at equal weights).
    Gradients flow through differentiable scorers with a non-zero weight; the others (motion, weight-0
    held-out rewards) run without autograd and only shift the value. Frames must be on the scorers' device.
    """
    total = frames.new_zeros(frames.shape[0], dtype=torch.float32)
    parts = {}
    for name, (scorer, weight) in scorers.items():
        with torch.set_grad_enabled(torch.is_grad_enabled() and scorer.differentiable and weight != 0):
            scores = scorer(frames, prompts)
        z = scores if normalization is None else (scores - normalization.centre[name]) / normalization.scale[name]
        total = total + weight * z
        parts[name] = scores.detach()
    return total, parts
