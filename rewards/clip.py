"""`clip`: text-video alignment, the CLIP score averaged over frames.

    score(video, prompt) = mean over N frames f of cos(E_img(f), E_txt(prompt))

with L2-normalised open_clip embeddings (`encode_image` / `encode_text`, `normalize=True`) and the
N frames taken at the middles of N equal segments of the video (VBench's frame sampling). The
cosine (in [-1, 1], typically 0.15-0.35 for matching pairs with OpenAI ViT-L/14) is used rather than
the logit `100 * cos` so that scores do not depend on a model's learned temperature.
Differentiable w.r.t. the frames. References: Radford et al., "Learning Transferable Visual Models
From Natural Language Supervision" (2021); Hessel et al., "CLIPScore" (2021); VBench (Huang et al.,
2024) for frame sampling.

Default architecture `ViT-L-14-quickgelu`: OpenAI weights need QuickGELU, and plain `ViT-L-14`
loads them silently with the wrong activation (see `rewards.clip_backbone`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewards.base import ModelCache, Scorer, sample_frames, segment_middles
from rewards.clip_backbone import LOCAL_DIR, OPENAI_VIT_L14, ClipBackbone, load_clip
from rlhf.config import ConfigError, option

DEFAULT_ARCH = "ViT-L-14-quickgelu"


@dataclass
class ClipOptions:
    """Options of the `clip` text-video alignment scorer."""

    checkpoint: str | None = option(
        None, "CLIP weights: a state-dict file for `arch`, OpenAI's TorchScript ViT-L-14.pt, or "
        "local-dir:/folder with open_clip_config.json. Never downloaded."
    )
    arch: str = option(
        DEFAULT_ARCH, "open_clip architecture of the weights. Keep the -quickgelu variant for OpenAI weights: "
        "plain ViT-L-14 loads them silently with the wrong activation. Ignored by local-dir: folders."
    )
    num_frames: int = option(8, "Frames scored per video, the middles of equal segments (VBench sampling).")

    def __post_init__(self) -> None:
        validate_clip_source(self.checkpoint, self.arch, "checkpoint")
        if self.num_frames < 1:
            raise ConfigError("num_frames", f"must be >= 1, got {self.num_frames}")


def validate_clip_source(checkpoint: str | None, arch: str, field: str) -> None:
    """ConfigError unless a checkpoint is given (existence is checked when loading) and arch is non-empty."""
    if not checkpoint or checkpoint == LOCAL_DIR:
        raise ConfigError(field, f"is required: {OPENAI_VIT_L14}")
    if not arch.strip():
        raise ConfigError("arch", "must name an open_clip architecture, e.g. ViT-L-14-quickgelu")


def shared_clip(cache: ModelCache | None, arch: str, checkpoint: str, option: str) -> ClipBackbone:
    """One ClipBackbone per (arch, weights) within a build: `clip` and `aesthetic` share the tower."""
    key = ("open_clip", arch, checkpoint if checkpoint.startswith(LOCAL_DIR) else str(Path(checkpoint).expanduser().resolve()))
    load = lambda: load_clip(arch, checkpoint, option=option)  # noqa: E731
    return load() if cache is None else cache.get(key, load)


def frame_embeddings(backbone: ClipBackbone, frames: torch.Tensor, count: int) -> torch.Tensor:
    """`(B, T, 3, H, W)` -> `(B, N, D)`: the unit-length image embeddings of each video's `count` segment-middle
    frames (N = min(count, T))."""
    picked = sample_frames(frames, count)  # (B, N, 3, H, W)
    batch, frames_per_video = picked.shape[:2]
    return backbone.encode_images(picked.flatten(0, 1)).view(batch, frames_per_video, -1)


class ClipScorer(Scorer):
    """Mean per-frame cosine similarity between a video's frames and its prompt (open_clip)."""

    name = "clip"
    differentiable = True
    Options = ClipOptions

    def __init__(self, options: ClipOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        self.backbone = shared_clip(cache, options.arch, options.checkpoint, "checkpoint")

    def frame_positions(self, num_frames: int) -> list[int]:
        return segment_middles(num_frames, self.options.num_frames)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        images = frame_embeddings(self.backbone, frames, self.options.num_frames)  # (B, N, D)
        texts = self.backbone.encode_prompts(prompts)  # (B, D)
        return (images * texts.unsqueeze(1)).sum(-1).mean(1)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "weights": self.backbone.source}
