"""`aesthetic`: the LAION aesthetic predictor on CLIP image embeddings, averaged over frames.

    score(video) = mean over N frames f of head(E_img(f))

`E_img` is the L2-normalised image embedding of **OpenAI** CLIP ViT-L/14 (the heads were fitted on
it; a LAION-trained ViT-L/14 is the wrong input), frames sampled at segment middles as in `clip`.
Two published heads, told apart by the keys of their state dict:

- `improved-mlp`: christophschuhmann/improved-aesthetic-predictor (Apache-2.0),
  `sac+logos+ava1-l14-linearMSE.pth`: `Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
  Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))`, no activations, keys
  `layers.{0,2,4,6,7}.{weight,bias}`. Scores ~1-10 (5.5 fair, 6.5 good).
- `v1-linear`: LAION-AI/aesthetic-predictor (MIT), `sa_0_4_vit_l_14_linear.pth`: one `Linear(768, 1)`
  saved as a bare module, keys `weight` / `bias`. VBench's "aesthetic quality" is this head / 10.

The input width is read from the state dict, so a head fitted on another CLIP (or a tiny test
model) works as long as it matches the CLIP's embedding width. Differentiable w.r.t. the frames.
The CLIP tower is shared with the `clip` scorer when both use the same architecture and weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewards.base import ModelCache, Scorer, require_file, sample_frames, segment_middles
from rewards.clip import DEFAULT_ARCH, shared_clip, validate_clip_source
from rlhf.config import ConfigError, option
from rlhf.errors import UserError, one_line

HEAD_SOURCES = (
    "download sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/"
    "improved-aesthetic-predictor (or the v1 head sa_0_4_vit_l_14_linear.pth from "
    "https://github.com/LAION-AI/aesthetic-predictor)"
)
_MLP_LAYERS = (0, 2, 4, 6, 7)  # Linear positions in the published Sequential (Dropouts in between)
_MLP_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


class AestheticHead(nn.Module):
    """A LAION aesthetic head, `(N, D)` normalised embeddings -> `(N,)` scores; `kind` says which one."""

    def __init__(self, layers: nn.Module, kind: str):
        super().__init__()
        self.layers, self.kind = layers, kind
        self.eval().requires_grad_(False)

    @property
    def in_features(self) -> int:
        first = self.layers[0] if isinstance(self.layers, nn.Sequential) else self.layers
        return first.in_features

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "head") -> AestheticHead:
        """Build the head the keys describe (`layers.{0,2,4,6,7}.*` MLP or bare `weight`/`bias` Linear)."""
        keys = set(state)
        mlp_keys = {f"layers.{i}.{p}" for i in _MLP_LAYERS for p in ("weight", "bias")}
        try:
            if keys == mlp_keys:
                modules: list[nn.Module] = []
                width = state["layers.0.weight"].shape[1]  # the input width comes from the file
                for position in range(_MLP_LAYERS[-1] + 1):
                    if position in _MLP_DROPOUT:
                        modules.append(nn.Dropout(_MLP_DROPOUT[position]))
                        continue
                    out_features = state[f"layers.{position}.weight"].shape[0]
                    modules.append(nn.Linear(width, out_features))  # load_state_dict checks the shapes
                    width = out_features
                if width != 1:
                    raise ValueError(f"the last layer has {width} outputs, expected 1")
                layers = nn.Sequential(*modules)
                layers.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
                return cls(layers, "improved-mlp")
            if keys == {"weight", "bias"} and state["weight"].ndim == 2 and state["weight"].shape[0] == 1:
                layers = nn.Linear(state["weight"].shape[1], 1)
                layers.load_state_dict(dict(state))
                return cls(layers, "v1-linear")
        except (RuntimeError, ValueError) as err:  # shapes that do not chain
            raise UserError(f"{source}: not a LAION aesthetic head ({one_line(err)})") from None
        shown = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
        raise UserError(f"{source}: not a LAION aesthetic head: expected the keys layers.{{0,2,4,6,7}}.{{weight,bias}} "
                        f"(improved MLP) or weight/bias of a Linear(D, 1) (v1), found {shown or 'no keys'}")

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    def train(self, mode: bool = True) -> AestheticHead:
        # The published head has Dropout layers; a reward must never be noisy.
        return super().train(False)


def load_head(path: str | Path | None, option: str = "head") -> AestheticHead:
    """Read a head's state dict (`.safetensors` or a `torch.save` file, loaded with weights_only=True)."""
    path = require_file(path, option, "aesthetic head", HEAD_SOURCES)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a weights file
        raise UserError(f"{option}: cannot read {path} as a state dict ({one_line(err)})") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{option}: {path} holds a {type(state).__name__}, expected a state dict")
    return AestheticHead.from_state_dict(state, source=f"{option}: {path}")


@dataclass
class AestheticOptions:
    """Options of the `aesthetic` scorer."""

    head: str | None = option(
        None, "Aesthetic head state dict: sac+logos+ava1-l14-linearMSE.pth (improved MLP) or "
        "sa_0_4_vit_l_14_linear.pth (v1 linear); the kind is detected from its keys."
    )
    clip_checkpoint: str | None = option(
        None, "OpenAI CLIP ViT-L/14 weights the heads were fitted on (state dict, TorchScript ViT-L-14.pt or "
        "local-dir:/folder). Shared with the clip scorer when arch and file are the same."
    )
    clip_arch: str = option(DEFAULT_ARCH, "open_clip architecture of clip_checkpoint (keep -quickgelu for OpenAI weights).")
    num_frames: int = option(8, "Frames scored per video, the middles of equal segments (VBench sampling).")

    def __post_init__(self) -> None:
        if not self.head:
            raise ConfigError("head", f"is required: {HEAD_SOURCES}")
        validate_clip_source(self.clip_checkpoint, self.clip_arch, "clip_checkpoint")
        if self.num_frames < 1:
            raise ConfigError("num_frames", f"must be >= 1, got {self.num_frames}")


class AestheticScorer(Scorer):
    """LAION aesthetic score of the sampled frames, averaged; `head_kind` says which head produced it."""

    name = "aesthetic"
    differentiable = True
    Options = AestheticOptions

    def __init__(self, options: AestheticOptions, cache: ModelCache | None = None):
        super().__init__(options, cache)
        self.head = load_head(options.head)
        self.backbone = shared_clip(cache, options.clip_arch, options.clip_checkpoint, "clip_checkpoint")
        width = self.backbone.embed_dim
        if width is not None and width != self.head.in_features:
            raise UserError(f"head: {options.head} takes {self.head.in_features}-d embeddings but {options.clip_arch} "
                            f"gives {width}-d; the LAION heads need OpenAI CLIP ViT-L/14 (768-d)")

    @property
    def head_kind(self) -> str:
        return self.head.kind

    def frame_positions(self, num_frames: int) -> list[int]:
        return segment_middles(num_frames, self.options.num_frames)

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        picked = sample_frames(frames, self.options.num_frames)  # (B, N, 3, H, W)
        batch, count = picked.shape[:2]
        embeddings = self.backbone.encode_images(picked.flatten(0, 1))  # (B*N, D), L2-normalised
        return self.head(embeddings).view(batch, count).mean(1)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "head_kind": self.head.kind, "weights": self.backbone.source}
