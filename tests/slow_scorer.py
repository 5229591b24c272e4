"""A scorer that takes its time: `brightness`, after sleeping `seconds` per call (a server to kill mid-request)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rewards.analytic import BrightnessScorer
from rlhf.config import option


@dataclass
class SlowOptions:
    """Options of the slow brightness scorer."""

    seconds: float = option(0.5, "Seconds each call sleeps before scoring.")


class SlowBrightness(BrightnessScorer):
    """Mean brightness, `seconds` late."""

    name = "slow_brightness"
    Options = SlowOptions

    def score(self, frames, prompts):
        time.sleep(self.options.seconds)
        return super().score(frames, prompts)
