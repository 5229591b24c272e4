"""The reward server's wire format: safetensors bytes both ways, never pickle.

A score request (`POST /v1/score?scorer=NAME`) is a safetensors file holding one tensor and string metadata:

- `frames`: `(B, F, 3, H, W)`, either `uint8` (then the frames are `frames.to(dtype) / 255`, sent so only when
  that reconstruction equals the caller's frames bit for bit: 4x fewer bytes than float32) or the frames' own
  float dtype (F64, F32, F16, BF16) as they are;
- `__metadata__`: `prompts` (JSON list of B strings), `positions` (JSON list of the F video positions the frames
  are at, or `null` for a whole video), `num_frames` (the video's frame count), `dtype` (`float32`, ...: the dtype
  the frames are scored in).

A score answer is a safetensors file with `scores`: `(B,)` float32, the scorer's output bytes unchanged, so
remote scores equal in-process scores exactly. Errors are JSON `{"error": "one line"}` with an HTTP status.
safetensors checks that the header's shapes and offsets match the bytes; nothing in a body can run code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import NamedTuple

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
PROTOCOL = 1  # bumped when the format changes; GET /v1/scorers reports it


class ScoreRequest(NamedTuple):
    """A decoded score request: what `scorer(frames, prompts, positions=..., num_frames=...)` takes."""

    frames: torch.Tensor  # (B, F, 3, H, W) float
    prompts: list[str]
    positions: list[int] | None
    num_frames: int


def as_uint8(frames: torch.Tensor) -> torch.Tensor | None:
    """`frames` as uint8 `u` with `u.to(frames.dtype) / 255 == frames` exactly, or None if no such `u` exists."""
    if frames.dtype not in FLOAT_DTYPES.values() or frames.numel() == 0:
        return None
    scaled = (frames.double() * 255).round()
    if scaled.min() < 0 or scaled.max() > 255:
        return None
    quantised = scaled.to(torch.uint8)
    return quantised if torch.equal(quantised.to(frames.dtype) / 255, frames) else None


def encode_request(frames: torch.Tensor, prompts: Sequence[str], positions: Sequence[int] | None,
                   num_frames: int) -> bytes:
    """The request body for CPU `frames` `(B, F, 3, H, W)` float, B prompts, the frames' video positions."""
    if frames.dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"expected float frames, got {frames.dtype}")
    compact = as_uint8(frames)
    metadata = {"prompts": json.dumps(list(prompts)), "num_frames": str(int(num_frames)),
                "positions": json.dumps(None if positions is None else [int(p) for p in positions]),
                "dtype": str(frames.dtype).removeprefix("torch.")}
    return save_tensors({"frames": (frames if compact is None else compact).contiguous()}, metadata=metadata)


def _metadata(body: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors body (safetensors.torch.load drops it)."""
    size = int.from_bytes(body[:8], "little") if len(body) >= 8 else -1
    if not 2 <= size <= len(body) - 8:
        raise ValueError("not a safetensors body (bad header length)")
    header = json.loads(body[8:8 + size])
    return header.get("__metadata__") or {}


def decode_request(body: bytes) -> ScoreRequest:
    """Parse and check a request body; ValueError says what is wrong with it."""
    try:
        metadata = _metadata(body)
        tensors = load_tensors(body)
        prompts = json.loads(metadata["prompts"])
        positions = json.loads(metadata["positions"])
        num_frames = int(metadata["num_frames"])
        dtype = FLOAT_DTYPES[metadata["dtype"]]
    except KeyError as err:
        raise ValueError(f"request metadata lacks {err} (needs prompts, positions, num_frames, dtype)") from None
    except Exception as err:  # safetensors raises its own error types for malformed bodies
        raise ValueError(f"unreadable request body ({' '.join(str(err).split())[:200]})") from None
    if set(tensors) != {"frames"}:
        raise ValueError(f"expected one tensor 'frames', got {sorted(tensors)}")
    frames = tensors["frames"]
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames: expected shape (B, F, 3, H, W), got {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        frames = frames.to(dtype) / 255
    elif frames.dtype != dtype:
        raise ValueError(f"frames are {frames.dtype} but metadata says {metadata['dtype']}")
    if not (isinstance(prompts, list) and len(prompts) == frames.shape[0] and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"prompts: expected a list of {frames.shape[0]} strings")
    if positions is not None and not (isinstance(positions, list) and len(positions) == frames.shape[1]
                                      and all(isinstance(p, int) and 0 <= p < num_frames for p in positions)):
        raise ValueError(f"positions: expected null or {frames.shape[1]} frame indices in [0, {num_frames})")
    if num_frames < 1:
        raise ValueError(f"num_frames: expected a positive count, got {num_frames}")
    return ScoreRequest(frames, prompts, positions, num_frames)


def encode_scores(scores: torch.Tensor) -> bytes:
    """The answer body: `(B,)` float32 scores, bytes unchanged."""
    return save_tensors({"scores": scores.detach().to("cpu", torch.float32).contiguous()})


def decode_scores(body: bytes, count: int) -> torch.Tensor:
    """`(count,)` float32 scores from an answer body; ValueError if it holds anything else."""
    try:
        scores = load_tensors(body).get("scores")
    except Exception as err:
        raise ValueError(f"unreadable answer ({' '.join(str(err).split())[:200]})") from None
    if scores is None or scores.dtype != torch.float32 or tuple(scores.shape) != (count,):
        raise ValueError(f"expected {count} float32 scores, got {None if scores is None else (scores.dtype, tuple(scores.shape))}")
    return scores
