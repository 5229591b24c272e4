"""VBench's per-video formulas, as pure functions of frames or features (VBench commit 45e79ec, `vbench/*.py`).

Frames follow VBench's own layout: `(T, 3, H, W)` float tensors holding the 0..255 values of the decoded
uint8 video (what `vbench.utils.load_video` returns). Every score is "higher is better".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# dynamic_degree: VBench samples the video at about 8 frames per second before estimating flow.
DYNAMIC_SAMPLE_FPS = 8
DYNAMIC_TOP_FRACTION = 0.05  # the mean of the largest 5% flow magnitudes is a pair's motion


def temporal_flickering(frames: torch.Tensor) -> float:
    """`vbench/temporal_flickering.py`: one minus the mean absolute difference of consecutive frames, in 0..1:

        score = (255 - mean_t MAE(f_t, f_{t+1})) / 255,   MAE(a, b) = mean over pixels and channels of |a - b|

    (VBench reads BGR frames; the channel order does not change a mean over channels.)"""
    frames = frames.double()
    if frames.shape[0] < 2:
        raise ValueError(f"temporal_flickering needs at least 2 frames, got {frames.shape[0]}")
    mae = (frames[1:] - frames[:-1]).abs().flatten(1).mean(1)  # (T-1,)
    return float((255.0 - mae.mean()) / 255.0)


def consistency(features: torch.Tensor) -> float:
    """`vbench/subject_consistency.py` and `background_consistency.py`: how much each frame's feature agrees
    with the previous frame's and the first frame's, averaged over frames 1..T-1:

        score = 1/(T-1) * sum_{i>=1} ( max(0, cos(e_{i-1}, e_i)) + max(0, cos(e_0, e_i)) ) / 2

    with `e_i` the L2-normalised feature of frame i (`features` is `(T, D)`, normalised here)."""
    if features.shape[0] < 2:
        raise ValueError(f"a consistency score needs at least 2 frames, got {features.shape[0]}")
    return float(consistency_scores(features.double().unsqueeze(0))[0])


def consistency_scores(features: torch.Tensor) -> torch.Tensor:
    """`consistency` of a batch: features `(B, T, D)`, T >= 2 -> `(B,)` in their dtype, differentiable (the
    `consistency` reward scorer's formula)."""
    unit = F.normalize(features, dim=-1, p=2)
    previous = (unit[:, 1:] * unit[:, :-1]).sum(-1).clamp(min=0)  # cos(e_{i-1}, e_i), (B, T-1)
    first = (unit[:, 1:] * unit[:, :1]).sum(-1).clamp(min=0)  # cos(e_0, e_i)
    return ((previous + first) / 2).mean(-1)


def dynamic_sample_interval(fps: float) -> int:
    """`vbench/dynamic_degree.py`: every `max(1, round(fps / 8))`-th frame is kept (Python's round: halves to
    even)."""
    return max(1, round(fps / DYNAMIC_SAMPLE_FPS))


def top_flow_magnitude(flow: torch.Tensor) -> float:
    """`DynamicDegree.get_score`: the mean of the largest `int(0.05 * H * W)` flow magnitudes
    `sqrt(u^2 + v^2)` of one flow field `(2, H, W)` (VBench passes the flow of the padded frames)."""
    magnitude = flow.double().pow(2).sum(0).sqrt().flatten()
    count = int(magnitude.numel() * DYNAMIC_TOP_FRACTION)
    return float(magnitude.topk(count).values.mean())


def is_dynamic(pair_scores: list[float], height: int, width: int, sampled_frames: int) -> bool:
    """`DynamicDegree.check_move`: a video moves when at least `round(4 * N / 16)` of its consecutive pairs
    (N sampled frames) have a top-5% flow magnitude above `6 * min(H, W) / 256` pixels. As in VBench's loop, a
    video with no pair does not move, and one whose requirement rounds to 0 moves as soon as it has a pair."""
    if not pair_scores:
        return False
    threshold = 6.0 * (min(height, width) / 256.0)
    needed = round(4 * (sampled_frames / 16.0))
    return sum(score > threshold for score in pair_scores) >= needed
