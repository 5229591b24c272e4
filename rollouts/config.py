"""The rollout stage's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, option
from rlhf.options import ModelOptions, VideoOptions


@dataclass
class RolloutConfig(ModelOptions, VideoOptions):
    """`rollout`: the model and sampling sections plus what to sample and where to store it."""

    prompts: str | None = option(None, "Prompt file: .txt (one per line), .jsonl/.csv with a 'prompt' column, "
                                       "or a `datasets` folder.")
    out: str | None = option(None, "Rollout store directory (created; an unfinished store is resumed).")
    samples_per_prompt: int = option(4, "Videos sampled per prompt (K).")
    seed: int = option(0, "Base seed; each sample's seed is derived from (seed, prompt, sample index).")
    batch_size: int = option(1, "Samples of one prompt denoised together (at most samples_per_prompt).")
    save_videos: bool = option(False, "Decode every sample and write an mp4 to STORE/videos/.")
    save_frames: int = option(8, "Decoded frames kept per sample for scoring, evenly spaced (0: keep none).")
    overwrite: bool = option(False, "Delete an existing store made with other settings instead of refusing.")
    num_processes: int = option(1, "Processes to launch on this machine (via torchrun); under an external "
                                   "launcher (torchrun / accelerate launch) leave it at 1.")

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        VideoOptions.__post_init__(self)
        if not self.prompts:
            raise ConfigError("prompts", "is required: a prompt file or datasets folder")
        if not self.out:
            raise ConfigError("out", "is required: the rollout store directory")
        if self.samples_per_prompt < 1:
            raise ConfigError("samples_per_prompt", f"must be >= 1, got {self.samples_per_prompt}")
        if not 1 <= self.batch_size <= self.samples_per_prompt:
            raise ConfigError("batch_size", f"must be in 1..samples_per_prompt ({self.samples_per_prompt}), "
                                            f"got {self.batch_size}")
        if self.save_frames < 0:
            raise ConfigError("save_frames", f"must be >= 0, got {self.save_frames}")
        if self.num_processes < 1:
            raise ConfigError("num_processes", f"must be >= 1, got {self.num_processes}")
