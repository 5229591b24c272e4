"""An open_clip model loaded from local weights, with differentiable tensor preprocessing.

Shared by the `clip` (text-video alignment) and `aesthetic` scorers. `load_clip(arch, checkpoint)`
accepts three kinds of local weights, never a download:

- a state-dict file (`.safetensors`, `.bin`, `.pt`, `.pth`) for the open_clip architecture `arch`,
  loaded strictly by `open_clip.create_model(arch, pretrained=<file>)`;
- an original OpenAI TorchScript archive (`ViT-L-14.pt`), which `torch.load(weights_only=True)`
  refuses: it goes through `open_clip.load_openai_model` (that builds the architecture from the
  weights, QuickGELU included; `arch` then only picks the tokenizer);
- `local-dir:/folder` holding `open_clip_config.json` and the weights (its config names the
  architecture, tokenizer and preprocessing).

QuickGELU pitfall: loading a file does not apply a pretrained tag's settings, and OpenAI's CLIP was
trained with QuickGELU. `ViT-L-14` (plain GELU) loads OpenAI weights without complaint but gives
wrong embeddings; use `ViT-L-14-quickgelu` (the default of the scorers) for OpenAI state dicts.

Preprocessing mirrors open_clip's eval transform on float tensors so gradients reach the pixels:
resize the shorter side to the model's image size (bicubic, antialiased), centre crop, clamp to
[0, 1] (PIL's uint8 output is clamped too), normalise with the model's mean / std.
"""

from __future__ import annotations

import difflib
import os
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rewards.base import require_file
from rlhf.errors import UserError, one_line

LOCAL_DIR = "local-dir:"
OPENAI_VIT_L14 = (
    "download OpenAI CLIP ViT-L/14: the TorchScript file https://openaipublic.azureedge.net/clip/models/"
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt, or "
    "open_clip_pytorch_model.bin from the Hugging Face repo timm/vit_large_patch14_clip_224.openai"
)


class ClipBackbone(nn.Module):
    """A frozen open_clip model with its tokenizer and image preprocessing settings."""

    def __init__(self, model: nn.Module, tokenizer, preprocess_cfg: dict, source: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        size = preprocess_cfg.get("size", 224)
        self.image_size = size if isinstance(size, int) else tuple(size)
        self.interpolation = preprocess_cfg.get("interpolation", "bicubic")
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise UserError(f"{source}: unsupported preprocessing interpolation {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "squash") or (
                self.resize_mode == "shortest" and not isinstance(self.image_size, int)
                and self.image_size[0] != self.image_size[1]):
            raise UserError(f"{source}: unsupported preprocessing resize_mode {self.resize_mode!r} "
                            f"for image size {self.image_size}")
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.source = source

    @property
    def embed_dim(self) -> int | None:
        """Width of the image embeddings, when the vision tower declares it."""
        return getattr(self.model.visual, "output_dim", None)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] -> `(N, 3, S, S)` normalised model input, differentiable."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        size = self.image_size if isinstance(self.image_size, int) else self.image_size[0]
        if self.resize_mode == "shortest":
            # torchvision's Resize(int): shorter side -> size, the other keeps the aspect (truncated).
            images = TF.resize(images, [size], interpolation=mode, antialias=True)
            images = TF.center_crop(images, [size, size])
        else:  # squash: both sides to the target size, aspect ignored
            target = [size, size] if isinstance(self.image_size, int) else list(self.image_size)
            images = TF.resize(images, target, interpolation=mode, antialias=True)
        images = images.clamp(0, 1)  # bicubic overshoots; the PIL path clamps to uint8
        return (images - self.mean) / self.std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] -> L2-normalised image embeddings `(N, D)`."""
        return self.model.encode_image(self.preprocess(images.float()), normalize=True)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings `(B, D)`; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(self.mean.device)
        embeddings = self.model.encode_text(tokens, normalize=True)
        index = torch.tensor([unique.index(p) for p in prompts], device=embeddings.device)
        return embeddings[index]


def load_clip(arch: str, checkpoint: str, *, option: str = "checkpoint") -> ClipBackbone:
    """Load an open_clip model from local weights (see the module docstring); `option` names the
    config field in error messages."""
    import open_clip

    if checkpoint.startswith(LOCAL_DIR):
        folder = Path(checkpoint[len(LOCAL_DIR):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"{option}: {folder} is not a folder with open_clip_config.json and weights "
                            f"(the layout of open_clip's Hugging Face repos); {OPENAI_VIT_L14}")
        if not any(True for pattern in ("*.safetensors", "*.bin", "*.pth") for _ in folder.glob(pattern)):
            # open_clip only warns and returns a randomly initialised model in this case.
            raise UserError(f"{option}: {folder} has open_clip_config.json but no .safetensors/.bin/.pth weights")
        name = LOCAL_DIR + str(folder.resolve())
        model = _create(lambda: open_clip.create_model(name, device="cpu"), option, folder, arch)
        tokenizer = _tokenizer(lambda: open_clip.get_tokenizer(name), option, name)
        return ClipBackbone(model, tokenizer, open_clip.get_model_preprocess_cfg(model), source=str(folder))

    path = require_file(checkpoint, option, "CLIP weights", OPENAI_VIT_L14)
    if open_clip.get_model_config(arch) is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models()"
        raise UserError(f"arch: unknown open_clip architecture {arch!r}; {hint}")
    if is_torchscript(path):
        model = _create(lambda: open_clip.load_openai_model(str(path), precision="fp32", device="cpu"),
                        option, path, arch)
    else:
        if not open_clip.get_model_config(arch).get("quick_gelu", False) and "openai" in str(path).lower():
            warnings.warn(f"{path} looks like OpenAI CLIP weights but {arch!r} uses GELU; OpenAI models need "
                          f"QuickGELU ({arch}-quickgelu), or the embeddings are silently wrong", stacklevel=2)
        # An absolute path can never be mistaken for a pretrained tag (which would download).
        model = _create(lambda: open_clip.create_model(arch, pretrained=str(path.resolve()), device="cpu"),
                        option, path, arch)
    tokenizer = _tokenizer(lambda: open_clip.get_tokenizer(arch), option, arch)
    return ClipBackbone(model, tokenizer, open_clip.get_model_preprocess_cfg(model), source=str(path))


def is_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (a zip with `code/` and `constants.pkl`), false for a plain state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _create(create, option: str, path: Path, arch: str) -> nn.Module:
    try:
        return create()
    except Exception as err:  # a file that is not weights for `arch`: wrong keys, shapes, format
        raise UserError(f"{option}: cannot load {path} as open_clip {arch!r} ({one_line(err)}); "
                        "check that arch matches the weights") from None


def _tokenizer(create, option: str, name: str):
    try:
        return create()
    except Exception as err:  # SigLIP / HF-tokenizer configs need files that are not in the local cache
        raise UserError(f"{option}: cannot create the tokenizer of {name} offline ({one_line(err)}); classic CLIP "
                        "architectures use open_clip's bundled vocabulary, Hugging Face tokenizers must be cached") from None
