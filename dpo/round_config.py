"""Config fields of the online trainers that sample in rounds (GRPO, DiffusionNFT), kept light (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, option
from rlhf.options import (
    FAMILY_HELP,
    MAX_MICRO_BATCH,
    QUANTIZE_HELP,
    DeviceName,
    DTypeName,
    QuantizeName,
    device_name_problem,
    family_name_problem,
    in_range,
    quantize_problem,
)

MAX_GROUP = 4096  # samples per prompt and prompts per round: far beyond any memory or time budget


@dataclass
class RoundOptions:
    """The model, data and round shape of an online trainer: each round samples `group_size` videos for each of
    `prompts_per_round` prompts with the policy, scores them with the rewards YAML and takes `updates_per_round`
    optimiser steps on them; `max_steps` counts optimiser steps (max_steps / updates_per_round rounds)."""

    model: str | None = option(None, "Base ContentV checkpoint directory (diffusers layout); its "
                                     "sampling_defaults.json, if any, gives the sampling defaults.")
    family: str | None = option(None, FAMILY_HELP, check=family_name_problem)
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
    group_size: int = option(8, "G: videos sampled per prompt each round; advantages are relative to the group "
                                "(flow_grpo: 24; >= 2).")
    prompts_per_round: int = option(4, "Prompts per round (all processes together); a round samples "
                                       "prompts_per_round x group_size videos.")
    updates_per_round: int = option(2, "Optimiser steps per round, each on an equal share of the round's videos. "
                                       "Divides prompts_per_round x group_size, max_steps and save_every "
                                       "(checkpoints fall between rounds).")
    advantage_clip: float = option(5.0, "Advantages (each reward normalised within its prompt's group, weighted "
                                        "sum) are clipped to +-this (flow_grpo and DiffusionNFT: 5).")
    batch_size: int = option(1, "Videos per transformer forward (sampling and training micro-batches) per "
                                "process.")

    def __post_init__(self) -> None:
        for name, what in (("model", "a ContentV checkpoint directory"), ("prompts", "a prompt file"),
                           ("rewards", "a rewards YAML file")):
            if not getattr(self, name):
                raise ConfigError(name, f"is required: {what}")
        in_range("group_size", self.group_size, 2, MAX_GROUP)
        in_range("prompts_per_round", self.prompts_per_round, 1, MAX_GROUP)
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("gradient_accumulation_steps", f"must be 1 for {self.method}: an optimiser step "
                              "accumulates over its share of the round (set updates_per_round)")
        in_range("updates_per_round", self.updates_per_round, 1, MAX_GROUP)
        videos = self.prompts_per_round * self.group_size
        if videos % self.updates_per_round:
            raise ConfigError("updates_per_round", f"must divide prompts_per_round x group_size ({videos}), got "
                              f"{self.updates_per_round}")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) % self.updates_per_round:
                raise ConfigError(name, f"must be a multiple of updates_per_round ({self.updates_per_round}), so "
                                  f"checkpoints fall between rounds; got {getattr(self, name)}")
        if not self.advantage_clip > 0:
            raise ConfigError("advantage_clip", f"must be > 0, got {self.advantage_clip}")
