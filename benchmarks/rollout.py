"""Rollout throughput: our rollout stage vs a reference-style sampling loop, side by side in one run.

Reference style (ContentV's / diffusers' pipeline way, one call per video): the prompt and the negative
prompt are encoded for every sample, and each Euler step runs the conditional and unconditional branches
as two separate transformer passes, one video at a time. Ours: `contentv-rlhf rollout` itself (embeddings
once per prompt, CFG batched into one forward, samples of a prompt batched together).

Both decode every sample and save its latents. Prints samples/second for each, the ratio, and where our
time goes (encode / sampler / decode / write). Appends a line to benchmarks/RESULTS.md with --record.

    python benchmarks/rollout.py                      # tiny model built on the fly, CPU
    python benchmarks/rollout.py --model DIR --device cuda --frames 49 --height 432 --width 768
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import record  # noqa: E402
from rlhf.cli import configure_logging  # noqa: E402
from rlhf.generation import VideoGenerator  # noqa: E402
from rlhf.io import save_tensors  # noqa: E402
from rlhf.options import DEFAULT_NEGATIVE_PROMPT  # noqa: E402
from rollouts.config import RolloutConfig  # noqa: E402
from rollouts.rollout import run_rollout, sample_seed  # noqa: E402

PROMPTS = ["a red ball bouncing", "a calm lake at dawn", "a dog running on a beach", "city lights at night"]


def reference_loop(config: RolloutConfig, prompts: list[str], out: Path) -> None:
    """One pipeline-style call per video: encode both prompts, two passes per step, decode, save."""
    generator = VideoGenerator(config, max_sequence_length=config.max_sequence_length)
    sequential = RolloutConfig(**{**vars(config), "batch_cfg": False})
    for prompt in prompts:
        for index in range(config.samples_per_prompt):
            cond = generator.encode_prompts([prompt])
            uncond = generator.encode_prompts([config.negative_prompt])
            latents = generator.sample_latents(cond, uncond, [sample_seed(config.seed, prompt, index)], sequential,
                                               progress=False)
            generator.decode(latents)
            save_tensors(out / f"{len(list(out.iterdir()))}.safetensors", {"latents": latents[0]})


def breakdown(config: RolloutConfig, prompts: list[str]) -> dict[str, float]:
    """Seconds per stage of our path (same calls as the rollout stage, timed separately)."""
    timings = dict.fromkeys(("load", "encode", "sampler", "decode", "write"), 0.0)
    start = time.perf_counter()
    generator = VideoGenerator(config, max_sequence_length=config.max_sequence_length)
    timings["load"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        embeds = [generator.encode_prompts([p]) for p in prompts]
        uncond = generator.encode_prompts([config.negative_prompt])
        timings["encode"] = time.perf_counter() - start
        for prompt, cond in zip(prompts, embeds, strict=True):
            seeds = [sample_seed(config.seed, prompt, i) for i in range(config.samples_per_prompt)]
            start = time.perf_counter()
            latents = generator.sample_latents(cond, uncond, seeds, config, progress=False)
            timings["sampler"] += time.perf_counter() - start
            start = time.perf_counter()
            generator.decode(latents)
            timings["decode"] += time.perf_counter() - start
            start = time.perf_counter()
            for row, seed in enumerate(seeds):
                save_tensors(Path(tmp) / f"{seed}.safetensors", {"latents": latents[row].to(torch.bfloat16)})
            timings["write"] += time.perf_counter() - start
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: a tiny model built in a temp dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    configure_logging()
    logging.getLogger("contentv-rlhf").setLevel(logging.WARNING)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from rlhf.models.tiny import build_tiny_model

            model = str(build_tiny_model(tmp / "tiny-model"))
        prompt_file = tmp / "prompts.txt"
        prompt_file.write_text("\n".join(PROMPTS) + "\n")
        config = RolloutConfig(
            model=model, device=args.device, dtype=args.dtype, prompts=str(prompt_file), out=str(tmp / "store"),
            frames=args.frames, height=args.height, width=args.width, steps=args.steps, guidance=6.0,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT, samples_per_prompt=args.samples_per_prompt,
            batch_size=args.samples_per_prompt, save_frames=8,
        )
        samples = len(PROMPTS) * args.samples_per_prompt
        ours, reference = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            shutil.rmtree(tmp / "store", ignore_errors=True)
            start = time.perf_counter()
            run_rollout(config)
            ours.append(time.perf_counter() - start)
            ref_out = tmp / "reference"
            shutil.rmtree(ref_out, ignore_errors=True)
            ref_out.mkdir()
            start = time.perf_counter()
            reference_loop(config, PROMPTS, ref_out)
            reference.append(time.perf_counter() - start)
        parts = breakdown(config, PROMPTS)

    result = {
        "benchmark": "rollout",
        "device": args.device,
        "shape": f"{args.frames}x{args.height}x{args.width}, {args.steps} steps, cfg 6.0",
        "samples": samples,
        "ours_samples_per_s": round(samples / min(ours), 3),
        "reference_samples_per_s": round(samples / min(reference), 3),
        "speedup": round(min(reference) / min(ours), 2),
        "ours_breakdown_s": {k: round(v, 3) for k, v in parts.items()},
    }
    print(json.dumps(result, indent=2))
    if args.record:
        record("rollout", result)


if __name__ == "__main__":
    main()
