"""Config sections shared by every stage that runs the model: which model, where, and how to sample.

Kept free of heavy imports so `contentv-rlhf <command> --help` is instant. Stage configs (generate,
rollout, ...) inherit these sections; their fields map one to one onto YAML keys and CLI flags.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.config import ConfigError, option
from rlhf.io import output_path_problem
from rlhf.models.family import FAMILIES

DeviceName = str  # auto | cuda | npu | cpu, the accelerators optionally indexed (cuda:1); see device_name_problem
DTypeName = Literal["bf16", "fp16", "fp32"]
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cuda", "npu", "cpu")
DTYPE_CHOICES: tuple[str, ...] = DTypeName.__args__
# Storage of the frozen transformer's block weights (rlhf/lowmem.py): full precision (`dtype`), or torchao's
# per-row int8 / float8 weight-only, or 4-bit NormalFloat (QLoRA).
QuantizeName = Literal["none", "int8_weight_only", "float8_weight_only", "nf4"]
QUANTIZE_HELP = ("Store the frozen transformer's block weights quantised (torchao, pip install "
                 "'contentv-rlhf[quant]'): none, int8_weight_only, float8_weight_only (8 bits: half of bf16) or nf4 "
                 "(4-bit NormalFloat: about a quarter); matmuls run in `dtype` on the dequantised weights. LoRA "
                 "trains on top; merge always fuses into the full-precision release weights.")


def quantize_problem(mode: str) -> str | None:
    """What is wrong with a quantize setting (None when it can run): a mode other than none needs torchao."""
    import importlib.util

    if mode != "none" and importlib.util.find_spec("torchao") is None:
        return f"{mode!r} needs torchao (pip install 'contentv-rlhf[quant]')"
    return None



# Gradient checkpointing of the transformer blocks (rlhf/checkpointing.py).
CheckpointPolicyName = Literal["auto", "full", "selective"]

COMPILE_HELP = ("torch.compile each transformer block (regional: one block's compile time, not the whole "
                "model's), paid during the first steps and logged apart (compile_seconds); see the README "
                "for when it pays off.")


def device_name_problem(name: str) -> str | None:
    """What is wrong with a device name (None when it is one of DEVICE_CHOICES, or e.g. `cuda:1`)."""
    kind, sep, index = name.partition(":")
    if kind in DEVICE_CHOICES and (not sep or (index.isdigit() and kind != "auto")):
        return None
    return f"expects one of {', '.join(DEVICE_CHOICES)} or an indexed device such as cuda:1, got {name!r}"

def family_name_problem(name: str | None) -> str | None:
    """What is wrong with a model family name (None when it is registered, or not given)."""
    if name is None or name in FAMILIES:
        return None
    return f"expects one of {', '.join(FAMILIES)}, got {name!r}"


logger = logging.getLogger("contentv-rlhf")
VAE_TEMPORAL_FACTOR = 4  # Wan VAE: 4x temporal compression, frames = 4k + 1
# Upper bounds of sizes and counts: far above any real use (ContentV-8B: 125 frames of 432x768, 50 steps),
# low enough that a typo (an extra digit run, 1e9) fails here instead of in an allocation or a loop of years.
MAX_FRAMES = 10_001  # 4k + 1
MAX_SIDE = 8192  # pixels: 8K
MAX_STEPS = 10_000  # sampling steps
MAX_SEQUENCE_LENGTH = 4096  # T5 tokens
MAX_GUIDANCE = 100  # CFG scales in use are 1 to ~15; beyond this the latents overflow into NaN videos
MIN_FPS, MAX_FPS = 0.01, 1000  # mp4 time bases below 0.01 fps round to 0 (the muxer falls back to 24)
MAX_LEARNING_RATE = 1  # AdamW on LoRA weights: any step of this size already diverges
MAX_LORA_RANK = 16_384  # wider than any DiT layer it adapts
MAX_MICRO_BATCH = 4096  # videos (or pairs) in one forward: far beyond any accelerator's memory
MAX_ADAPTER_SCALE = 100  # an update scaled further is no longer the trained one (and overflows toward inf)


def uses_guidance(guidance: float) -> bool:
    """Whether classifier-free guidance runs at this scale: only above 1, as in diffusers and ContentV
    (`do_classifier_free_guidance = guidance_scale > 1`); at or below 1 there is no unconditional branch."""
    return guidance > 1.0


def in_range(name: str, value: float, low: float, high: float) -> None:
    """Raise ConfigError naming `name` unless low <= value <= high (NaN fails too)."""
    if not value >= low:
        raise ConfigError(name, f"must be >= {low}, got {value}")
    if not value <= high:
        raise ConfigError(name, f"must be <= {high}, got {value}")


def optional_seconds(name: str, value: float | None) -> None:
    """Raise ConfigError naming `name` unless `value` is None or a finite number of seconds > 0 (a time budget
    or interval)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(name, f"must be a finite number of seconds > 0, got {value}")

# The eight MM-DiT attention projections present in every ContentV block.
DEFAULT_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
# ContentV's reference demo negative prompt.
DEFAULT_NEGATIVE_PROMPT = (
    "overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, bad eyes, bad limbs, "
    "distortion"
)


def round_frames(frames: int) -> int:
    """The frame count the Wan VAE produces for a request: `frames` if it is 4k + 1, else
    `frames // 4 * 4 + 1` (ContentV's pipeline rule)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if frames % VAE_TEMPORAL_FACTOR == 1:
        return frames
    return frames // VAE_TEMPORAL_FACTOR * VAE_TEMPORAL_FACTOR + 1


FAMILY_HELP = (f"Model family of `model`: {', '.join(FAMILIES)} (default: the one its model_index.json names; "
               "docs/models.md).")


@dataclass
class ModelOptions:
    """Which checkpoint to load, onto which device, and the memory-saving switches."""

    model: str | None = option(
        None, "Checkpoint directory (diffusers layout: ContentV, Wan2.1 or Wan2.2 TI2V, docs/models.md). Make a tiny "
        "one with `contentv-rlhf tiny-model DIR`. Its sampling_defaults.json, if any, replaces the sampling defaults "
        "shown here (config and flags still win)."
    )
    family: str | None = option(None, FAMILY_HELP, check=family_name_problem)
    device: DeviceName = option("auto", "Device: auto picks npu (USE_ASCEND_NPU=1), then cuda, then cpu; "
                                        "cuda:1 picks a GPU.", check=device_name_problem)
    dtype: DTypeName = option("bf16", "Transformer and text-encoder dtype.")
    vae_dtype: DTypeName = option("fp32", "VAE dtype (fp32 recommended: the Wan VAE is sensitive to bf16).")
    adapter: str | None = option(None, "LoRA adapter directory to apply to the transformer (peft or diffusers format).")
    adapter_scale: float = option(1.0, f"Multiplier of the adapter's update, 0..{MAX_ADAPTER_SCALE} "
                                       "(1.0 = as trained).")
    free_text_encoders: bool = option(
        True, "Drop the text encoders once the prompts are encoded (they are not needed for sampling)."
    )
    cpu_offload: bool = option(
        False, "Keep models on the CPU and move each to the device only while it runs (slower, far less memory)."
    )
    vae_tiling: bool = option(False, "Decode in spatial tiles to cut VAE memory for large frames.")
    vae_slicing: bool = option(False, "Decode the batch one video at a time to cut VAE memory.")
    compile: bool = option(False, COMPILE_HELP)
    quantize: QuantizeName = option("none", QUANTIZE_HELP, check=quantize_problem)
    group_offload: bool = option(
        False, "Keep the transformer on the CPU and move one block at a time to the device just before it runs "
        "(diffusers group offloading; on CUDA the next block is prefetched on a side stream): the transformer "
        "then needs about one block of device memory instead of all its weights."
    )

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError(
                "model", "is required: a ContentV checkpoint directory (make a tiny one with "
                "`contentv-rlhf tiny-model DIR`)"
            )
        in_range("adapter_scale", self.adapter_scale, 0, MAX_ADAPTER_SCALE)
        if self.group_offload and self.cpu_offload:
            raise ConfigError("group_offload", "cannot be combined with cpu_offload (that moves the whole "
                                               "transformer; group_offload moves one block at a time): pick one")
        if self.group_offload and self.quantize == "nf4":
            # diffusers swaps torchao's int8/float8 tensors between devices explicitly; the nf4 tensor is no such
            # subclass, and its generic `.data` swap is not verified on an accelerator.
            raise ConfigError("group_offload", "does not support quantize nf4; use int8_weight_only or "
                                               "float8_weight_only with it")


@dataclass
class SamplingOptions:
    """How videos are sampled: size, steps, guidance. Defaults are the model folder's `sampling_defaults.json`
    (rlhf/model_defaults.py) where the config's `model` has one, else its model family's (docs/models.md; ContentV's
    reference settings are the defaults written here); the YAML and flags override both."""

    frames: int = option(125, "Number of frames; rounded to 4k + 1 (ContentV's rule: n // 4 * 4 + 1) if needed.")
    height: int = option(432, "Frame height in pixels (a multiple of 16).")
    width: int = option(768, "Frame width in pixels (a multiple of 16).")
    steps: int = option(50, "Number of Euler steps.")
    guidance: float = option(6.0, f"Classifier-free guidance scale, 0..{MAX_GUIDANCE:g} (at or below 1 "
                                  "there is no guidance: no unconditional branch, as in diffusers).")
    guidance_2: float | None = option(
        None, f"Guidance scale of a two-expert model's low-noise expert (Wan2.2 A14B's transformer_2, WanPipeline's "
        f"guidance_scale_2), 0..{MAX_GUIDANCE:g}; default: guidance. Whether guidance runs at all follows guidance."
    )
    negative_prompt: str = option(DEFAULT_NEGATIVE_PROMPT, "Negative prompt used for the unconditional branch.")
    max_sequence_length: int | None = option(
        None, "T5 tokens per prompt (default: the model family's: ContentV 256, or its T5 tokenizer's "
        "model_max_length when shorter; Wan 512)."
    )
    batch_cfg: bool = option(
        True, "Run the conditional and unconditional branches in one batched forward (faster; "
        "--no-batch-cfg halves activation memory)."
    )

    @classmethod
    def data_defaults(cls, data: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """The sampling defaults of the model folder `data["model"]` for this config's fields (rlhf.config's hook:
        dataclass defaults < the model's file < YAML < flags)."""
        from rlhf.model_defaults import defaults_for

        return defaults_for(cls, data)

    def __post_init__(self) -> None:
        in_range("frames", self.frames, 1, MAX_FRAMES)
        if round_frames(self.frames) != self.frames:  # rounded once, here, so every stage sees the same count
            logger.warning("frames=%d is not of the form 4k + 1; using %d frames", self.frames,
                           round_frames(self.frames))
            self.frames = round_frames(self.frames)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ConfigError(name, f"must be a positive multiple of 16, got {value}")
            in_range(name, value, 16, MAX_SIDE)
        in_range("steps", self.steps, 1, MAX_STEPS)
        in_range("guidance", self.guidance, 0, MAX_GUIDANCE)
        if self.guidance_2 is not None:
            in_range("guidance_2", self.guidance_2, 0, MAX_GUIDANCE)
            check_guidance_2(getattr(self, "model", None), getattr(self, "family", None))
        if self.max_sequence_length is not None:
            in_range("max_sequence_length", self.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)


def check_guidance_2(model: Any, family: Any) -> None:
    """Refuse `guidance_2` (set) for a model whose family has one transformer: only a two-expert family (Wan2.2 A14B)
    has a low-noise expert to guide, and the others' samplers would ignore it. Every config that samples (generate,
    rollout, eval, compare, the online trainers) checks it when built, before any work. A folder the family cannot
    be read from, or a two-expert folder named as a one-transformer family, is left to the model loader, whose
    message names the fix."""
    from pathlib import Path

    from rlhf.errors import UserError

    if not isinstance(model, (str, Path)) or not str(model).strip():
        return
    from rlhf.models.family import family_for, has_second_expert, read_model_index

    try:
        model_family = family_for(model, family if isinstance(family, str) else None)
        index = read_model_index(model)
    except UserError:
        return
    if len(model_family.transformer_folders) > 1 or has_second_expert(index):
        return
    raise ConfigError("guidance_2", f"is set, but model family {model_family.name} has one transformer: only "
                      "two-expert families (wan2.2-a14b) take a low-noise expert's guidance scale; remove it")


@dataclass
class VideoOptions(SamplingOptions):
    """Sampling plus what the stages that write mp4 files need."""

    fps: float = option(24.0, f"Frame rate written to mp4 files ({MIN_FPS:g} to {MAX_FPS:g}).")

    def __post_init__(self) -> None:
        SamplingOptions.__post_init__(self)
        in_range("fps", self.fps, MIN_FPS, MAX_FPS)


@dataclass
class LoraOptions:
    """The LoRA adapter trained on the transformer (peft)."""

    lora_rank: int = option(32, "LoRA rank r.")
    lora_alpha: float = option(64.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch.")
    lora_targets: list[str] | None = option(
        None,
        "Module name suffixes to adapt (default: the model family's, docs/models.md; ContentV: the 8 MM-DiT "
        "attention projections of every block, Wan2.1: the self- and cross-attention projections).",
    )

    def __post_init__(self) -> None:
        in_range("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)
        if self.lora_alpha <= 0:
            raise ConfigError("lora_alpha", f"must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("lora_targets", "must name at least one module")


@dataclass
class TrainingOptions:
    """Optimisation, precision, checkpointing and logging shared by every trainer."""

    output_dir: str | None = option(None, "Run directory: checkpoints/, logs/, adapter/ and summary.json go here.")
    learning_rate: float = option(1e-4, "Peak AdamW learning rate of the LoRA parameters.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = option("constant", "Schedule after warmup.")
    warmup_steps: int = option(0, "Linear warmup steps.")
    max_steps: int = option(100, "Optimiser steps to train.")
    max_seconds: float | None = option(
        None, "Also stop after the first optimiser step that ends with this many seconds of wall time spent "
        "since the command started (model loading, reward calibration and checkpoints included; a resumed run "
        "counts afresh): that step is checkpointed and the adapter written as at max_steps. For comparing trainers "
        "at one wall-time budget; none = only max_steps stops.")
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimiser step.")
    max_grad_norm: float = option(1.0, "Gradient-norm clipping (0 disables).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    use_8bit_adam: bool = option(False, "bitsandbytes AdamW8bit (requires bitsandbytes and a CUDA device).")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("bf16", "Autocast precision; LoRA weights stay fp32.")
    gradient_checkpointing: bool = option(True, "Recompute transformer blocks in the backward pass.")
    checkpoint_policy: CheckpointPolicyName = option(
        "auto", "With gradient_checkpointing: full recomputes each block's whole forward (least memory, about a "
        "third more FLOPs per step); selective keeps the outputs of the matmuls and attention and recomputes only "
        "the elementwise operations (almost no extra FLOPs, more memory); auto runs the first step with full, "
        "measures one block's activations, then keeps the fastest of none, selective and full whose activations "
        "fit in 75% of the device's free memory (logged; with compile: full). See rlhf/checkpointing.py.")
    compile: bool = option(False, COMPILE_HELP)
    log_utilisation: bool = option(
        True, "Log each step's model and hardware TFLOP (counted by torch's FlopCounterMode on the first eager "
        "step of each kind, gradient-checkpoint recompute apart) and its MFU / HFU against the device's peak "
        "(the published dense figure, or on CPU a matmul measured at the start); not with compile (a compiled "
        "region hides its operations from the counter).")
    seed: int = option(0, "Seed of data order, noise and sigmas.")
    save_every: int = option(50, "Write a checkpoint every N optimiser steps (0: only at the end).")
    save_every_seconds: float | None = option(
        None, "Also write a checkpoint once this many seconds have passed since the command started or the last "
        "checkpoint (at a round's end for trainers that train in rounds): checkpoints evenly spaced in wall time, "
        "for time-to-target curves.")
    keep_last: int = option(3, "Checkpoints kept (older ones are deleted).")
    resume_from: str | None = option(None, "'latest' or a checkpoint directory to resume from ('latest' in a run "
                                     "killed before its first checkpoint starts it again at step 0).")
    overwrite: bool = option(False, "Replace the run already in output_dir (its checkpoints, logs, adapter and "
                                    "summary) instead of refusing; without it a run directory is only resumed.")
    log_every: int = option(1, "Log metrics every N optimiser steps.")
    report_to: Literal["tensorboard", "wandb", "none"] = option("tensorboard", "Experiment tracker (metrics.jsonl "
                                                                "is always written).")
    max_nonfinite_steps: int = option(5, "Stop after this many consecutive steps with a non-finite loss.")
    max_skipped_fraction: float = option(
        0.5, "A run that ends with more than this fraction of its steps skipped as non-finite (loss or gradient), "
        "or with every step skipped, exits with status 2 and writes no adapter (0..1).")
    allow_changed_settings: bool = option(
        False, "With resume_from: continue a checkpoint under settings that change the training trajectory "
        "(learning rate, beta, data, seed, ...; refused without this flag), recording the change in the "
        "checkpoints, summary.json (changed_settings) and the first resumed step's metrics record.")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir", "is required: the run directory")
        if self.compile and self.gradient_checkpointing and self.checkpoint_policy == "selective":
            raise ConfigError("checkpoint_policy", "selective does not combine with compile (torch's selective "
                              "checkpointing finds the compiled blocks' saved outputs mutated); use full, or "
                              "compile: false")
        if problem := output_path_problem(self.output_dir, "dir"):
            raise ConfigError("output_dir", problem)
        for name in ("max_steps", "gradient_accumulation_steps", "log_every", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        optional_seconds("max_seconds", self.max_seconds)
        optional_seconds("save_every_seconds", self.save_every_seconds)
        for name in ("warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be > 0, got {self.learning_rate}")
        in_range("learning_rate", self.learning_rate, 0, MAX_LEARNING_RATE)
        # What torch.optim.AdamW would reject at the first step, rejected before any work.
        for name in ("max_grad_norm", "weight_decay", "adam_epsilon"):
            in_range(name, getattr(self, name), 0, math.inf)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        in_range("max_skipped_fraction", self.max_skipped_fraction, 0, 1)
        if self.overwrite and self.resume_from:
            raise ConfigError("overwrite", "cannot be combined with resume_from (resume the run, or replace it)")
