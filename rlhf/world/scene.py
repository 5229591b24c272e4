"""The shapes world (v2): procedural text-to-video clips whose ground truth anyone can check.

One filled disc on a black background per clip, moving at a steady speed in one direction. A prompt
names three attributes:

- **colour** (taught): six hues at full saturation and value (red 0°, yellow 60°, green 120°, cyan 180°,
  blue 240°, magenta 300°);
- **size** (taught): small, medium or large (radius ranges in `SIZES`, far enough apart that the world
  VAE's blur cannot move one into another);
- **direction** (the untaught control: one frame cannot show it, so no reward sees it): left, right, up or
  down; the disc stays inside the frame for the whole clip.

Clips are `FRAMES` x `SIZE` x `SIZE` (9 x 64 x 64: 4k + 1 frames for the Wan VAE). Edges are
anti-aliased by 4x4 supersampling.

The 18 colour-size combinations are split three ways (`SPLITS`), every split with all four directions:
**train** (reward training, rollouts, pairs, online sampling), **validation** (every checkpoint or config
choice) and **test** (reported, never used for a choice). The generator is pretrained on every
combination, as a real base model has seen every attribute value; what it was not given is reliable
words (`CONFUSION`, see `rlhf.world.pretrain`).
"""

from __future__ import annotations

import colorsys
import functools
import random
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F

FRAMES = 9
SIZE = 64
SUPERSAMPLE = 4

COLOURS: dict[str, float] = {  # name -> hue in degrees
    "red": 0.0, "yellow": 60.0, "green": 120.0, "cyan": 180.0, "blue": 240.0, "magenta": 300.0,
}
SIZES: dict[str, tuple[float, float]] = {  # name -> radius range in pixels
    "small": (6.0, 7.0), "medium": (9.0, 10.0), "large": (12.5, 13.5),
}
DIRECTIONS: dict[str, tuple[int, int]] = {  # name -> unit (dx, dy) in image coordinates (y grows down)
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
}
TAUGHT = ("colour", "size")  # the attributes the rewards can see and the pretraining captions confuse
ATTRIBUTES = (*TAUGHT, "direction")

Combo = tuple[str, str]  # (colour, size)
COMBOS: tuple[Combo, ...] = tuple(product(COLOURS, SIZES))
# Every colour and every size is in the training split; validation and test combinations are new pairings.
# Validation asks for the same colour and size words as test, as often, in pairings of its own: a trainer's gain
# here depends on which words a split asks for (a fix to one word can break the word whose partner it draws,
# README "why" point 8), so a choice made on a split asking for other words does not predict test (world v2's
# first validation split, yellow medium / blue small / red small / cyan large, twice picked a setting whose
# benefit did not reach test).
SPLITS: dict[str, tuple[Combo, ...]] = {
    "validation": (("red", "small"), ("green", "large"), ("cyan", "large"), ("magenta", "medium")),
    "test": (("red", "large"), ("green", "small"), ("cyan", "medium"), ("magenta", "large")),
}
SPLITS = {"train": tuple(c for c in COMBOS if not any(c in combos for combos in SPLITS.values())), **SPLITS}

# The systematic confusion of the pretraining captions: with probability `CONFUSION_RATE` a clip whose true
# value is `v` is captioned with the word that maps to `v` here, so each taught word draws its own value or
# this one specific neighbour (as real models confuse near colours or sizes). At rate 1/2 the word says
# nothing about which of the two it is, so classifier-free guidance, which sharpens what the word does say,
# cannot pull the base back to the right value (see `rlhf.world.pretrain.caption_words`).
CONFUSION: dict[str, dict[str, str]] = {  # attribute -> word -> the wrong value it also draws
    "colour": {"red": "yellow", "yellow": "green", "green": "cyan", "cyan": "blue", "blue": "magenta",
               "magenta": "red"},
    "size": {"small": "medium", "medium": "large", "large": "small"},
}
CONFUSION_RATE = 0.5

SPEED_RANGE = (1.5, 2.5)  # pixels per frame

PHRASINGS = (
    "a {size} {colour} circle moving {direction}",
    "a {size} circle in {colour} going {direction}",
    "{adverb} motion of a {size} {colour} circle",
)
ADVERBS = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}

# Seeds per use, disjoint by construction: the i-th seed of the n-th namespace is n * SEED_BLOCK + i, i < SEED_BLOCK.
SEED_BLOCK = 10_000_000
SEED_NAMESPACES = ("pretraining", "rollout", "training", "validation", "test", "best_of_k")


def seed(namespace: str, index: int) -> int:
    """The `index`-th seed of `namespace` (one of `SEED_NAMESPACES`); no two uses ever share a seed."""
    if namespace not in SEED_NAMESPACES:
        raise ValueError(f"unknown seed namespace {namespace!r}; expected one of {SEED_NAMESPACES}")
    if not 0 <= index < SEED_BLOCK:
        raise ValueError(f"seed index {index} outside [0, {SEED_BLOCK})")
    return SEED_NAMESPACES.index(namespace) * SEED_BLOCK + index


def rgb(colour: str) -> tuple[float, float, float]:
    """The colour's RGB in [0, 1] (full saturation and value)."""
    return colorsys.hsv_to_rgb(COLOURS[colour] / 360.0, 1.0, 1.0)


def prompt(colour: str, size: str, direction: str, phrasing: int = 0) -> str:
    return PHRASINGS[phrasing].format(colour=colour, size=size, direction=direction, adverb=ADVERBS[direction])


def vocabulary() -> list[str]:
    """Every word a world prompt can contain (the world's tokenizers give each one token)."""
    words = set()
    for colour, size, direction in product(COLOURS, SIZES, DIRECTIONS):
        for phrasing in range(len(PHRASINGS)):
            words.update(prompt(colour, size, direction, phrasing).split())
    return sorted(words)


def prompts_for(combos: tuple[Combo, ...], phrasings: tuple[int, ...] = (0,)) -> list[str]:
    """Every prompt of `combos` x all directions x `phrasings`, in a fixed order."""
    return [prompt(c, s, d, p) for (c, s), d, p in product(combos, DIRECTIONS, phrasings)]


def parse_prompt(text: str) -> tuple[str, str, str] | None:
    """(colour, size, direction) named by a world prompt, or None if it is not one."""
    words = text.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    size = next((w for w in words if w in SIZES), None)
    direction = next((d for w in words for d, adverb in ADVERBS.items() if w in (d, adverb)), None)
    if colour is None or size is None or direction is None:
        return None
    return colour, size, direction


def split_of(colour: str, size: str) -> str:
    return next(name for name, combos in SPLITS.items() if (colour, size) in combos)


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines a clip."""

    colour: str
    size: str
    direction: str
    radius: float
    speed: float
    start: tuple[float, float]  # centre (x, y) at frame 0, pixels

    @classmethod
    def sample(cls, colour: str, size: str, direction: str, rng: random.Random) -> SceneSpec:
        radius = rng.uniform(*SIZES[size])
        speed = rng.uniform(*SPEED_RANGE)
        dx, dy = DIRECTIONS[direction]
        travel = speed * (FRAMES - 1)
        margin = radius + 1.0

        def axis_range(step: int) -> tuple[float, float]:
            low, high = margin, SIZE - margin
            if step > 0:
                high -= travel
            elif step < 0:
                low += travel
            return low, high

        start = tuple(rng.uniform(*axis_range(step)) for step in (dx, dy))
        return cls(colour, size, direction, radius, speed, start)  # type: ignore[arg-type]

    def centres(self) -> np.ndarray:
        """(FRAMES, 2) centre per frame."""
        dx, dy = DIRECTIONS[self.direction]
        steps = np.arange(FRAMES, dtype=np.float64) * self.speed
        return np.stack([self.start[0] + dx * steps, self.start[1] + dy * steps], axis=1)


@functools.cache
def _fine_grid(size: int, supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size * supersample, dtype=torch.float64) + 0.5) / supersample  # pixel units
    return torch.meshgrid(coords, coords, indexing="ij")


def disc_mask(centre: tuple[float, float], radius: float, size: int = SIZE,
              supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a disc on a `size` x `size` grid, shape (size, size)."""
    y, x = _fine_grid(size, supersample)
    cx, cy = centre
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    return F.avg_pool2d(inside.double()[None, None], supersample)[0, 0].float()


def render(spec: SceneSpec, frames: tuple[int, ...] | None = None) -> np.ndarray:
    """The clip as `(FRAMES, SIZE, SIZE, 3)` uint8 (only the frames listed in `frames`, if given)."""
    colour = torch.tensor(rgb(spec.colour), dtype=torch.float32)
    centres = spec.centres()
    rendered = []
    for index in range(FRAMES) if frames is None else frames:
        coverage = disc_mask((float(centres[index][0]), float(centres[index][1])), spec.radius)
        rendered.append(coverage[..., None] * colour)
    video = torch.stack(rendered)  # (T, H, W, 3) in [0, 1]
    return (video * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 -> `(3, T, H, W)` float32 in [-1, 1], the VAE's input."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1
    return video.permute(3, 0, 1, 2).contiguous()


def sample_clip(rng: random.Random, combos: tuple[Combo, ...] = SPLITS["train"],
                frames: tuple[int, ...] | None = None) -> tuple[SceneSpec, np.ndarray, str]:
    """A random clip of `combos`: (spec, frames (all, or those listed), its true prompt in a random phrasing)."""
    colour, size = rng.choice(combos)
    direction = rng.choice(list(DIRECTIONS))
    spec = SceneSpec.sample(colour, size, direction, rng)
    return spec, render(spec, frames), prompt(colour, size, direction, rng.randrange(len(PHRASINGS)))
