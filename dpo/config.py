"""The Flow-DPO trainer's config (kept light: `--help` builds it without importing torch)."""

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
    TrainingOptions,
    device_name_problem,
    in_range,
    quantize_problem,
)


@dataclass
class SigmaOptions:
    """The training sigmas of the flow-matching error (algorithms.md, "Flow matching"): shared by the trainers
    that noise cached latents (dpo, sft)."""

    sigma_sampler: Literal["logit_normal", "uniform"] = option("logit_normal", "Training sigma distribution.")
    logit_mean: float = option(0.0, "Mean of the logit-normal sigma sampler.")
    logit_std: float = option(1.0, "Std of the logit-normal sigma sampler.")
    apply_shift: bool = option(True, "Apply the checkpoint scheduler's shift to the sampled sigmas.")

    def __post_init__(self) -> None:
        if self.logit_std <= 0:
            raise ConfigError("logit_std", f"must be > 0, got {self.logit_std}")


@dataclass
class DPOConfig(TrainingOptions, LoraOptions, SigmaOptions):
    """`train` with `method: dpo`: Flow-DPO on a pairs dataset, reading cached latents and embeddings only."""

    method: Literal["dpo"] = option("dpo", "Trainer: dpo (this config); reward_gradient has its own config.")
    pairs: str | None = option(None, "Pairs dataset directory written by `contentv-rlhf pairs`.")
    store: str | None = option(None, "Rollout store the pairs refer to (default: the one recorded in the pairs).")
    model: str | None = option(None, "Base checkpoint (default: the model recorded in the rollout store).")
    device: DeviceName = option("auto", "Device (under accelerate launch, each process gets its own).",
                                check=device_name_problem)
    dtype: DTypeName = option("bf16", "Storage dtype of the frozen transformer weights.")
    quantize: QuantizeName = option("none", QUANTIZE_HELP, check=quantize_problem)
    beta: float = option(500.0, "DPO beta for the per-element-mean error (published: ~100 to ~2000).")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = option("sigmoid", "DPO loss variant (trl's vocabulary).")
    sft_weight: float = option(0.0, "Weight of an SFT term err(policy, winner) added to the loss.")
    pair_weighting: Literal["none", "margin"] = option(
        "none", "Weight pairs by their combined score margin (normalised to mean 1) or not."
    )
    batch_size: int = option(1, "Pairs per micro-batch per process (winner and loser run in one forward).")
    init_adapter: str | None = option(None, "Start the LoRA from this adapter (e.g. the previous online round's).")
    reference: Literal["base", "init"] = option(
        "base", "Reference model: the base (adapter disabled) or base + init_adapter (frozen)."
    )

    def __post_init__(self) -> None:
        TrainingOptions.__post_init__(self)
        LoraOptions.__post_init__(self)
        SigmaOptions.__post_init__(self)
        if not self.pairs:
            raise ConfigError("pairs", "is required: a pairs dataset directory")
        if self.beta <= 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ConfigError("sft_weight", f"must be >= 0, got {self.sft_weight}")
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
        if self.reference == "init" and not self.init_adapter:
            raise ConfigError("reference", "'init' needs init_adapter (the adapter the reference keeps)")
