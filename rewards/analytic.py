"""Weight-free image statistics as rewards: cheap, differentiable, no files needed.

Meant for the quickstart, toy benchmarks and tests, and as held-out sanity signals; each one alone is
trivially hackable (brighter, noisier, flickering), so do not train on one by itself. All take frames
in [0, 1], ignore the prompt and average over every frame of the video (on a rollout store's kept frames,
the per-frame ones average those; `frame_diff_motion` needs every frame, so the store's mp4s).

- `brightness`: mean luma `Y = 0.299 R + 0.587 G + 0.114 B` (ITU-R BT.601), in [0, 1].
- `contrast`: RMS contrast, the standard deviation of luma over each frame's pixels.
- `colorfulness`: Hasler & Süsstrunk, "Measuring colourfulness in natural images" (2003):
  `rg = R - G`, `yb = (R + G) / 2 - B`, `M = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)`
  per frame, on [0, 1] values (the paper's 0-255 values divided by 255; ~0.13 is "quite colourful").
- `frame_diff_motion`: mean absolute difference of consecutive frames. Rewards flicker and noise as
  much as real motion (a static video plus noise scores like a pan); use `motion` to train on motion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rewards.base import Scorer

# A small variance floor keeps sqrt differentiable on constant frames (d sqrt(x)/dx is infinite at 0).
_EPS = 1e-8


def luma(frames: torch.Tensor) -> torch.Tensor:
    """`(..., 3, H, W)` RGB -> `(..., H, W)` BT.601 luma."""
    red, green, blue = frames.unbind(-3)
    return 0.299 * red + 0.587 * green + 0.114 * blue


class BrightnessScorer(Scorer):
    """Mean luma of the video, in [0, 1]."""

    name = "brightness"
    differentiable = True

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return luma(frames.float()).mean(dim=(1, 2, 3))


class ContrastScorer(Scorer):
    """RMS contrast: per-frame standard deviation of luma, averaged over frames."""

    name = "contrast"
    differentiable = True

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        y = luma(frames.float()).flatten(2)  # (B, T, H*W)
        return (y.var(dim=2, unbiased=False) + _EPS).sqrt().mean(1)


class ColorfulnessScorer(Scorer):
    """Hasler–Süsstrunk colourfulness per frame (on [0, 1] values), averaged over frames."""

    name = "colorfulness"
    differentiable = True

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        red, green, blue = frames.float().flatten(3).unbind(2)  # each (B, T, H*W)
        rg, yb = red - green, (red + green) / 2 - blue
        spread = (rg.var(dim=2, unbiased=False) + yb.var(dim=2, unbiased=False) + _EPS).sqrt()
        offset = (rg.mean(dim=2) ** 2 + yb.mean(dim=2) ** 2 + _EPS).sqrt()
        return (spread + 0.3 * offset).mean(1)


class FrameDiffMotionScorer(Scorer):
    """Mean absolute difference between consecutive frames (hackable by flicker; 0 for one frame)."""

    name = "frame_diff_motion"
    differentiable = True

    def frame_positions(self, num_frames: int) -> list[int]:
        return list(range(num_frames))  # consecutive frames: a subset would change the spacing

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        frames = frames.float()
        if frames.shape[1] < 2:
            return frames.sum(dim=(1, 2, 3, 4)) * 0  # zeros that stay connected to the graph
        return (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
