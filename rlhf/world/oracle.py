"""The world's ground truth: read a clip's uint8 frames and say what it shows.

`read_clip(frames)` returns the colour, size and direction of the (largest) object and a cleanliness
score in [0, 1]. It is hand-written from the world's definition (`rlhf.world.scene`), never trained, and
no reward sees it, so it can judge whether a reward's gains are real. An attribute it cannot read with
confidence is `None` ("unreadable"), which counts as wrong: an ambiguous clip is never given the benefit of
a default.

How each attribute is read (the thresholds leave room for the VAE's blur and colour shifts):

- foreground: value `V = max(R, G, B)` (the world's colours all have V = 1 at full coverage, so V is
  the coverage of a pixel); `V > 0.4` is object; V is then divided by the object's own peak (its 90th
  percentile) in each frame, so that a dimmed object keeps its coverage;
- colour: per frame, the saturation-weighted circular mean hue of the foreground; unreadable when the
  clip's mean hue lies more than `HUE_TOLERANCE` from every named hue (a blend such as orange between red
  and yellow) or the frames' hues spread over more than `HUE_SPREAD` (a disc that changes colour);
- size: per frame, the radius of the disc of the object's area (`sqrt(area / pi)`), the median over the
  frames; read only when it falls inside one size's band (`SIZE_BANDS`, gaps between them are
  unreadable) and the object is a disc: in the first, middle and last frame a disc of that radius,
  blurred by the Gaussian (sigma 0-3 px) that fits best, must match the coverage to `DISC_FIT` (relative
  L2), and it must hold `SINGLE` of the frame's light (the mean over frames), so an ellipse, a smear or two
  discs are not given a size. (A Gaussian blob is a disc under blur: it reads as the size whose disc, blurred
  by up to 3 px, it matches, as a blurred render must);
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

from rlhf.world.scene import COLOURS, DIRECTIONS, TAUGHT, disc_mask

FOREGROUND = 0.4  # V above which a pixel is object, for colour and components
MIN_TRAVEL = 3.0  # pixels between the first and last centroid to call a direction
HUE_TOLERANCE = 20.0  # degrees from the nearest named hue (they are 60 apart) for a colour to be read
HUE_SPREAD = 30.0  # degrees of hue change across the frames beyond which a clip has no one colour
# Radius bands (pixels) of each size as read through blur: renders are 6-7, 9-10 and 12.5-13.5; the world
# VAE and a 3 px blur widen a disc's measured radius by up to ~1.2 px. Radii in the gaps are unreadable.
SIZE_BANDS: dict[str, tuple[float, float]] = {"small": (4.5, 8.2), "medium": (8.6, 11.6), "large": (12.0, 16.0)}
DISC_FIT = 0.12  # largest relative L2 error of the best blurred disc for the object to count as a disc
SINGLE = 0.8  # share of the frame's light the object must hold for its size to be read (one object, not two)


@dataclass(frozen=True)
class Reading:
    """What the oracle read off one clip (`None`: unreadable)."""

    colour: str | None
    size: str | None
    direction: str | None
    cleanliness: float

    def as_dict(self) -> dict:
        return asdict(self)

    def matches(self, colour: str, size: str, direction: str) -> dict[str, bool]:
        """Per-attribute correctness against the prompt's attributes, plus `taught` (colour and size) and `all`."""
        hits = {"colour": self.colour == colour, "size": self.size == size, "direction": self.direction == direction}
        hits["taught"] = all(hits[name] for name in TAUGHT)
        hits["all"] = hits["taught"] and hits["direction"]
        return hits


CLEANLINESS_PARTS = ("single", "background", "sharp", "hue_steady", "area_steady")


def read_clip(frames: np.ndarray) -> Reading:
    """Read `(T, H, W, 3)` uint8 frames."""
    prepared = _prepare(frames)
    if prepared is None:
        return Reading(None, None, None, 0.0)
    video, value, main = prepared
    cleanliness = _cleanliness(video, value, main)["cleanliness"]
    return Reading(_colour(video, value), _size(value, main), _direction(value, main), cleanliness)


def cleanliness_parts(frames: np.ndarray) -> dict[str, float]:
    """The factors of `read_clip(frames).cleanliness` (module docstring), each in [0, 1]: `single`, `background`
    and `sharp` as means over the frames, `hue_steady` and `area_steady` (the two halves of `steady`), and
    `cleanliness` itself (the mean over frames of single x background x sharp, times both steadies). All 0 for a
    clip with no object."""
    prepared = _prepare(frames)
    if prepared is None:
        return dict.fromkeys((*CLEANLINESS_PARTS, "cleanliness"), 0.0)
    return _cleanliness(*prepared)


def _prepare(frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`(video (T, H, W, 3) in [0, 1], coverage (T, H, W), largest component (T, H, W) bool)`, or None when no
    pixel is bright enough to be an object."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255  # (T, H, W, 3)
    value = video.amax(-1)  # (T, H, W)
    if float(value.amax()) < FOREGROUND:
        return None
    main = _largest_component(value > FOREGROUND)  # (T, H, W) bool
    # Coverage: value over the object's own peak, so a dimmed object (a VAE's output) keeps its area.
    peaks = torch.stack([frame[mask].quantile(0.9) if bool(mask.any()) else frame.amax()
                         for frame, mask in zip(value, main, strict=True)])
    return video, (value / peaks.clamp_min(FOREGROUND).view(-1, 1, 1)).clamp(0, 1), main


def _hue_saturation(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hue in degrees and saturation of `(..., 3)` RGB in [0, 1]."""
    r, g, b = video.unbind(-1)
    high, low = video.amax(-1), video.amin(-1)
    chroma = high - low
    safe = chroma.clamp_min(1e-6)
    hue = torch.where(high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    saturation = chroma / high.clamp_min(1e-6)
    return hue * 60.0, saturation


def _hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def _circular_mean(degrees: torch.Tensor, weights: torch.Tensor) -> float:
    radians = torch.deg2rad(degrees)
    x, y = (weights * torch.cos(radians)).sum(), (weights * torch.sin(radians)).sum()
    return float(torch.rad2deg(torch.atan2(y, x))) % 360


def _colour(video: torch.Tensor, value: torch.Tensor) -> str | None:
    hue, saturation = _hue_saturation(video)
    weights = saturation * value * (value > FOREGROUND)  # (T, H, W)
    if float(weights.sum()) <= 0:
        return None
    mean = _circular_mean(hue, weights)
    per_frame = [_circular_mean(h, w) for h, w in zip(hue, weights, strict=True) if float(w.sum()) > 0]
    if max(_hue_distance(h, mean) for h in per_frame) > HUE_SPREAD:
        return None
    nearest = min(COLOURS, key=lambda name: _hue_distance(mean, COLOURS[name]))
    return nearest if _hue_distance(mean, COLOURS[nearest]) <= HUE_TOLERANCE else None


def _size(value: torch.Tensor, main: torch.Tensor) -> str | None:
    coverage = value * _dilate(main, 2)  # the main object only, not a stray blob
    if float((coverage.sum((1, 2)) / value.sum((1, 2)).clamp_min(1e-6)).mean()) < SINGLE:
        return None
    radii = (coverage.sum((1, 2)) / np.pi).sqrt()
    radius = float(radii.median())
    band = next((name for name, (low, high) in SIZE_BANDS.items() if low <= radius <= high), None)
    if band is None:
        return None
    frames = coverage.shape[0]
    if any(_disc_error(coverage[index]) > DISC_FIT for index in sorted({0, frames // 2, frames - 1})):
        return None
    return band


def _disc_error(coverage: torch.Tensor) -> float:
    """Relative L2 error between `coverage` (H, W) and the disc of its area and centroid, blurred by the sigma
    (0-3 px) that fits best."""
    mass = float(coverage.sum())
    if mass < 4:
        return float("inf")
    height, width = coverage.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    cx, cy = float((coverage * xs).sum()) / mass + 0.5, float((coverage * ys).sum()) / mass + 0.5
    template = disc_mask((cx, cy), (mass / np.pi) ** 0.5, size=height)[None, None]
    energy = float(coverage.pow(2).sum())
    return min(float((_blur(template, sigma)[0, 0] - coverage).pow(2).sum()) / energy for sigma in _SIGMAS)


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


def _cleanliness(video: torch.Tensor, value: torch.Tensor, main: torch.Tensor) -> dict[str, float]:
    factors: dict[str, list[float]] = {"single": [], "background": [], "sharp": []}
    hues, areas = [], []
    hue, saturation = _hue_saturation(video)
    for index in range(value.shape[0]):
        coverage, component = value[index], main[index]
        if not bool(component.any()):
            for name in factors:
                factors[name].append(0.0)
            continue
        near = _dilate(component, 2)
        total_mass = float(coverage.sum())
        # single: the object holds the frame's light.
        factors["single"].append(float((coverage * near).sum()) / max(total_mass, 1e-6))
        # background: pixels well away from the object stay black (mean value over 5% costs everything).
        far = ~_dilate(component, 4)
        factors["background"].append(max(0.0, 1.0 - float(coverage[far].mean()) / 0.05) if bool(far.any()) else 1.0)
        # sharp: partial-coverage pixels per edge pixel: a 4x-supersampled render has about 0.7, the world VAE's
        # reconstruction of one about 3 (scored 0.67), a 2-px Gaussian blur about 5 (0.22); 6 and more score 0.
        solid = coverage > 0.5
        edge = solid & ~(~_dilate(~solid, 1))  # solid pixels with a non-solid neighbour
        band = ((coverage > 0.1) & (coverage < 0.9) & near).sum()
        ratio = float(band) / max(float(edge.sum()), 1.0)
        factors["sharp"].append(min(1.0, max(0.0, (6.0 - ratio) / 4.5)))
        weights = saturation[index] * coverage * component
        hues.append(_circular_mean(hue[index], weights) if float(weights.sum()) > 0 else float("nan"))
        areas.append(float((coverage * near).sum()))
    hue_steady = area_steady = 1.0
    valid_hues = [h for h in hues if not np.isnan(h)]
    if len(valid_hues) >= 2:
        spread = max(abs((h - valid_hues[0] + 180) % 360 - 180) for h in valid_hues)
        hue_steady = min(1.0, max(0.0, 1.0 - (spread - 10.0) / 30.0))  # 10 degrees free, 40 costs everything
    if len(areas) >= 2 and max(areas) > 0:
        variation = (max(areas) - min(areas)) / max(areas)
        area_steady = min(1.0, max(0.0, 1.0 - (variation - 0.15) / 0.5))
    per_frame = [a * b * c for a, b, c in zip(*factors.values(), strict=True)]
    return {**{name: float(np.mean(values)) for name, values in factors.items()}, "hue_steady": hue_steady,
            "area_steady": area_steady, "cleanliness": float(np.mean(per_frame)) * (hue_steady * area_steady)}
