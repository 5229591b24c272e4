"""VBench's temporal flickering as a dimension object (no model)."""

from __future__ import annotations

import torch

from rlhf.vbench.formulas import temporal_flickering


class TemporalFlickering:
    """`temporal_flickering`: `formulas.temporal_flickering` of every frame. VBench evaluates it on static videos
    only (its prompts for this dimension ask for none); on moving videos it also measures the motion."""

    def to(self, device: torch.device | str) -> TemporalFlickering:
        return self  # no weights

    def __call__(self, frames: torch.Tensor) -> float:
        return temporal_flickering(frames)
