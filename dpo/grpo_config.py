"""The GRPO trainer's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpo.round_config import MAX_GROUP, RoundOptions
from rlhf.config import ConfigError, option
from rlhf.options import LoraOptions, SamplingOptions, TrainingOptions, in_range

MAX_NOISE_LEVEL = 10.0  # flow_grpo uses 0.7; far above 1 the SDE's noise swamps the sample


@dataclass
class GRPOConfig(TrainingOptions, LoraOptions, SamplingOptions, RoundOptions):
    """`train` with `method: grpo`: online Flow-GRPO with an SDE window (Flow-GRPO-Fast / MixGRPO).

    Each round samples `group_size` videos for each of `prompts_per_round` prompts with the policy (CFG), the
    steps of a window stochastic (the reverse SDE with noise level `noise_level`), the others ODE; scores them with
    the rewards YAML, turns rewards into group-relative advantages and takes `updates_per_round` optimiser steps
    of the PPO-clipped loss on the window's transitions (+ beta * KL to the base). `max_steps` counts optimiser
    steps, so a run has max_steps / updates_per_round rounds.
    """

    method: Literal["grpo"] = option("grpo", "Trainer: grpo (this config); dpo and reward_gradient have their own.")
    # The SDE window
    noise_level: float = option(0.7, "a: the reverse SDE's noise level, std_t = a * sqrt(sigma / (1 - sigma)) "
                                     "(flow_grpo 0.7; > 0).")
    sde_window_size: int = option(2, "Denoising steps run as the SDE (stochastic, trained); the others run as "
                                     "the ODE (1..steps). Training forwards per video = this.")
    sde_window_start: int = option(0, "First SDE step (0-based) of round 0 (0..steps - sde_window_size).")
    sde_window: Literal["fixed", "sliding"] = option(
        "sliding", "fixed: the window stays at sde_window_start; sliding (MixGRPO): it moves one step later every "
        "window_slide_every rounds, wrapping back to 0 after the last position.")
    window_slide_every: int = option(1, "Rounds per one-step move of a sliding window (>= 1).")
    # Loss
    clip_range: float = option(1e-4, "PPO clip range of the ratio (flow_grpo SD3: 1e-4; the per-dimension mean "
                                     "log-probabilities keep ratios near 1).")
    beta: float = option(0.004, "Weight of the exact Gaussian KL to the base (adapter disabled) per transition; "
                                "0 skips the reference forward. flow_grpo's beta 0.04 with its KL form equals "
                                "0.04 x |dt| here (0.004 at 10 steps).")

    def __post_init__(self) -> None:
        TrainingOptions.__post_init__(self)
        LoraOptions.__post_init__(self)
        SamplingOptions.__post_init__(self)
        RoundOptions.__post_init__(self)
        in_range("window_slide_every", self.window_slide_every, 1, MAX_GROUP)
        if not 0 < self.noise_level <= MAX_NOISE_LEVEL:
            raise ConfigError("noise_level", f"must be in (0, {MAX_NOISE_LEVEL:g}], got {self.noise_level}")
        if not 1 <= self.sde_window_size <= self.steps:
            raise ConfigError("sde_window_size", f"must be in 1..steps ({self.steps}), got {self.sde_window_size}")
        last = self.steps - self.sde_window_size
        if not 0 <= self.sde_window_start <= last:
            raise ConfigError("sde_window_start", f"must be in 0..steps - sde_window_size ({last}), got "
                              f"{self.sde_window_start}")
        if not 0 < self.clip_range < 1:
            raise ConfigError("clip_range", f"must be in (0, 1), got {self.clip_range}")
        in_range("beta", self.beta, 0, 1e6)

    def window(self, round_index: int) -> range:
        """The SDE steps (0-based step indices) of round `round_index`."""
        start = self.sde_window_start
        if self.sde_window == "sliding":
            start = (start + round_index // self.window_slide_every) % (self.steps - self.sde_window_size + 1)
        return range(start, start + self.sde_window_size)
