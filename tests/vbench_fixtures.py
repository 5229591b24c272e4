"""Fixed frames and tiny random-weight models of VBench's classes, shared by tests/test_vbench.py and the
reference run tests/vbench_reference.py (which feeds the same frames and weights to VBench's own code).

Weights are drawn from seeded torch generators and perturbed so that no norm is the identity and no bias is
zero; the files are what VBench loads (OpenAI CLIP state dicts, a DINO ViT state dict, a LAION v1 head) or, for
RAFT, torchvision's layout (the reference run renames it to the original RAFT's names for VBench).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FRAMES, HEIGHT, WIDTH = 8, 128, 140  # not square, width not a multiple of 8 (RAFT pads it to 144)
LARGE = (240, 356)  # larger than the models' 224 px: CLIP and DINO downsample (VBench: no antialiasing)
FPS = 16  # dynamic degree keeps every round(16 / 8) = 2nd frame
CLIP_WIDTH = 768  # VBench's aesthetic head is a Linear(768, 1): the tiny CLIP's embeddings are 768-d


def video(moving: bool, size: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """`(T, H, W, 3)` uint8 RGB: a colour ramp with a fine texture and a bright square; `moving` pans the ramp
    and slides the square (3 px down, 4 px right per frame), the static video only flickers by 3 levels."""
    t, y, x, c = np.meshgrid(np.arange(FRAMES), np.arange(size[0]), np.arange(size[1]), np.arange(3), indexing="ij")
    shift = 2 * t if moving else 0
    frames = (40 * c + 2 * (x + shift) + 3 * y) % 200 + (x * 37 + y * 91 + c * 7) % 23 + 3 * (t % 2)
    top, left = 10 + (3 * t if moving else 0), 20 + (4 * t if moving else 0)
    square = (y >= top) & (y < top + 16) & (x >= left) & (x < left + 16)
    frames = np.where(square, np.array([250, 30, 120])[c], frames)
    return frames.astype(np.uint8)


def _perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    return module


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """An OpenAI-layout CLIP state dict (open_clip's `CLIP`, QuickGELU): 224 px, patch 32, 2 vision layers of
    width 64, 1 text layer of width 64 (one 64-wide head each, as OpenAI's `build_model` infers), 768-d
    embeddings."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        CLIP_WIDTH, vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=64, patch_size=32,
                                                             image_size=224),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True)
    _perturb(model, torch.Generator().manual_seed(seed + 1))
    torch.save(model.state_dict(), path)
    return path


def write_aesthetic_head(path: Path, seed: int = 0) -> Path:
    """LAION v1 head layout: `Linear(768, 1)` state dict (`weight`, `bias`)."""
    head = torch.nn.Linear(CLIP_WIDTH, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        head.bias.fill_(5.0)
    torch.save(head.state_dict(), path)
    return path


def write_tiny_dino(path: Path, seed: int = 0) -> Path:
    """A DINO ViT state dict of width 128, depth 2, patch 16, 224 px (2 heads of 64): the parameter names of
    facebookresearch/dino's VisionTransformer (timm's are the same)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=224, patch_size=16, num_classes=0, embed_dim=128, depth=2, num_heads=2)
    _perturb(model, torch.Generator().manual_seed(seed + 1), scale=0.1)
    torch.save(model.state_dict(), path)
    return path


def write_tiny_raft(path: Path, seed: int = 0) -> Path:
    """torchvision `raft_large` with seeded random weights and batch-norm statistics (running variances kept
    positive), in torchvision's layout."""
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(seed)
    model = raft_large(weights=None, progress=False)
    _perturb(model, torch.Generator().manual_seed(seed + 1), scale=0.02)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.abs_().add_(0.5)
    torch.save(model.state_dict(), path)
    return path
