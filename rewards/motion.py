"""`motion`: how much a video moves, discounted by how badly the motion explains the next frame.

For P frame pairs (t, t + stride), t at the middles of P equal segments of the video (moved back to
T - 1 - stride near the end; `rewards.base.frame_pairs`):

    dynamic(t) = clip(top5(|flow_t|) / (6 * min(H, W) / 256), 0, 1)
    warp_err(t) = mean |frame_t - warp(frame_{t+stride}, flow_t)|          (RGB in [0, 1])
    score = mean over pairs of dynamic(t) * exp(-warp_err(t) / tau)

`top5` is the mean of the largest 5% flow magnitudes and `6 * min(H, W) / 256` the threshold of
VBench's dynamic degree (Huang et al., "VBench", CVPR 2024), so `dynamic` is VBench's binary
"is moving" test made continuous and saturating: more motion than VBench's threshold earns nothing
extra. The warp error is the anti-hacking term: flow magnitude alone rewards flicker, per-frame
noise and jittery frames, whose next frame the flow cannot predict, while a smooth pan warps onto
the previous frame almost exactly (measured on synthetic 128 px videos, mean L1 in [0, 1]
units: pan ~0, noise ~0.04, shuffled frames ~0.03). Limit: the penalty is about predictability, so
a rigid scene played in shuffled order, which flow tracks exactly, is not penalised.

Frame spacing is that of the video: `frame_positions(T)` names the 2P frames the pairs read, so a rollout
store that kept those frames (`save_frames: P`, `save_frame_stride: stride`, the defaults) scores exactly as
the full video, and scoring a store that did not keep them reads its mp4 or fails; it never pairs the kept
frames at a spacing other than `stride`.

Frames are resized so the longer side is at most `max_size` first; the threshold uses the size the
flow was computed at, so the score does not depend on resolution. Videos with one frame score 0.

Flow backends (`rewards.flow`): `raft_small` / `raft_large` (torchvision RAFT, the model VBench
uses, weights from a local file) or `lucas_kanade` (weight-free pyramidal Lucas–Kanade: cheap and
good on textured content, less accurate on large or non-rigid motion). Not differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from rewards.base import ModelCache, Scorer, frame_pairs
from rewards.flow import RAFT_WEIGHT_URLS, RaftFlow, lucas_kanade_flow, warp
from rlhf.config import ConfigError, option

FlowBackend = Literal["raft_large", "raft_small", "lucas_kanade"]


@dataclass
class MotionOptions:
    """Options of the `motion` scorer."""

    backend: FlowBackend = option(
        "raft_large", "Optical flow: raft_large (VBench's choice), raft_small, or lucas_kanade (weight-free)."
    )
    raft_weights: str | None = option(
        None, "Local torchvision RAFT state dict for raft_* backends, e.g. raft_large_C_T_V1-22a6c225.pth "
        "(Raft_Large_Weights.C_T_V1) or raft_small_C_T_V2-01064c6d.pth."
    )
    raft_updates: int = option(12, "RAFT refinement iterations (num_flow_updates).")
    num_pairs: int = option(8, "Frame pairs per video, spread evenly over the video.")
    stride: int = option(
        3, "Video frames between the two frames of a pair. VBench compares frames ~1/8 s apart: 3 at 24 fps. "
        "Shorter videos use T - 1. Scoring a rollout store needs the rollout's save_frame_stride equal to this "
        "(and save_frames equal to num_pairs), or its mp4s."
    )
    tau: float = option(
        0.02, "Warp-error scale of the penalty exp(-warp_err / tau); warp_err is a mean L1 in [0, 1] units "
        "(0.02 ~ 5/255)."
    )
    max_size: int = option(512, "Longer side frames are resized to (at most) before estimating flow.")

    def __post_init__(self) -> None:
        if self.backend in RAFT_WEIGHT_URLS and not self.raft_weights:
            raise ConfigError("raft_weights", f"is required for backend {self.backend!r}: download "
                              f"{RAFT_WEIGHT_URLS[self.backend]}, or use backend: lucas_kanade (no weights)")
        if self.backend not in RAFT_WEIGHT_URLS and self.raft_weights:
            raise ConfigError("raft_weights", f"is only used by the raft backends, not {self.backend!r}")
        for name in ("raft_updates", "num_pairs", "stride"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.tau <= 0:
            raise ConfigError("tau", f"must be > 0, got {self.tau}")
        if self.max_size < 16:
            raise ConfigError("max_size", f"must be >= 16, got {self.max_size}")


class MotionStats(NamedTuple):
    """Per-video means over the sampled pairs, each `(B,)`."""

    score: torch.Tensor
    dynamic: torch.Tensor  # saturating dynamic degree in [0, 1]
    warp_error: torch.Tensor  # mean L1 in [0, 1] units
    top_flow: torch.Tensor  # mean of the top 5% flow magnitudes, pixels at the flow resolution


class MotionScorer(Scorer):
    """Dynamic degree from optical flow times a warp-error (flicker / incoherence) penalty."""

    name = "motion"
    differentiable = False
    Options = MotionOptions

    def __init__(self, options: MotionOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        self.raft = None
        if options.backend in RAFT_WEIGHT_URLS:
            self.raft = RaftFlow(options.backend, options.raft_weights, options.raft_updates)

    def flow(self, frame1: torch.Tensor, frame2: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` pairs -> flow `(N, 2, H, W)` with the configured backend."""
        if self.raft is not None:
            return self.raft(frame1, frame2)
        return lucas_kanade_flow(frame1, frame2)

    def frame_positions(self, num_frames: int) -> list[int]:
        """The video frames the pairs read, pair by pair: `[t_1, t_1 + stride, t_2, t_2 + stride, ...]`."""
        return [t for pair in frame_pairs(num_frames, self.options.num_pairs, self.options.stride) for t in pair]

    @torch.no_grad()
    def measure(self, frames: torch.Tensor, positions: list[int] | None = None,
                num_frames: int | None = None) -> MotionStats:
        """The score and its parts for `(B, T, 3, H, W)` frames in [0, 1]: the whole video, or the frames at
        video `positions` of a `num_frames`-frame video (which must hold `frame_positions(num_frames)`)."""
        return self._measure_pairs(self.select_frames(frames, positions, num_frames))

    def _measure_pairs(self, frames: torch.Tensor) -> MotionStats:
        """Stats of `(B, 2P, 3, H, W)` frames in pair order (`frame_positions`)."""
        batch, length = frames.shape[:2]
        if length < 2:
            zeros = frames.new_zeros(batch, dtype=torch.float32)
            return MotionStats(zeros, zeros, zeros, zeros)
        first, second = frames[:, 0::2].float(), frames[:, 1::2].float()  # (B, P, 3, H, W)
        pairs = first.shape[1]
        first, second = self._resize(first.flatten(0, 1)), self._resize(second.flatten(0, 1))  # (B*P, 3, h, w)
        flow = self.flow(first, second)  # (B*P, 2, h, w)

        magnitude = flow.norm(dim=1).flatten(1)  # (B*P, h*w)
        top = magnitude.topk(max(1, int(0.05 * magnitude.shape[1])), dim=1).values.mean(1)
        threshold = 6.0 * min(flow.shape[-2:]) / 256.0  # VBench's dynamic-degree threshold
        dynamic = (top / threshold).clamp(0, 1)
        warp_error = (first - warp(second, flow)).abs().mean(dim=(1, 2, 3))
        score = dynamic * torch.exp(-warp_error / self.options.tau)
        per_video = lambda t: t.view(batch, pairs).mean(1)  # noqa: E731
        return MotionStats(per_video(score), per_video(dynamic), per_video(warp_error), per_video(top))

    @torch.no_grad()
    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # `forward` passes the `frame_positions` frames, in pair order.
        return self._measure_pairs(frames).score

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = self.options.max_size / max(height, width)
        if scale >= 1:
            return images
        size = (max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5)))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
