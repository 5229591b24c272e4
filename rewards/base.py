"""The scorer interface every reward implements, and the helpers scorers share.

A scorer is a frozen `torch.nn.Module` called as `scorer(frames, prompts) -> scores`:

- `frames`: `(B, T, 3, H, W)` float in [0, 1], on the scorer's device (`scorer.to(device)` first);
- `prompts`: a list of B strings (scorers that ignore text still take them);
- `scores`: `(B,)` float32 on the same device, higher is better.

Which frames a score reads: `frame_positions(num_frames)` names the positions of a `num_frames`-frame
video that `score` reads, in the order it reads them (CLIP: the segment middles; `motion`: its frame
pairs), or None for a per-frame statistic averaged over whatever frames it is given. `forward(frames,
prompts, positions=None, num_frames=None)` hands `score` exactly those frames: out of the whole video by
default, or out of a saved subset (a rollout store's `frame_indices`) when `positions` says which video
frames `frames` holds. So a score computed from a store's subset equals the score of the full video
whenever the subset holds the positions the scorer reads (`covers`), and a subset that does not is an error.

Class attributes: `name` (the registry name; `build_scorers` sets an instance's `name` to its config
entry), `differentiable` (True when `scores` carries gradients back to `frames`; the reward-gradient
trainer only backpropagates through those), and `Options` (the dataclass of its config options,
fields declared with `rlhf.config.option`). Constructor: `Scorer(options, cache=None)`, where `cache`
is a `ModelCache` that scorers built together use to share one copy of a big model (the CLIP tower
of `clip` and `aesthetic`). Subclasses implement `score(frames, prompts)`; `forward` checks the
inputs first. Scorers stay in eval mode (`train()` is a no-op) so dropout never perturbs a reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rlhf.errors import UserError


@dataclasses.dataclass
class NoOptions:
    """A scorer without options."""


class ModelCache:
    """Models shared by the scorers of one `build_scorers` call, keyed by what identifies the weights."""

    def __init__(self) -> None:
        self._models: dict[tuple, nn.Module] = {}

    def get(self, key: tuple, load: Callable[[], nn.Module]) -> nn.Module:
        """The model stored under `key`, loading it with `load()` the first time."""
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


class Scorer(nn.Module):
    """Base class of reward scorers: `scorer(frames (B, T, 3, H, W) in [0, 1], prompts) -> (B,) float32`."""

    name: ClassVar[str] = "scorer"
    differentiable: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, cache: ModelCache | None = None):
        super().__init__()
        self.options = self.Options() if options is None else options

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores `(B,)` for checked inputs (the `frame_positions` frames); implemented by each scorer."""
        raise NotImplementedError

    def frame_positions(self, num_frames: int) -> list[int] | None:
        """Positions of a `num_frames`-frame video that `score` reads, in order; None: a per-frame average of
        whatever frames it is given (then an evenly spaced subset only estimates the full video's score)."""
        return None

    def covers(self, positions: Sequence[int], num_frames: int) -> bool:
        """Whether frames at `positions` of a `num_frames`-frame video hold every frame `score` reads."""
        needed = self.frame_positions(num_frames)
        return needed is None or set(needed) <= set(positions)

    def select_frames(self, frames: torch.Tensor, positions: Sequence[int] | None = None,
                      num_frames: int | None = None) -> torch.Tensor:
        """The frames `score` reads, out of `frames` `(B, F, ...)`: the whole video (`positions` None) or the
        video frames at `positions` (F of them, increasing or not) of a `num_frames`-frame video."""
        if positions is None:
            positions, num_frames = range(frames.shape[1]), frames.shape[1]
        elif num_frames is None or len(positions) != frames.shape[1]:
            raise ValueError(f"positions needs num_frames and one position per frame ({frames.shape[1]}), got "
                             f"{len(positions)} position(s) and num_frames {num_frames}")
        needed = self.frame_positions(num_frames)
        if needed is None:
            return frames
        where = {int(p): i for i, p in enumerate(positions)}
        missing = sorted(set(needed) - where.keys())
        if missing:
            raise ValueError(f"scorer {self.name!r} reads frames {needed} of a {num_frames}-frame video; the "
                             f"frames given are at {list(positions)} (missing {missing})")
        return frames[:, [where[p] for p in needed]]

    def forward(self, frames: torch.Tensor, prompts: Sequence[str], positions: Sequence[int] | None = None,
                num_frames: int | None = None) -> torch.Tensor:
        check_inputs(frames, prompts)
        device = self.device
        if device is not None and device != frames.device:
            raise ValueError(f"scorer {self.name!r} is on {device} but the frames are on {frames.device}; "
                             "move one of them (scorer.to(device))")
        frames = self.select_frames(frames, positions, num_frames)
        scores = self.score(frames, list(prompts))
        if scores.shape != (frames.shape[0],):
            raise RuntimeError(f"scorer {self.name!r} returned shape {tuple(scores.shape)}, expected ({frames.shape[0]},)")
        return scores.float()

    def info(self) -> dict[str, Any]:
        """What produced the scores (model files, variants), for logs and score stores."""
        return {"scorer": type(self).name, **dataclasses.asdict(self.options)}

    @property
    def device(self) -> torch.device | None:
        """Device of the scorer's weights; None for weight-free scorers (they run wherever the frames are)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return None

    def train(self, mode: bool = True) -> Scorer:
        # A reward must not change with the caller's train/eval state (dropout in the aesthetic head).
        return super().train(False)


def check_inputs(frames: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise ValueError unless `frames` is `(B, T, 3, H, W)` floating point and there are B prompts."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[2] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"expected frames of shape (B, T, 3, H, W), got {shape}")
    if not frames.is_floating_point():
        raise ValueError(f"expected float frames in [0, 1], got {frames.dtype}")
    if isinstance(prompts, str) or len(prompts) != frames.shape[0]:
        count = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"expected a list of {frames.shape[0]} prompts (one per video), got {count}")


def segment_middles(num_frames: int, count: int) -> list[int]:
    """Indices of `count` frames out of `num_frames`: the middle frame of each of `count` equal segments.

    VBench's `get_frame_indices(..., sample="middle")`: split [0, num_frames) at
    `linspace(0, num_frames, count + 1)` and take `(start + end - 1) // 2` of each segment. Asking for
    more frames than there are gives every frame once.
    """
    count = min(count, num_frames)
    edges = [i * num_frames // count for i in range(count + 1)]
    return [(edges[i] + edges[i + 1] - 1) // 2 for i in range(count)]


def frame_pairs(num_frames: int, count: int, stride: int) -> list[tuple[int, int]]:
    """Frame pairs `(t, t + stride)` of a `num_frames`-frame video, t at the `segment_middles(num_frames, count)`.

    A middle too close to the end moves back to `num_frames - 1 - stride` (duplicates dropped); `stride` is
    capped at `num_frames - 1`. A rollout store that keeps the same middles and their `+ stride` neighbours
    (`rollouts.rollout.frame_indices`) holds every frame these pairs read.
    """
    if num_frames < 2:
        return []
    stride = min(stride, num_frames - 1)
    starts = sorted({min(m, num_frames - 1 - stride) for m in segment_middles(num_frames, count)})
    return [(t, t + stride) for t in starts]


def sample_frames(frames: torch.Tensor, count: int) -> torch.Tensor:
    """`(B, T, C, H, W)` -> `(B, min(count, T), C, H, W)`: the `segment_middles` frames of each video."""
    return frames[:, segment_middles(frames.shape[1], count)]


def require_file(path: str | Path | None, option: str, what: str, get_it: str) -> Path:
    """`path` as a Path if it is an existing file, else a UserError naming `option`, the path and `get_it`."""
    if path is None or not Path(path).expanduser().is_file():
        raise UserError(f"{option}: {what} not found at {path}; {get_it}")
    return Path(path).expanduser()
