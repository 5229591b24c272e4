"""`contentv-rlhf generate`: one prompt -> one mp4, from a base checkpoint (optionally + a LoRA adapter)."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.io import output_path_problem
from rlhf.options import ModelOptions, VideoOptions, uses_guidance
from rlhf.outputs import VIDEO, check_output, remove_stale_temporaries_of

logger = logging.getLogger("contentv-rlhf")
HELP = "Generate one video from a prompt and write it as an mp4."
EXAMPLES = """\
  contentv-rlhf generate --model ContentV-8B --prompt "a red fox running through snow" --out fox.mp4
  contentv-rlhf generate --model runs/tiny-model --prompt "a cat" --out cat.mp4 \\
      --frames 17 --height 64 --width 64 --steps 8 --guidance 4 --seed 1
  contentv-rlhf generate --config configs/generate.yaml --adapter runs/dpo/adapter --seed 3
"""


@dataclass
class GenerateConfig(ModelOptions, VideoOptions):
    """`generate`: the model and sampling sections plus the prompt, seed and output file."""

    prompt: str | None = option(None, "Text prompt to generate.")
    out: str = option("video.mp4", "Output mp4 path (written atomically).")
    seed: int = option(0, "Seed of the initial noise (same seed -> same video on the same device).")
    overwrite: bool = option(False, "Replace an existing mp4 at `out` (never a file of another kind).")

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        VideoOptions.__post_init__(self)
        if not self.prompt or not self.prompt.strip():
            raise ConfigError("prompt", "is required (a non-empty text prompt)")
        if Path(self.out).suffix.lower() != ".mp4":
            raise ConfigError("out", f"must end in .mp4, got {self.out!r}")
        if problem := output_path_problem(self.out, "file"):
            raise ConfigError("out", problem)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GenerateConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(GenerateConfig, args)
    out = check_output(config.out, field="field 'out'", kind=VIDEO, overwrite=config.overwrite,
                       inputs={"model": config.model, "adapter": config.adapter})
    remove_stale_temporaries_of(out)  # what a killed generate into the same file left

    from rlhf.generation import VideoGenerator
    from rlhf.video import to_uint8_frames, write_mp4

    start = time.perf_counter()
    logger.info("generate: %d frames of %dx%d, %d steps, guidance %g, seed %d -> %s; loading %s", config.frames,
                config.width, config.height, config.steps, config.guidance, config.seed, config.out, config.model)
    generator = VideoGenerator(config, max_sequence_length=config.max_sequence_length)
    logger.info("generate: model loaded in %.1fs; encoding the prompt", time.perf_counter() - start)
    guided = uses_guidance(config.guidance)
    embeds = generator.encode_prompts([config.prompt, config.negative_prompt] if guided else [config.prompt])
    if config.free_text_encoders:
        generator.free_text_encoders()
    cond, uncond = embeds.select(0), (embeds.select(1) if guided else None)
    latents = generator.sample_latents(cond, uncond, [config.seed], config)
    logger.info("generate: decoding %d frames", config.frames)
    video = generator.decode(latents)  # (1, 3, T, H, W)
    write_mp4(out, to_uint8_frames(video[0]), fps=config.fps)
    frames, height, width = video.shape[2:]
    print(f"wrote {config.out} ({frames} frames, {width}x{height}, {config.fps:g} fps, seed {config.seed}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
