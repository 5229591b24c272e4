"""The world's ground truth: read a clip's uint8 frames and say what it shows.

`read_clip(frames)` returns the colour, shape and direction of the (largest) object and a
cleanliness score in [0, 1]. It is hand-written from the world's definition (`rlhf.world.scene`),
never trained, and no reward sees it, so it can judge whether a reward's gains are real.

How each attribute is read (the thresholds leave room for the VAE's blur and colour shifts):

- foreground: value `V = max(R, G, B)` (the world's colours all have V = 1 at full coverage, so V is
  the coverage of a pixel); `V > 0.4` is object; V is then divided by the object's own peak (its 90th
  percentile) in each frame, so that a dimmed object keeps its coverage;
- colour: the saturation-weighted circular mean hue of the foreground, nearest of the six hues;
- shape: in the first, middle and last frame, the template (circle, square, apex-up triangle) of the
  object's own area and centroid that best matches its coverage (L2), each template blurred by the
  Gaussian (sigma 0-3 px) that fits it best, so blur alone does not turn a square into a circle; the
  frames vote;
- direction: the track of the V-weighted centroid; the larger axis of the last-minus-first
  displacement and its sign; under `MIN_TRAVEL` pixels of travel there is no direction;
- cleanliness: the mean over frames of `single * background * sharp`, times `steady`:
  `single` the share of foreground mass in the largest connected component, `background` one minus
  the mean value of pixels away from that component (scaled), `sharp` how narrow the band of partial
  coverage around the edge is relative to the edge's length, `steady` how constant hue and area stay.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rlhf.world.scene import COLOURS, DIRECTIONS

FOREGROUND = 0.4  # V above which a pixel is object, for colour and components
MIN_TRAVEL = 3.0  # pixels between the first and last centroid to call a direction


@dataclass(frozen=True)
class Reading:
    """What the oracle read off one clip."""

    colour: str | None
    shape: str | None
    direction: str | None
    cleanliness: float

    def as_dict(self) -> dict:
        return asdict(self)

    def matches(self, colour: str, shape: str, direction: str) -> dict[str, bool]:
        """Per-attribute correctness against the prompt's attributes, plus `colour_shape` and `all`."""
        hits = {"colour": self.colour == colour, "shape": self.shape == shape, "direction": self.direction == direction}
        hits["colour_shape"] = hits["colour"] and hits["shape"]
        hits["all"] = hits["colour_shape"] and hits["direction"]
        return hits


def read_clip(frames: np.ndarray) -> Reading:
    """Read `(T, H, W, 3)` uint8 frames."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255  # (T, H, W, 3)
    value = video.amax(-1)  # (T, H, W)
    if float(value.amax()) < FOREGROUND:
        return Reading(None, None, None, 0.0)
    main = _largest_component(value > FOREGROUND)  # (T, H, W) bool
    # Coverage: value over the object's own peak, so a dimmed object (a VAE's output) keeps its shape.
    peaks = torch.stack([frame[mask].quantile(0.9) if bool(mask.any()) else frame.amax()
                         for frame, mask in zip(value, main, strict=True)])
    value = (value / peaks.clamp_min(FOREGROUND).view(-1, 1, 1)).clamp(0, 1)
    cleanliness = _cleanliness(video, value, main)
    return Reading(_colour(video, value), _shape(value, main), _direction(value, main), cleanliness)


def _hue_saturation(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hue in degrees and saturation of `(..., 3)` RGB in [0, 1]."""
    r, g, b = video.unbind(-1)
    high, low = video.amax(-1), video.amin(-1)
    chroma = high - low
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    saturation = chroma / high.clamp_min(1e-6)
    return hue * 60.0, saturation


def _nearest_colour(hue_degrees: float) -> str:
    return min(COLOURS, key=lambda name: abs((hue_degrees - COLOURS[name] + 180) % 360 - 180))


def _circular_mean(degrees: torch.Tensor, weights: torch.Tensor) -> float:
    radians = torch.deg2rad(degrees)
    x, y = (weights * torch.cos(radians)).sum(), (weights * torch.sin(radians)).sum()
    return float(torch.rad2deg(torch.atan2(y, x))) % 360


def _colour(video: torch.Tensor, value: torch.Tensor) -> str | None:
    hue, saturation = _hue_saturation(video)
    weights = saturation * value * (value > FOREGROUND)
    if float(weights.sum()) <= 0:
        return None
    return _nearest_colour(_circular_mean(hue, weights))


def _shape(value: torch.Tensor, main: torch.Tensor) -> str | None:
    votes: dict[str, int] = {}
    frames = value.shape[0]
    for index in sorted({0, frames // 2, frames - 1}):
        coverage = value[index] * _dilate(main[index], 2)  # the main object only, not a stray blob
        shape = _best_template(coverage)
        if shape is not None:
            votes[shape] = votes.get(shape, 0) + 1
    return max(votes, key=votes.get) if votes else None


def _best_template(coverage: torch.Tensor) -> str | None:
    """The shape whose template, of the object's area and centroid and blurred as much as fits best, is
    closest (L2) to `coverage` (H, W)."""
    from rlhf.world.scene import shape_mask

    mass = float(coverage.sum())
    if mass < 4:
        return None
    height, width = coverage.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    cx, cy = float((coverage * xs).sum()) / mass + 0.5, float((coverage * ys).sum()) / mass + 0.5
    halves = {"circle": (mass / np.pi) ** 0.5, "square": mass**0.5 / 2, "triangle": (mass / 2) ** 0.5}
    errors = {}
    for shape, half in halves.items():
        centre_y = cy - half / 3 if shape == "triangle" else cy  # a triangle's centroid is 1/3 below its centre
        template = shape_mask(shape, (cx, centre_y), half, size=height)[None, None]
        errors[shape] = min(float((_blur(template, sigma)[0, 0] - coverage).pow(2).sum()) for sigma in _SIGMAS)
    return min(errors, key=errors.get)


_SIGMAS = (0.0, 1.0, 2.0, 3.0)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return image
    radius = int(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    padded = F.pad(image, (radius, radius, radius, radius))
    return F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))


def _direction(value: torch.Tensor, main: torch.Tensor) -> str | None:
    height, width = value.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    mass = value * _dilate(main, 2)  # (T, H, W)
    total = mass.sum((1, 2))
    if bool((total <= 0).any()):
        return None
    cx, cy = (mass * xs).sum((1, 2)) / total, (mass * ys).sum((1, 2)) / total
    dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
    if max(abs(dx), abs(dy)) < MIN_TRAVEL:
        return None
    step = (int(np.sign(dx)), 0) if abs(dx) >= abs(dy) else (0, int(np.sign(dy)))
    return next(name for name, unit in DIRECTIONS.items() if unit == step)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate a `(..., H, W)` bool mask by a square of `radius`."""
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:]).float()
    grown = F.max_pool2d(flat, 2 * radius + 1, stride=1, padding=radius)
    return grown.reshape(shape) > 0


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Per frame of a `(T, H, W)` bool mask, the largest 8-connected component (bool, same shape)."""
    frames, height, width = mask.shape
    labels = torch.arange(1, height * width + 1, dtype=torch.float32).reshape(1, height, width).expand(frames, -1, -1)
    labels = (labels * mask).unsqueeze(1)  # (T, 1, H, W): every pixel its own label, background 0
    keep = mask.unsqueeze(1).float()
    while True:  # propagate the largest label through each component
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * keep
        if torch.equal(grown, labels):
            break
        labels = grown
    labels = labels.squeeze(1).long()
    out = torch.zeros_like(mask)
    for index in range(frames):
        ids, counts = labels[index][mask[index]].unique(return_counts=True)
        if len(ids):
            out[index] = labels[index] == ids[counts.argmax()]
    return out


def _cleanliness(video: torch.Tensor, value: torch.Tensor, main: torch.Tensor) -> float:
    per_frame = []
    hues, areas = [], []
    hue, saturation = _hue_saturation(video)
    for index in range(value.shape[0]):
        coverage, component = value[index], main[index]
        if not bool(component.any()):
            per_frame.append(0.0)
            continue
        near = _dilate(component, 2)
        total_mass = float(coverage.sum())
        # single: the object holds the frame's light.
        single = float((coverage * near).sum()) / max(total_mass, 1e-6)
        # background: pixels well away from the object stay black (mean value over 5% costs everything).
        far = ~_dilate(component, 4)
        background = max(0.0, 1.0 - float(coverage[far].mean()) / 0.05) if bool(far.any()) else 1.0
        # sharp: partial-coverage pixels per edge pixel: a 4x-supersampled render has about 0.7, the world VAE's
        # reconstruction of one about 3 (scored 0.67), a 2-px Gaussian blur about 5 (0.22); 6 and more score 0.
        solid = coverage > 0.5
        edge = solid & ~(~_dilate(~solid, 1))  # solid pixels with a non-solid neighbour
        band = ((coverage > 0.1) & (coverage < 0.9) & near).sum()
        ratio = float(band) / max(float(edge.sum()), 1.0)
        sharp = min(1.0, max(0.0, (6.0 - ratio) / 4.5))
        per_frame.append(single * background * sharp)
        weights = saturation[index] * coverage * component
        hues.append(_circular_mean(hue[index], weights) if float(weights.sum()) > 0 else float("nan"))
        areas.append(float((coverage * near).sum()))
    steady = 1.0
    valid_hues = [h for h in hues if not np.isnan(h)]
    if len(valid_hues) >= 2:
        spread = max(abs((h - valid_hues[0] + 180) % 360 - 180) for h in valid_hues)
        steady *= min(1.0, max(0.0, 1.0 - (spread - 10.0) / 30.0))  # 10 degrees free, 40 costs everything
    if len(areas) >= 2 and max(areas) > 0:
        variation = (max(areas) - min(areas)) / max(areas)
        steady *= min(1.0, max(0.0, 1.0 - (variation - 0.15) / 0.5))
    return float(np.mean(per_frame)) * steady
