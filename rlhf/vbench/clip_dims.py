"""VBench's CLIP dimensions: background consistency (ViT-B/32) and aesthetic quality (ViT-L/14 + LAION v1 head).

VBench loads OpenAI's CLIP with the `clip` package (`clip.load(path)`: OpenAI's `CLIP` class built from the
weights). Here the same architecture is built from the same file by `open_clip.load_openai_model`, which
accepts OpenAI's TorchScript archives (`ViT-B-32.pt`, `ViT-L-14.pt`, as VBench caches them) and plain
state dicts of that layout, infers the widths and depths from the weights and uses QuickGELU. Computed in
float32 (VBench on a GPU runs `clip.load`'s half-precision model; its scores differ from float32 ones
by about 1e-3).

Every frame is scored, preprocessed as `vbench.utils.clip_transform(224)`: resize the shorter side to 224
(bicubic, no antialiasing, on the 0..255 floats, not clamped), centre crop 224 x 224, divide by 255 and
normalise with OpenAI's mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import require_file
from rlhf.errors import UserError, one_line
from rlhf.vbench.formulas import consistency

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH = 32  # frames per CLIP forward (VBench's aesthetic batch size; the scores do not depend on it)
CLIP_SOURCES = {
    "ViT-B/32": "download OpenAI's ViT-B-32.pt (https://openaipublic.azureedge.net/clip/models/40d365715913c9"
                "da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt), as VBench caches it",
    "ViT-L/14": "download OpenAI's ViT-L-14.pt (https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c"
                "99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt), as VBench caches it",
}
HEAD_SOURCE = ("download LAION's v1 head sa_0_4_vit_l_14_linear.pth (https://github.com/LAION-AI/aesthetic-"
               "predictor), VBench's aesthetic model")


def load_openai_clip(path: str | Path | None, option: str, variant: str) -> nn.Module:
    """OpenAI CLIP from a local TorchScript archive or state dict, float32 on the CPU, frozen."""
    import open_clip

    from rewards.clip_backbone import is_torchscript

    path = require_file(path, option, f"OpenAI CLIP {variant} weights", CLIP_SOURCES[variant]).resolve()
    try:
        if is_torchscript(path):
            model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        else:  # what load_openai_model does after torch.jit.load fails, without trying it
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = open_clip.model.build_model_from_openai_state_dict(state).float()
    except Exception as err:  # not OpenAI CLIP weights: another format, missing keys, wrong shapes
        raise UserError(f"{option}: cannot load {path} as OpenAI CLIP weights ({one_line(err)})") from None
    return model.eval().requires_grad_(False)


def clip_transform(frames: torch.Tensor) -> torch.Tensor:
    """`vbench.utils.clip_transform(224)` on `(T, 3, H, W)` 0..255 floats -> `(T, 3, 224, 224)` model input."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    frames = TF.resize(frames.float(), CLIP_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=False)
    frames = TF.center_crop(frames, [CLIP_SIZE, CLIP_SIZE]) / 255.0
    return TF.normalize(frames, CLIP_MEAN, CLIP_STD)


@torch.no_grad()
def clip_features(model: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """L2-normalised CLIP image features `(T, D)` of every frame (float32), `BATCH` frames per forward."""
    device = next(model.parameters()).device
    chunks = [model.encode_image(clip_transform(frames[i:i + BATCH]).to(device)).float()
              for i in range(0, frames.shape[0], BATCH)]
    return F.normalize(torch.cat(chunks), dim=-1, p=2)


class BackgroundConsistency:
    """`background_consistency`: `formulas.consistency` of OpenAI CLIP ViT-B/32 features of every frame."""

    def __init__(self, clip_path: str | Path | None):
        self.model = load_openai_clip(clip_path, "vbench_clip", "ViT-B/32")

    def to(self, device: torch.device | str) -> BackgroundConsistency:
        self.model.to(device)
        return self

    def __call__(self, frames: torch.Tensor) -> float:
        return consistency(clip_features(self.model, frames))


def load_v1_head(path: str | Path | None, width: int) -> nn.Linear:
    """LAION's v1 aesthetic head: a `Linear(width, 1)` state dict (`weight`, `bias`), as VBench loads it."""
    path = require_file(path, "vbench_aesthetic_head", "aesthetic head", HEAD_SOURCE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = nn.Linear(width, 1)
        head.load_state_dict(state)
    except Exception as err:  # not a state dict, other keys, or fitted on another CLIP width
        raise UserError(f"vbench_aesthetic_head: {path} is not a Linear({width}, 1) state dict for the "
                        f"{width}-d CLIP features ({one_line(err)})") from None
    return head.eval().requires_grad_(False)


class AestheticQuality:
    """`aesthetic_quality`: mean over every frame of `head(e) / 10`, `e` the L2-normalised OpenAI CLIP
    ViT-L/14 feature and `head` LAION's v1 linear aesthetic predictor (scores ~1..10, so ~0.1..1)."""

    def __init__(self, clip_path: str | Path | None, head_path: str | Path | None):
        self.model = load_openai_clip(clip_path, "vbench_clip_large", "ViT-L/14")
        self.head = load_v1_head(head_path, self.model.visual.output_dim)

    def to(self, device: torch.device | str) -> AestheticQuality:
        self.model.to(device)
        self.head.to(device)
        return self

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor) -> float:
        scores = self.head(clip_features(self.model, frames)).squeeze(-1) / 10  # (T,)
        return float(scores.mean())
