"""The world's oracle as a scorer, for `eval`'s ground-truth metrics (reported, never trained on).

`world_oracle` scores each video 1.0 / 0.0 for whether the oracle reads the prompt's attribute off it
(`colour`, `size`, `direction`, `taught` (colour and size) or `all`), so its mean over videos is the oracle
accuracy; or, with `attribute: cleanliness`, the oracle's cleanliness in [0, 1]. Prompts must be
world prompts (`rlhf.world.scene.PHRASINGS`); anything else is refused rather than scored 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from rewards.base import Scorer
from rlhf.config import option
from rlhf.errors import UserError
from rlhf.world.oracle import read_clip
from rlhf.world.scene import parse_prompt

Attribute = Literal["colour", "size", "direction", "taught", "all", "cleanliness"]


@dataclass
class OracleOptions:
    """Options of the `world_oracle` ground-truth metric."""

    attribute: Attribute = option("all", "What to report: accuracy on colour, size, direction, taught (colour "
                                         "and size) or all three (1 right / 0 wrong per video; unreadable is "
                                         "wrong), or cleanliness in [0, 1].")


class OracleScorer(Scorer):
    """Per video: 1.0 if the oracle reads the prompt's `attribute` off the frames, else 0.0 (or cleanliness)."""

    name = "world_oracle"
    Options = OracleOptions

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        clips = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, T, 3, H, W)
        clips = clips.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, T, H, W, 3)
        values = []
        for clip, prompt in zip(clips, prompts, strict=True):
            reading = read_clip(clip)
            if self.options.attribute == "cleanliness":
                values.append(reading.cleanliness)
                continue
            truth = parse_prompt(prompt)
            if truth is None:
                raise UserError(f"world_oracle: {prompt!r} is not a shapes-world prompt (a colour, a size and a "
                                "direction); the oracle can only judge world prompts")
            values.append(float(reading.matches(*truth)[self.options.attribute]))
        return torch.tensor(values, dtype=torch.float32, device=frames.device)
