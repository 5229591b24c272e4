"""VBench's subject consistency: DINO ViT-B/16 features of every frame.

VBench builds `dino_vitb16` from facebookresearch/dino with `torch.hub` (code fetched from GitHub, which this
project never does) and loads `dino_vitbase16_pretrain.pth`. The same network is timm's `VisionTransformer`
(pre-norm blocks, LayerNorm eps 1e-6, qkv bias, class token, final norm; identical parameter names), built
here from the weights (width, depth, patch and MLP ratio read from the state dict; heads = width / 64 as in
every DINO ViT, or `vbench_dino_heads`). The forward pass is DINO's own, run on timm's modules, because
VBench feeds frames that are not square: DINO's `interpolate_pos_encoding` resizes the position embeddings by
bicubic interpolation with the scale factor `(H/16 + 0.1) / sqrt(N), (W/16 + 0.1) / sqrt(N)`; the output is
the final-normed class token.

Frames are preprocessed as `vbench.utils.dino_transform(224)`: the shorter side resized to 224 (bilinear,
no antialiasing, no crop), divided by 255, ImageNet mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import require_file
from rlhf.errors import UserError, one_line
from rlhf.vbench.formulas import consistency

DINO_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_WIDTH = 64  # every DINO ViT (S: 384 / 6, B: 768 / 12) has 64-wide attention heads
DINO_SOURCE = ("download dino_vitbase16_pretrain.pth (https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
               "dino_vitbase16_pretrain.pth), the weights VBench's torch.hub model loads")


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ViT's parameters from a DINO file: a bare state dict, or a training checkpoint's `teacher` /
    `student` with `module.` and `backbone.` prefixes; DINO's projection head (`head.*`) is dropped."""
    for key in ("teacher", "student", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    cleaned = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    return {k: v for k, v in cleaned.items() if not k.startswith("head.")}


def build_vit(state: Mapping[str, torch.Tensor], heads: int | None = None) -> nn.Module:
    """timm's VisionTransformer with the shape the DINO weights describe, weights loaded strictly."""
    from timm.models.vision_transformer import VisionTransformer

    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    model = VisionTransformer(img_size=grid * patch, patch_size=patch, num_classes=0, global_pool="token",
                              embed_dim=width, depth=depth, num_heads=heads or max(1, width // HEAD_WIDTH),
                              mlp_ratio=hidden / width, qkv_bias=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def load_dino(path: str | Path | None, heads: int | None = None) -> nn.Module:
    """DINO ViT from a local file (see `backbone_state`); UserError naming `vbench_dino` otherwise."""
    path = require_file(path, "vbench_dino", "DINO ViT-B/16 weights", DINO_SOURCE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return build_vit(backbone_state(state), heads)
    except Exception as err:  # not a state dict, or not a DINO ViT's keys and shapes
        raise UserError(f"vbench_dino: {path} is not a DINO ViT state dict ({one_line(err)})") from None


def dino_transform(frames: torch.Tensor) -> torch.Tensor:
    """`vbench.utils.dino_transform(224)` on `(T, 3, H, W)` 0..255 floats (shorter side -> 224, no crop)."""
    from torchvision.transforms import functional as TF

    frames = TF.resize(frames.float(), DINO_SIZE, antialias=False) / 255.0  # bilinear, torchvision's default
    return TF.normalize(frames, IMAGENET_MEAN, IMAGENET_STD)


def position_embedding(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding` for a `height x width` input: `(1, 1 + rows*cols, D)`, `rows =
    height // patch`, `cols = width // patch`.

    Unchanged for a square input with the trained number of patches; otherwise the `sqrt(N) x sqrt(N)` grid is
    resized bicubically with scale factors `((rows + 0.1) / sqrt(N), (cols + 0.1) / sqrt(N))` (DINO adds 0.1
    against floating-point error; the scale factor, not the size, sets the sampling positions)."""
    count, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    rows, cols = height // patch, width // patch
    if rows * cols == count and height == width:
        return pos_embed
    side = math.sqrt(count)
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    if grid.shape[-2:] != (rows, cols):
        raise ValueError(f"position grid {tuple(grid.shape[-2:])} != patch grid {(rows, cols)}")
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@torch.no_grad()
def dino_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """DINO's `VisionTransformer.forward` on timm's modules: `(N, 3, H, W)` normalised -> class tokens `(N, D)`."""
    patch = model.patch_embed.proj.kernel_size[0]
    tokens = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (N, rows*cols, D)
    tokens = torch.cat((model.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    tokens = tokens + position_embedding(model.pos_embed, images.shape[-2], images.shape[-1], patch)
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)[:, 0]


class SubjectConsistency:
    """`subject_consistency`: `formulas.consistency` of the DINO class tokens of every frame (one frame per
    forward pass, as VBench)."""

    def __init__(self, dino_path: str | Path | None, heads: int | None = None):
        self.model = load_dino(dino_path, heads)

    def to(self, device: torch.device | str) -> SubjectConsistency:
        self.model.to(device)
        return self

    def __call__(self, frames: torch.Tensor) -> float:
        device = self.model.cls_token.device
        images = dino_transform(frames).to(device)
        features = torch.cat([dino_features(self.model, images[i:i + 1]) for i in range(images.shape[0])])
        return consistency(features)
