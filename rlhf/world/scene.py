"""The shapes world: procedural text-to-video clips whose ground truth anyone can check.

One filled shape on a black background per clip, moving at a steady speed in one direction:

- colours: six hues at full saturation and value (red 0°, yellow 60°, green 120°, cyan 180°,
  blue 240°, magenta 300°);
- shapes: circle, square (axis-aligned), triangle (isosceles, apex up);
- directions: left, right, up, down; the shape stays inside the frame for the whole clip;
- per clip, drawn from `SceneSpec.sample`: size, start position and speed.

Clips are `FRAMES` x `SIZE` x `SIZE` (9 x 64 x 64: 4k + 1 frames for the Wan VAE, big enough that a
shape spans several latent pixels of an 8x VAE). Edges are anti-aliased by 4x4 supersampling.

`HELD_OUT` colour-shape combinations (with all four directions) are never used to pretrain the
generator, train the rewards, roll out or train preferences: they measure whether alignment
generalises. Prompts come in three phrasings (`PHRASINGS`).
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
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # name -> unit (dx, dy) in image coordinates (y grows down)
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
}
# Never seen by pretraining, reward training, rollouts or preference training.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "circle"), ("cyan", "square"), ("magenta", "triangle"),
)
TRAINING: tuple[tuple[str, str], ...] = tuple(
    combo for combo in product(COLOURS, SHAPES) if combo not in HELD_OUT
)

# Half-size (radius / half-side / half-base) in pixels, and speed in pixels per frame.
HALF_SIZE_RANGE = (9.0, 14.0)
SPEED_RANGE = (2.0, 3.0)

PHRASINGS = (
    "a {colour} {shape} moving {direction}",
    "a {shape} in {colour} going {direction}",
    "{adverb} motion of a {colour} {shape}",
)
ADVERBS = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}


def rgb(colour: str) -> tuple[float, float, float]:
    """The colour's RGB in [0, 1] (full saturation and value)."""
    return colorsys.hsv_to_rgb(COLOURS[colour] / 360.0, 1.0, 1.0)


def prompt(colour: str, shape: str, direction: str, phrasing: int = 0) -> str:
    return PHRASINGS[phrasing].format(colour=colour, shape=shape, direction=direction,
                                      adverb=ADVERBS[direction])


def vocabulary() -> list[str]:
    """Every word a world prompt can contain (the world's tokenizers give each one token)."""
    words = set()
    for colour, shape, direction in product(COLOURS, SHAPES, DIRECTIONS):
        for phrasing in range(len(PHRASINGS)):
            words.update(prompt(colour, shape, direction, phrasing).split())
    return sorted(words)


def prompts_for(combos: tuple[tuple[str, str], ...], phrasings: tuple[int, ...] = (0,)) -> list[str]:
    """Every prompt of `combos` x all directions x `phrasings`, in a fixed order."""
    return [prompt(c, s, d, p) for (c, s), d, p in product(combos, DIRECTIONS, phrasings)]


def parse_prompt(text: str) -> tuple[str, str, str] | None:
    """(colour, shape, direction) named by a world prompt, or None if it is not one."""
    words = text.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    direction = next((d for w in words for d, adverb in ADVERBS.items() if w in (d, adverb)), None)
    if colour is None or shape is None or direction is None:
        return None
    return colour, shape, direction


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines a clip."""

    colour: str
    shape: str
    direction: str
    half_size: float
    speed: float
    start: tuple[float, float]  # centre (x, y) at frame 0, pixels

    @classmethod
    def sample(cls, colour: str, shape: str, direction: str, rng: random.Random) -> SceneSpec:
        half = rng.uniform(*HALF_SIZE_RANGE)
        speed = rng.uniform(*SPEED_RANGE)
        dx, dy = DIRECTIONS[direction]
        travel = speed * (FRAMES - 1)
        margin = half + 1.0

        def axis_range(step: int) -> tuple[float, float]:
            low, high = margin, SIZE - margin
            if step > 0:
                high -= travel
            elif step < 0:
                low += travel
            return low, high

        start = tuple(rng.uniform(*axis_range(step)) for step in (dx, dy))
        return cls(colour, shape, direction, half, speed, start)  # type: ignore[arg-type]

    def centres(self) -> np.ndarray:
        """(FRAMES, 2) centre per frame."""
        dx, dy = DIRECTIONS[self.direction]
        steps = np.arange(FRAMES, dtype=np.float64) * self.speed
        return np.stack([self.start[0] + dx * steps, self.start[1] + dy * steps], axis=1)


@functools.cache
def _fine_grid(size: int, supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size * supersample, dtype=torch.float64) + 0.5) / supersample  # pixel units
    return torch.meshgrid(coords, coords, indexing="ij")


def shape_mask(shape: str, centre: tuple[float, float], half: float, size: int = SIZE,
               supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of `shape` on a `size` x `size` grid, shape (size, size)."""
    y, x = _fine_grid(size, supersample)
    cx, cy = centre
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = ((x - cx).abs() <= half) & ((y - cy).abs() <= half)
    elif shape == "triangle":  # apex up at (cx, cy - half), base at y = cy + half, base width 2*half
        rel_y = (y - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
        inside = (rel_y >= 0) & (rel_y <= 1) & ((x - cx).abs() <= half * rel_y)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    coverage = F.avg_pool2d(inside.double()[None, None], supersample)[0, 0]
    return coverage.float()


def render(spec: SceneSpec, frames: tuple[int, ...] | None = None) -> np.ndarray:
    """The clip as `(FRAMES, SIZE, SIZE, 3)` uint8 (only the frames listed in `frames`, if given)."""
    colour = torch.tensor(rgb(spec.colour), dtype=torch.float32)
    centres = spec.centres()
    rendered = []
    for index in range(FRAMES) if frames is None else frames:
        coverage = shape_mask(spec.shape, (float(centres[index][0]), float(centres[index][1])), spec.half_size)
        rendered.append(coverage[..., None] * colour)
    video = torch.stack(rendered)  # (T, H, W, 3) in [0, 1]
    return (video * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 -> `(3, T, H, W)` float32 in [-1, 1], the VAE's input."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1
    return video.permute(3, 0, 1, 2).contiguous()


def sample_clip(rng: random.Random, combos: tuple[tuple[str, str], ...] = TRAINING,
                frames: tuple[int, ...] | None = None) -> tuple[SceneSpec, np.ndarray, str]:
    """A random clip of `combos`: (spec, frames (all, or those listed), prompt in a random phrasing)."""
    colour, shape = rng.choice(combos)
    direction = rng.choice(list(DIRECTIONS))
    spec = SceneSpec.sample(colour, shape, direction, rng)
    return spec, render(spec, frames), prompt(colour, shape, direction, rng.randrange(len(PHRASINGS)))
