"""The scorer interface every reward implements, and the helpers scorers share.

A scorer is a frozen `torch.nn.Module` called as `scorer(frames, prompts) -> scores`:

- `frames`: `(B, T, 3, H, W)` float in [0, 1], on the scorer's device (`scorer.to(device)` first);
- `prompts`: a list of B strings (scorers that ignore text still take them);
- `scores`: `(B,)` float32 on the same device, higher is better.

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
        """Scores `(B,)` for checked inputs; implemented by each scorer."""
        raise NotImplementedError

    def forward(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(frames, prompts)
        device = self.device
        if device is not None and device != frames.device:
            raise ValueError(f"scorer {self.name!r} is on {device} but the frames are on {frames.device}; "
                             "move one of them (scorer.to(device))")
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


def sample_frames(frames: torch.Tensor, count: int) -> torch.Tensor:
    """`(B, T, C, H, W)` -> `(B, min(count, T), C, H, W)`: the `segment_middles` frames of each video."""
    return frames[:, segment_middles(frames.shape[1], count)]


def require_file(path: str | Path | None, option: str, what: str, get_it: str) -> Path:
    """`path` as a Path if it is an existing file, else a UserError naming `option`, the path and `get_it`."""
    if path is None or not Path(path).expanduser().is_file():
        raise UserError(f"{option}: {what} not found at {path}; {get_it}")
    return Path(path).expanduser()
