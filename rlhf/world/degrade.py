"""Spoilt renders of the shapes world: what a bad generator does, for teaching a quality reward.

Each degradation takes clean `(T, H, W, 3)` uint8 frames and a severity in (0, 1] and returns frames of
the same shape: `blur` (Gaussian, sigma up to 3 px), `noise` (Gaussian pixel noise on the whole frame),
`fragment` (black cuts through the object and a stray blob of its colour), `bleed` (the colour leaks
into a halo and drifts in hue from frame to frame). The `aesthetic` reward is fitted to tell them from
clean renders; the oracle's cleanliness is written independently and never trained on.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("blur", "noise", "fragment", "bleed")


def _float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 3, 1, 2) / 255  # (T, 3, H, W)


def _uint8(video: torch.Tensor) -> np.ndarray:
    return (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _gaussian_blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None]).expand(3, 1, -1, -1)
    padded = F.pad(video, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=3)


def degrade(frames: np.ndarray, kind: str, severity: float, rng: random.Random) -> np.ndarray:
    """`frames` spoilt by `kind` at `severity` in (0, 1]."""
    video = _float(frames)  # (T, 3, H, W) in [0, 1]
    frames_count, _, height, width = video.shape
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "blur":
        video = _gaussian_blur(video, 0.8 + 2.2 * severity)
    elif kind == "noise":
        video = video + torch.randn(video.shape, generator=generator) * (0.04 + 0.2 * severity)
    elif kind == "fragment":
        value = video.amax(1, keepdim=True)  # (T, 1, H, W)
        colour = (video * value).sum((0, 2, 3)) / value.sum().clamp_min(1e-6)
        cuts = 1 + int(3 * severity)
        for _ in range(cuts):  # a black stripe through the object, fixed across frames
            horizontal = rng.random() < 0.5
            at, thick = rng.randrange(8, (height if horizontal else width) - 8), 1 + int(3 * severity)
            if horizontal:
                video[:, :, at:at + thick, :] = 0
            else:
                video[:, :, :, at:at + thick] = 0
        radius = 2 + 5 * severity  # a stray blob of the object's colour, drifting
        cx, cy = rng.uniform(6, width - 6), rng.uniform(6, height - 6)
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        for index in range(frames_count):
            blob = ((xs - cx - index) ** 2 + (ys - cy) ** 2 <= radius**2).float()
            video[index] = torch.maximum(video[index], blob * colour.view(3, 1, 1))
    elif kind == "bleed":
        halo = _gaussian_blur(video, 3.0) * (0.6 + 0.8 * severity)
        video = torch.maximum(video, halo)
        drift = 50.0 * severity
        for index in range(frames_count):  # hue drifts linearly across the clip
            shift = drift * (index / max(1, frames_count - 1) - 0.5)
            video[index] = _rotate_hue(video[index], shift)
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {KINDS}")
    return _uint8(video)


def _rotate_hue(frame: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the hue of a `(3, H, W)` frame in [0, 1] (a rotation about the grey axis in RGB)."""
    if degrees == 0:
        return frame
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    third, root = 1 / 3, np.sqrt(1 / 3)
    matrix = torch.tensor([
        [cos + (1 - cos) * third, third * (1 - cos) - root * sin, third * (1 - cos) + root * sin],
        [third * (1 - cos) + root * sin, cos + third * (1 - cos), third * (1 - cos) - root * sin],
        [third * (1 - cos) - root * sin, third * (1 - cos) + root * sin, cos + third * (1 - cos)],
    ], dtype=torch.float32)
    return torch.einsum("ij,jhw->ihw", matrix, frame).clamp(0, 1)
