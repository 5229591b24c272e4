"""`consistency`: temporal consistency, how much a video's frames agree with each other in a CLIP's eyes.

    score(video) = 1/(N-1) * sum_{i>=1} ( max(0, cos(e_{i-1}, e_i)) + max(0, cos(e_0, e_i)) ) / 2

with `e_i` the L2-normalised open_clip image embedding of the i-th of N frames taken at the middles of N equal
segments (VBench's `background_consistency` formula, `rlhf.vbench.formulas.consistency_scores`, on any CLIP).
A static video scores 1; a subject that changes size, shape or colour from frame to frame scores less. No
prompt is read.

Why it exists: `clip` and `aesthetic` average per-frame scores, and `motion` rewards displacement (its warp
error sees a hue that drifts, hardly an area that does), so none of them reads a subject that morphs across
frames. On the shapes world's validation split, Flow-DPO's rounds lost the oracle's cleanliness through the disc's
hue and area drifting between frames; within a prompt's samples cleanliness correlates 0.54 with this score,
0.49 with `motion`, 0.11 with `clip` and -0.10 with `aesthetic` (README "why" point 12).
Differentiable w.r.t. the frames. Shares the CLIP tower with `clip` and `aesthetic` when arch and file match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rewards.base import ModelCache, Scorer, segment_middles
from rewards.clip import DEFAULT_ARCH, frame_embeddings, shared_clip, validate_clip_source
from rlhf.config import ConfigError, option
from rlhf.vbench.formulas import consistency_scores


@dataclass
class ConsistencyOptions:
    """Options of the `consistency` temporal-consistency scorer."""

    checkpoint: str | None = option(
        None, "CLIP weights: a state-dict file for `arch`, OpenAI's TorchScript ViT-L-14.pt, or "
        "local-dir:/folder with open_clip_config.json (the `clip` scorer's file shares one copy). Never downloaded."
    )
    arch: str = option(DEFAULT_ARCH, "open_clip architecture of the weights (keep -quickgelu for OpenAI weights). "
                                     "Ignored by local-dir: folders.")
    num_frames: int = option(8, "Frames compared per video, the middles of equal segments (VBench sampling); "
                                ">= 2.")

    def __post_init__(self) -> None:
        validate_clip_source(self.checkpoint, self.arch, "checkpoint")
        if self.num_frames < 2:
            raise ConfigError("num_frames", f"must be >= 2 (a consistency compares frames), got {self.num_frames}")


class ConsistencyScorer(Scorer):
    """VBench's consistency formula on the CLIP embeddings of `num_frames` segment-middle frames."""

    name = "consistency"
    differentiable = True
    Options = ConsistencyOptions

    def __init__(self, options: ConsistencyOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        self.backbone = shared_clip(cache, options.arch, options.checkpoint, "checkpoint")

    def frame_positions(self, num_frames: int) -> list[int]:
        return segment_middles(num_frames, self.options.num_frames)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if frames.shape[1] < 2:
            raise ValueError(f"scorer 'consistency' needs at least 2 frames per video, got {frames.shape[1]}")
        return consistency_scores(frame_embeddings(self.backbone, frames, self.options.num_frames))

    def info(self) -> dict:
        return {**super().info(), "weights": self.backbone.source}
