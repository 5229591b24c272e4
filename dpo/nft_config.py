"""The DiffusionNFT trainer's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpo.round_config import RoundOptions
from rlhf.config import ConfigError, option
from rlhf.options import LoraOptions, SamplingOptions, TrainingOptions, in_range


@dataclass
class NFTConfig(TrainingOptions, LoraOptions, SamplingOptions, RoundOptions):
    """`train` with `method: nft`: online DiffusionNFT (Zheng et al. 2025), reinforcement on the forward process.

    Each round samples `group_size` videos for each of `prompts_per_round` prompts with the old policy (the ODE,
    `steps` Euler steps at `guidance`: rollouts only, evaluation has its own settings), scores them with the
    rewards YAML and turns each video's group-relative advantage into an optimality probability r. Then
    `updates_per_round` optimiser steps each take an equal share of the round's clean samples, re-noise every one
    at a `timestep_fraction` of the sampling schedule's noise levels and minimise the NFT loss
    (`dpo.losses.nft_loss`): the conditional velocity only (CFG-free training), no likelihoods, no trajectories.
    After a round the old policy moves towards the trained one: old <- d old + (1 - d) policy.
    """

    method: Literal["nft"] = option("nft", "Trainer: nft (this config); dpo, sft, reward_gradient and grpo have "
                                           "their own.")
    beta: float = option(1.0, "beta: strength of the implicit policies v+ = beta v + (1 - beta) v_old and v- = "
                              "(1 + beta) v_old - beta v (DiffusionNFT: 1.0, 0.1 for OCR; > 0).")
    kl_weight: float = option(1e-4, "Weight of mean (v - v_base)^2, the policy's velocity against the base's "
                                    "(adapter disabled) on the same input (DiffusionNFT's train.beta: 1e-4); 0 "
                                    "skips the reference forward.")
    timestep_fraction: float = option(0.99, "Noise levels each sample is trained at per round: int(steps x this) "
                                            "of the sampling schedule's `steps` levels, drawn without repeats "
                                            "(DiffusionNFT: 0.99, i.e. 9 of 10). Training forwards per video = "
                                            "3 x that (policy, old, base).")
    old_decay_start: int = option(0, "Optimiser steps before the old policy starts keeping part of itself: until "
                                     "then it becomes the policy after every round (DiffusionNFT: 0, or 75).")
    old_decay_rate: float = option(0.001, "d = min((step - old_decay_start) x this, old_decay_max) after "
                                          "old_decay_start (DiffusionNFT: 0.001, or 0.0075).")
    old_decay_max: float = option(0.5, "The most of itself the old policy keeps per round (DiffusionNFT: 0.5, or "
                                       "0.999; 0 makes it the policy after every round).")

    def __post_init__(self) -> None:
        TrainingOptions.__post_init__(self)
        LoraOptions.__post_init__(self)
        SamplingOptions.__post_init__(self)
        RoundOptions.__post_init__(self)
        if not self.beta > 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        in_range("beta", self.beta, 0, 1e3)
        in_range("kl_weight", self.kl_weight, 0, 1e6)
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError("timestep_fraction", f"must be in (0, 1], got {self.timestep_fraction}")
        in_range("old_decay_start", self.old_decay_start, 0, 10**9)
        in_range("old_decay_rate", self.old_decay_rate, 0, 1)
        if not 0 <= self.old_decay_max < 1:
            raise ConfigError("old_decay_max", f"must be in [0, 1), got {self.old_decay_max}")

    @property
    def train_timesteps(self) -> int:
        """Noise levels per sample per round: int(steps x timestep_fraction), at least 1."""
        return max(1, int(self.steps * self.timestep_fraction))

    def old_decay(self, step: int) -> float:
        """d after `step` optimiser steps: the share of itself the old policy keeps at the round's end."""
        if step < self.old_decay_start:
            return 0.0
        return min((step - self.old_decay_start) * self.old_decay_rate, self.old_decay_max)
