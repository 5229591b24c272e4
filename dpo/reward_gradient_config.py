"""The reward-gradient trainer's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config import ConfigError, option
from rlhf.options import (
    FAMILY_HELP,
    MAX_MICRO_BATCH,
    QUANTIZE_HELP,
    DeviceName,
    DTypeName,
    LoraOptions,
    QuantizeName,
    SamplingOptions,
    TrainingOptions,
    device_name_problem,
    family_name_problem,
    in_range,
    quantize_problem,
)

DecodeFrames = Literal["first", "k_evenly_spaced", "random_k"]


@dataclass
class RewardGradientConfig(TrainingOptions, LoraOptions, SamplingOptions):
    """`train` with `method: reward_gradient`: DRaFT-K / ReFL-style training on differentiable rewards.

    Samples from the policy, back-propagates the (normalised, weighted) reward of decoded frames through the
    last `grad_steps` denoising steps into the LoRA parameters, optionally regularised towards the base.
    """

    method: Literal["reward_gradient"] = option(
        "reward_gradient", "Trainer: reward_gradient (this config); dpo has its own config."
    )
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
        "k_evenly_spaced", "Frames decoded for the reward: k_evenly_spaced (num_decode_frames frames from first "
        "to last: the causal VAE decodes every latent frame, so the reward's gradient reaches all of them), "
        "random_k (num_decode_frames distinct random frames per micro-batch) or first (video frame 0 only: "
        "cheap, but the gradient reaches latent frame 0 alone, i.e. the first frame of the video)."
    )
    num_decode_frames: int | None = option(
        None, "k for decode_frames k_evenly_spaced / random_k (1..frames); unset = min(8, frames), the frames "
        "clip/aesthetic read (num_frames 8). Leave unset with first."
    )
    vae_gradient_checkpointing: bool = option(
        True, "Recompute each latent frame's VAE decoder pass in the backward pass (far less VAE memory)."
    )
    reward_scale: float = option(1.0, "lambda_r: the loss is -lambda_r * mean(weighted reward).")
    reward_normalize: Literal["calibrate", "none"] = option(
        "calibrate", "How each reward is scaled before weighting: calibrate = (score - median) / s, s the pooled "
        "within-prompt spread (calibration_spread; by default the 1.4826 MAD, the scale `pairs` with normalize: "
        "prompt divides by, so a weight means the same in both) of the base model's scores on "
        "calibration_prompts x calibration_samples videos drawn at start; none = raw scores (a weight then "
        "multiplies the reward's own units)."
    )
    calibration_spread: Literal["mad", "std"] = option(
        "mad", "The within-prompt spread s that reward_normalize calibrate divides by: mad (1.4826 MAD, the scale "
        "`pairs` uses, robust to outlying videos) or std (pooled within-prompt standard deviation: steady "
        "when a reward's scores within a prompt form two clusters, as CLIP's do when the base draws the asked "
        "value or its confusion; a MAD of a few such videos is either one cluster's width or half their gap)."
    )
    calibration_prompts: int = option(4, "Prompts sampled by the base model at start for reward_normalize "
                                         "calibrate (the first of the seed's prompt order).")
    calibration_samples: int = option(4, "Videos per calibration prompt (>= 2: the scale is a within-prompt "
                                         "spread); the start costs calibration_prompts x this no-grad samples.")
    fm_weight: float = option(
        0.0, "lambda_fm: weight of mean ||v_policy(x_t) - v_base(x_t)||^2, the policy's velocity against the "
        "base's (adapter disabled) on a noised copy x_t of the policy's own detached samples at a random "
        "logit-normal sigma: 0 at the base, so it keeps the model near the base; 0 disables it."
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
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
        if not 1 <= self.grad_steps <= self.steps:
            raise ConfigError("grad_steps", f"must be in 1..steps ({self.steps}), got {self.grad_steps}")
        if self.decode_frames == "first":
            if self.num_decode_frames is not None:
                raise ConfigError("num_decode_frames", "applies only to decode_frames k_evenly_spaced or "
                                  "random_k (first decodes one frame)")
        elif self.num_decode_frames is None:
            self.num_decode_frames = min(8, self.frames)
        elif not 1 <= self.num_decode_frames <= self.frames:
            raise ConfigError("num_decode_frames", f"must be in 1..frames ({self.frames}) with decode_frames "
                              f"{self.decode_frames}, got {self.num_decode_frames}")
        if self.reward_scale <= 0:
            raise ConfigError("reward_scale", f"must be > 0, got {self.reward_scale}")
        if self.fm_weight < 0:
            raise ConfigError("fm_weight", f"must be >= 0, got {self.fm_weight}")
        if self.calibration_prompts < 1:
            raise ConfigError("calibration_prompts", f"must be >= 1, got {self.calibration_prompts}")
        if self.calibration_samples < 2:
            raise ConfigError("calibration_samples", f"must be >= 2 (a within-prompt spread), got "
                              f"{self.calibration_samples}")
