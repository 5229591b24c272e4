"""The GRPO trainer's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config import ConfigError, option
from rlhf.options import (
    MAX_MICRO_BATCH,
    QUANTIZE_HELP,
    DeviceName,
    DTypeName,
    LoraOptions,
    QuantizeName,
    SamplingOptions,
    TrainingOptions,
    device_name_problem,
    in_range,
    quantize_problem,
)

MAX_GROUP = 4096  # samples per prompt and prompts per round: far beyond any memory or time budget
MAX_NOISE_LEVEL = 10.0  # flow_grpo uses 0.7; far above 1 the SDE's noise swamps the sample


@dataclass
class GRPOConfig(TrainingOptions, LoraOptions, SamplingOptions):
    """`train` with `method: grpo`: online Flow-GRPO with an SDE window (Flow-GRPO-Fast / MixGRPO).

    Each round samples `group_size` videos for each of `prompts_per_round` prompts with the policy (CFG), the
    steps of a window stochastic (the reverse SDE with noise level `noise_level`), the others ODE; scores them with
    the rewards YAML, turns rewards into group-relative advantages and takes `updates_per_round` optimiser steps
    of the PPO-clipped loss on the window's transitions (+ beta * KL to the base). `max_steps` counts optimiser
    steps, so a run has max_steps / updates_per_round rounds.
    """

    method: Literal["grpo"] = option("grpo", "Trainer: grpo (this config); dpo and reward_gradient have their own.")
    model: str | None = option(None, "Base ContentV checkpoint directory (diffusers layout); its "
                                     "sampling_defaults.json, if any, gives the sampling defaults.")
    device: DeviceName = option("auto", "Device (under accelerate launch, each process gets its own).",
                                check=device_name_problem)
    dtype: DTypeName = option("bf16", "Storage dtype of the frozen transformer weights and the text encoders.")
    quantize: QuantizeName = option("none", QUANTIZE_HELP, check=quantize_problem)
    vae_dtype: DTypeName = option("fp32", "VAE dtype (fp32 recommended: the Wan VAE is sensitive to bf16).")
    prompts: str | None = option(None, "Training prompt file: .txt (one per line), .jsonl/.csv with a 'prompt' "
                                       "column, or a `datasets` folder.")
    rewards: str | None = option(None, "Rewards YAML (the `score` command's format: scorers with weights, device); "
                                       "any scorer works (no gradients through rewards); weight-0 ones are logged.")
    init_adapter: str | None = option(None, "Start the LoRA from this adapter instead of zero (the KL reference "
                                            "stays the base, adapter disabled).")
    # Groups
    group_size: int = option(8, "G: videos sampled per prompt each round; advantages are relative to the group "
                                "(flow_grpo: 24; >= 2).")
    prompts_per_round: int = option(4, "Prompts per round (all processes together); a round samples "
                                       "prompts_per_round x group_size videos.")
    updates_per_round: int = option(2, "Optimiser steps per round, each on an equal share of the round's videos "
                                        "(all window transitions); after the first the ratio leaves 1 and the "
                                        "clip acts. Divides prompts_per_round x group_size, max_steps and "
                                        "save_every (checkpoints fall between rounds).")
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
    advantage_clip: float = option(5.0, "Advantages are clipped to +-this (flow_grpo: 5).")
    beta: float = option(0.004, "Weight of the exact Gaussian KL to the base (adapter disabled) per transition; "
                                "0 skips the reference forward. flow_grpo's beta 0.04 with its KL form equals "
                                "0.04 x |dt| here (0.004 at 10 steps).")
    batch_size: int = option(1, "Videos per transformer forward (sampling and training micro-batches) per "
                                "process.")

    def __post_init__(self) -> None:
        TrainingOptions.__post_init__(self)
        LoraOptions.__post_init__(self)
        SamplingOptions.__post_init__(self)
        for name, what in (("model", "a ContentV checkpoint directory"), ("prompts", "a prompt file"),
                           ("rewards", "a rewards YAML file")):
            if not getattr(self, name):
                raise ConfigError(name, f"is required: {what}")
        in_range("group_size", self.group_size, 2, MAX_GROUP)
        in_range("prompts_per_round", self.prompts_per_round, 1, MAX_GROUP)
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
        in_range("window_slide_every", self.window_slide_every, 1, MAX_GROUP)
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps", "must be 1 for grpo: an optimiser step accumulates "
                              "over its share of the round (set updates_per_round)")
        in_range("updates_per_round", self.updates_per_round, 1, MAX_GROUP)
        videos = self.prompts_per_round * self.group_size
        if videos % self.updates_per_round:
            raise ConfigError("updates_per_round", f"must divide prompts_per_round x group_size ({videos}), got "
                              f"{self.updates_per_round}")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) % self.updates_per_round:
                raise ConfigError(name, f"must be a multiple of updates_per_round ({self.updates_per_round}), so "
                                  f"checkpoints fall between rounds; got {getattr(self, name)}")
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
        if not self.advantage_clip > 0:
            raise ConfigError("advantage_clip", f"must be > 0, got {self.advantage_clip}")
        in_range("beta", self.beta, 0, 1e6)

    def window(self, round_index: int) -> range:
        """The SDE steps (0-based step indices) of round `round_index`."""
        start = self.sde_window_start
        if self.sde_window == "sliding":
            start = (start + round_index // self.window_slide_every) % (self.steps - self.sde_window_size + 1)
        return range(start, start + self.sde_window_size)
