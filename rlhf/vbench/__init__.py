"""VBench dimensions for `eval --vbench`: VBench's own formulas (Huang et al., CVPR 2024; github.com/Vchitect/VBench
at commit 45e79ec) on the eval's videos, with VBench's models loaded from local weights.

| dimension | model (local weights) | per-video score |
|---|---|---|
| `subject_consistency` | DINO ViT-B/16 (`dino_vitbase16_pretrain.pth`) | `formulas.consistency` of DINO features |
| `background_consistency` | OpenAI CLIP ViT-B/32 (`ViT-B-32.pt`) | `formulas.consistency` of CLIP features |
| `temporal_flickering` | none | `formulas.temporal_flickering` |
| `dynamic_degree` | RAFT-large (`raft-things.pth`) | 0 / 1, `dynamic.DynamicDegree` |
| `aesthetic_quality` | OpenAI CLIP ViT-L/14 + LAION v1 head | mean of `head / 10`, `clip_dims.AestheticQuality` |

Not supported (`UNSUPPORTED` says why): `motion_smoothness` and `imaging_quality`.

Frames: VBench reads each mp4 back as uint8 frames; here the decoded video is quantised to uint8 exactly as
the saved mp4s are written (`rlhf.video.to_uint8_frames`) and scored before H.264 compression, every frame
(VBench's evaluation of these dimensions uses every frame; dynamic degree samples ~8 fps). VBench's overall
number for a dimension is the mean over videos (consistencies: weighted by frames, the same when every video
has as many frames); eval reports the per-video scores with paired CIs like the rewards.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

# name -> "module:Class" (imported lazily: the models' libraries load only when a dimension is asked for)
DIMENSIONS = {
    "subject_consistency": "rlhf.vbench.dino:SubjectConsistency",
    "background_consistency": "rlhf.vbench.clip_dims:BackgroundConsistency",
    "temporal_flickering": "rlhf.vbench.pixels:TemporalFlickering",
    "dynamic_degree": "rlhf.vbench.dynamic:DynamicDegree",
    "aesthetic_quality": "rlhf.vbench.clip_dims:AestheticQuality",
}
UNSUPPORTED = {
    "motion_smoothness": "its frame interpolation model AMT-S exists only as research code (MCG-NKU/AMT, "
                         "vendored in VBench's third_party/amt), in no installed library, so amt-s.pth cannot be "
                         "loaded without copying that code",
    "imaging_quality": "its MUSIQ model comes from pyiqa, which is not a dependency of this project; no installed "
                       "library has MUSIQ's architecture to load musiq_spaq_ckpt.pth into",
}
# EvalConfig field -> dimensions that need it
WEIGHT_FIELDS = {
    "vbench_dino": ("subject_consistency",),
    "vbench_clip": ("background_consistency",),
    "vbench_clip_large": ("aesthetic_quality",),
    "vbench_aesthetic_head": ("aesthetic_quality",),
    "vbench_raft": ("dynamic_degree",),
}


class Dimension(Protocol):
    """One VBench dimension: `(T, 3, H, W)` frames holding 0..255 values -> the video's score."""

    def to(self, device: torch.device | str) -> Dimension: ...

    def __call__(self, frames: torch.Tensor) -> float: ...


def unknown_dimension_problem(names: list[str]) -> str | None:
    """Why `names` cannot be evaluated (an unknown or unsupported name, a repeat), or None."""
    for name in names:
        if name in UNSUPPORTED:
            return f"{name} is not supported: {UNSUPPORTED[name]}; supported: {', '.join(DIMENSIONS)}"
        if name not in DIMENSIONS:
            return f"unknown VBench dimension {name!r}; expected some of {', '.join(DIMENSIONS)}"
    if len(set(names)) != len(names):
        return f"a dimension is named twice in {', '.join(names)}"
    return None


def build_dimensions(names: list[str], *, fps: float, vbench_dino: str | None = None,
                     vbench_dino_heads: int | None = None, vbench_clip: str | None = None,
                     vbench_clip_large: str | None = None, vbench_aesthetic_head: str | None = None,
                     vbench_raft: str | None = None) -> dict[str, Dimension]:
    """The dimensions `names`, their models loaded from the given local files (UserError on a missing or wrong
    file, naming the field)."""
    arguments = {
        "subject_consistency": (vbench_dino, vbench_dino_heads),
        "background_consistency": (vbench_clip,),
        "temporal_flickering": (),
        "dynamic_degree": (vbench_raft, fps),
        "aesthetic_quality": (vbench_clip_large, vbench_aesthetic_head),
    }
    built = {}
    for name in names:
        module, cls = DIMENSIONS[name].split(":")
        built[name] = getattr(importlib.import_module(module), cls)(*arguments[name])
    return built


def vbench_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoded videos `(B, 3, T, H, W)` in [-1, 1] -> `(B, T, 3, H, W)` float 0..255 integers, quantised as
    `rlhf.video.to_uint8_frames` writes the mp4s: `round((clamp(x, -1, 1) + 1) * 127.5)`."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round()
    return frames.permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W)
