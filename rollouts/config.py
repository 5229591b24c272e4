"""The rollout stage's config (kept light: `--help` builds it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import ConfigError, option
from rlhf.io import output_path_problem
from rlhf.options import MAX_FRAMES, ModelOptions, VideoOptions, in_range

MAX_SAMPLES_PER_PROMPT = 100_000  # K: best-of-K uses 4 to 64
MAX_LOCAL_PROCESSES = 1024  # processes torchrun starts on one machine (one per device)


@dataclass
class RolloutConfig(ModelOptions, VideoOptions):
    """`rollout`: the model and sampling sections plus what to sample and where to store it."""

    prompts: str | None = option(None, "Prompt file: .txt (one per line), .jsonl/.csv with a 'prompt' column, "
                                       "or a `datasets` folder.")
    out: str | None = option(None, "Rollout store directory (created; an unfinished store is resumed).")
    samples_per_prompt: int = option(4, "Videos sampled per prompt (K).")
    seed: int = option(0, "Base seed; each sample's seed is derived from (seed, prompt, sample index).")
    batch_size: int = option(1, "Samples denoised (and decoded) together, taken in (prompt, sample index) order, so "
                                  "a batch may span prompts.")
    save_videos: bool = option(False, "Decode every sample and write an mp4 to STORE/videos/.")
    save_frames: int = option(8, "Decoded frames kept per sample for scoring: the middles of this many equal "
                                 "segments, as clip/aesthetic read them with num_frames equal to it (0: keep none).")
    save_frame_stride: int = option(
        3, "Also keep frame t + this after each kept frame t (moved back from the end), the pairs `motion` reads "
        "with stride equal to it and num_pairs = save_frames, so store and full-video scores agree (0: none)."
    )
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
        if problem := output_path_problem(self.out, "dir"):
            raise ConfigError("out", problem)
        in_range("samples_per_prompt", self.samples_per_prompt, 1, MAX_SAMPLES_PER_PROMPT)
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        in_range("save_frames", self.save_frames, 0, MAX_FRAMES)
        if self.save_frame_stride < 0:
            raise ConfigError("save_frame_stride", f"must be >= 0, got {self.save_frame_stride}")
        in_range("num_processes", self.num_processes, 1, MAX_LOCAL_PROCESSES)
