"""The SFT (rejection-sampling fine-tuning) trainer's config (kept light: `--help` builds it without importing
torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dpo.config import SigmaOptions
from rewards.pairs import ScoreCombination
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
from rollouts.config import MAX_SAMPLES_PER_PROMPT


@dataclass
class SFTConfig(TrainingOptions, LoraOptions, SigmaOptions, ScoreCombination):
    """`train` with `method: sft`: the flow-matching loss on each prompt's best samples of a scored rollout store,
    ranked by the combined score `pairs` uses (weights, normalize, pool_scale_below, eps as in `pairs`)."""

    method: Literal["sft"] = option("sft", "Trainer: sft (this config); the other methods have their own configs.")
    store: str | None = option(
        None, "Scored rollout store (see `contentv-rlhf score`) whose best samples are trained on."
    )
    model: str | None = option(None, "Base checkpoint (default: the model recorded in the rollout store).")
    device: DeviceName = option("auto", "Device (under accelerate launch, each process gets its own).",
                                check=device_name_problem)
    dtype: DTypeName = option("bf16", "Storage dtype of the frozen transformer weights.")
    quantize: QuantizeName = option("none", QUANTIZE_HELP, check=quantize_problem)
    top_k: int = option(1, "Samples kept per prompt: the top_k highest combined scores (ties in store order).")
    min_score: float | None = option(
        None, "Keep only samples whose combined score is at least this, in the weighted normalised units of "
        "`weights` (with normalize: prompt, 0 = the prompt's median); none = no threshold."
    )
    batch_size: int = option(1, "Selected samples per micro-batch per process.")

    def __post_init__(self) -> None:
        TrainingOptions.__post_init__(self)
        LoraOptions.__post_init__(self)
        SigmaOptions.__post_init__(self)
        ScoreCombination.__post_init__(self)
        if not self.store:
            raise ConfigError("store", "is required: a scored rollout store directory")
        in_range("top_k", self.top_k, 1, MAX_SAMPLES_PER_PROMPT)
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ConfigError("min_score", f"must be a finite number or none, got {self.min_score}")
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
