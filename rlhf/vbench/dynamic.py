"""VBench's dynamic degree: does the video move? RAFT optical flow between frames sampled at ~8 fps.

VBench runs the original RAFT (Teed & Deng, its `third_party/RAFT`) with `raft-things.pth`, 20 flow updates,
on frames padded to a multiple of 8 (`InputPadder`, "sintel" mode: replicate, split evenly). torchvision's
`raft_large` is the same network under other parameter names (its `Raft_Large_Weights.C_T_V1` is the port
of `raft-things.pth`); `load_raft` accepts either file, renaming the original's parameters
(`ORIGINAL_TO_TORCHVISION`). Per pair, the score is the mean of the largest 5% flow magnitudes of the
padded frames (`formulas.top_flow_magnitude`); the video is dynamic (1) or not (0) by
`formulas.is_dynamic`. `DynamicDegree.pair_scores` gives the continuous per-pair numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import require_file
from rlhf.errors import UserError, one_line
from rlhf.vbench.formulas import dynamic_sample_interval, is_dynamic, top_flow_magnitude

FLOW_UPDATES = 20  # VBench: model(image1, image2, iters=20, test_mode=True)
RAFT_SOURCE = ("download VBench's raft-things.pth (RAFT's models.zip) or torchvision's "
               "https://download.pytorch.org/models/raft_large_C_T_V1-22a6c225.pth")

# (pattern, replacement) applied in order to the original RAFT's names (after dropping `module.`).
ORIGINAL_TO_TORCHVISION = (
    (r"^fnet\.", "feature_encoder."),
    (r"^cnet\.", "context_encoder."),
    (r"^(feature|context)_encoder\.conv1\.", r"\1_encoder.convnormrelu.0."),
    (r"^(feature|context)_encoder\.norm1\.", r"\1_encoder.convnormrelu.1."),
    (r"^(feature|context)_encoder\.conv2\.", r"\1_encoder.conv."),
    (r"(layer\d\.\d)\.conv1\.", r"\1.convnormrelu1.0."),
    (r"(layer\d\.\d)\.norm1\.", r"\1.convnormrelu1.1."),
    (r"(layer\d\.\d)\.conv2\.", r"\1.convnormrelu2.0."),
    (r"(layer\d\.\d)\.norm2\.", r"\1.convnormrelu2.1."),
    (r"^update_block\.encoder\.convc1\.", "update_block.motion_encoder.convcorr1.0."),
    (r"^update_block\.encoder\.convc2\.", "update_block.motion_encoder.convcorr2.0."),
    (r"^update_block\.encoder\.convf1\.", "update_block.motion_encoder.convflow1.0."),
    (r"^update_block\.encoder\.convf2\.", "update_block.motion_encoder.convflow2.0."),
    (r"^update_block\.encoder\.conv\.", "update_block.motion_encoder.conv.0."),
    (r"^update_block\.gru\.conv([zrq])1\.", r"update_block.recurrent_block.convgru1.conv\1."),
    (r"^update_block\.gru\.conv([zrq])2\.", r"update_block.recurrent_block.convgru2.conv\1."),
    (r"^update_block\.mask\.0\.", "mask_predictor.convrelu.0."),
    (r"^update_block\.mask\.2\.", "mask_predictor.conv."),
)


def original_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original RAFT state dict (`fnet.*`, `cnet.*`, `update_block.*`, optionally `module.`-prefixed)
    to torchvision's `raft_large` names. The original registers each downsampling norm twice (`normN` and
    `downsample.1`); the `norm3` copy is dropped."""
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if re.search(r"layer\d\.\d\.norm3\.", key):
            continue
        for pattern, replacement in ORIGINAL_TO_TORCHVISION:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def load_raft(path: str | Path | None) -> nn.Module:
    """torchvision `raft_large` with the weights of a local original-RAFT or torchvision file, frozen."""
    from torchvision.models.optical_flow import raft_large

    path = require_file(path, "vbench_raft", "RAFT weights", RAFT_SOURCE)
    model = raft_large(weights=None, progress=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if any(k.removeprefix("module.").startswith(("fnet.", "cnet.")) for k in state):
            state = original_to_torchvision(state)
        model.load_state_dict(state)
    except Exception as err:  # not a state dict, or not RAFT-large's keys and shapes (raft-small is not VBench's)
        raise UserError(f"vbench_raft: {path} is not a RAFT-large state dict, original or torchvision "
                        f"({one_line(err)})") from None
    return model.eval().requires_grad_(False)


def pad_to_8(image: torch.Tensor) -> torch.Tensor:
    """RAFT's `InputPadder` ("sintel"): replicate-pad `(N, C, H, W)` to multiples of 8, the extra rows and
    columns split with the smaller half first."""
    height, width = image.shape[-2:]
    pad_h, pad_w = (-height) % 8, (-width) % 8
    return F.pad(image, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], mode="replicate")


class DynamicDegree:
    """`dynamic_degree`: 1.0 if the video moves (see the module docstring), else 0.0; `fps` is the videos'
    frame rate, which sets VBench's sampling interval."""

    def __init__(self, raft_path: str | Path | None, fps: float):
        self.model = load_raft(raft_path)
        self.interval = dynamic_sample_interval(fps)

    def to(self, device: torch.device | str) -> DynamicDegree:
        self.model.to(device)
        return self

    @torch.no_grad()
    def pair_scores(self, frames: torch.Tensor) -> list[float]:
        """Top-5% flow magnitude of each consecutive pair of the sampled frames `(T, 3, H, W)` 0..255."""
        device = next(self.model.parameters()).device
        sampled = pad_to_8(frames[::self.interval].float().to(device)) / 255.0 * 2 - 1  # RAFT's [-1, 1] input
        scores = []
        for first, second in zip(sampled[:-1], sampled[1:], strict=True):
            flow = self.model(first[None], second[None], num_flow_updates=FLOW_UPDATES)[-1]  # (1, 2, H', W')
            scores.append(top_flow_magnitude(flow[0]))
        return scores

    def __call__(self, frames: torch.Tensor) -> float:
        height, width = frames.shape[-2:]
        sampled = len(range(0, frames.shape[0], self.interval))
        return float(is_dynamic(self.pair_scores(frames), height, width, sampled))
