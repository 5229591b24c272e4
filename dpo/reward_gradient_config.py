"""The reward-gradient trainer's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config import ConfigError, option
from rlhf.options import (
    DeviceName,
    DTypeName,
    LoraOptions,
    SamplingOptions,
    TrainingOptions,
    device_name_problem,
)

DecodeFrames = Literal["first", "k_evenly_spaced", "random_k"]


@dataclass
class RewardGradientConfig(TrainingOptions, LoraOptions, SamplingOptions):
    """`train` with `method: reward_gradient`: DRaFT-K / ReFL-style training on differentiable rewards.

    Samples from the policy, back-propagates the reward of decoded frames through the last `grad_steps`
    denoising steps into the LoRA parameters, optionally regularised by the flow-matching loss.
    """

    method: Literal["reward_gradient"] = option(
        "reward_gradient", "Trainer: reward_gradient (this config); dpo has its own config."
    )
    model: str | None = option(None, "Base ContentV checkpoint directory (diffusers layout).")
    device: DeviceName = option("auto", "Device (under accelerate launch, each process gets its own).",
                                check=device_name_problem)
    dtype: DTypeName = option("bf16", "Storage dtype of the frozen transformer weights and the text encoders.")
    vae_dtype: DTypeName = option("fp32", "VAE dtype (fp32 recommended: the Wan VAE is sensitive to bf16).")
    prompts: str | None = option(None, "Training prompt file: .txt (one per line), .jsonl/.csv with a 'prompt' "
                                       "column, or a `datasets` folder.")
    rewards: str | None = option(None, "Rewards YAML (the `score` command's format: scorers with weights, device); "
                                       "only differentiable scorers with a non-zero weight give gradients.")
    init_adapter: str | None = option(None, "Start the LoRA from this adapter (e.g. one trained with DPO) "
                                            "instead of zero; it also samples the first step's videos.")
    # Reward gradients
    grad_steps: int = option(1, "K: the last K denoising steps run with gradients (DRaFT-K); the others "
                                "without (1 <= K <= steps).")
    stop_latent_grad: bool = option(False, "Detach the latent input of the transformer at each step with "
                                           "gradients; gradients then reach earlier steps only through the Euler "
                                           "updates, not through the transformer's input (cheaper, lower variance).")
    decode_frames: DecodeFrames = option(
        "first", "Frames decoded for the reward: first (one latent frame: cheap with the causal VAE, "
        "ContentV's recipe), k_evenly_spaced (num_decode_frames frames from first to last) or random_k "
        "(num_decode_frames distinct random frames per micro-batch)."
    )
    num_decode_frames: int | None = option(
        None, "k for decode_frames k_evenly_spaced / random_k (1..frames); leave unset with first."
    )
    vae_gradient_checkpointing: bool = option(
        True, "Recompute each latent frame's VAE decoder pass in the backward pass (far less VAE memory)."
    )
    reward_scale: float = option(1.0, "lambda_r: the loss is -lambda_r * mean(weighted reward).")
    fm_weight: float = option(
        0.0, "lambda_fm: weight of the flow-matching loss of the policy on its own (detached) samples at a "
        "random logit-normal sigma, which keeps it near the base (ContentV's regulariser); 0 disables it."
    )
    batch_size: int = option(1, "Prompts per micro-batch per process (one sample each).")

    def __post_init__(self) -> None:
        TrainingOptions.__post_init__(self)
        LoraOptions.__post_init__(self)
        SamplingOptions.__post_init__(self)
        for name, what in (("model", "a ContentV checkpoint directory"), ("prompts", "a prompt file"),
                           ("rewards", "a rewards YAML file")):
            if not getattr(self, name):
                raise ConfigError(name, f"is required: {what}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not 1 <= self.grad_steps <= self.steps:
            raise ConfigError("grad_steps", f"must be in 1..steps ({self.steps}), got {self.grad_steps}")
        if self.decode_frames == "first":
            if self.num_decode_frames is not None:
                raise ConfigError("num_decode_frames", "applies only to decode_frames k_evenly_spaced or "
                                  "random_k (first decodes one frame)")
        elif self.num_decode_frames is None or not 1 <= self.num_decode_frames <= self.frames:
            raise ConfigError("num_decode_frames", f"must be in 1..frames ({self.frames}) with decode_frames "
                              f"{self.decode_frames}, got {self.num_decode_frames}")
        if self.reward_scale <= 0:
            raise ConfigError("reward_scale", f"must be > 0, got {self.reward_scale}")
        if self.fm_weight < 0:
            raise ConfigError("fm_weight", f"must be >= 0, got {self.fm_weight}")
