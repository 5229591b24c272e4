"""What one round of data costs on the shapes world, before and after three changes, side by side in one run.

An online round (`configs/world/online_dpo.yaml`) samples 4 videos for each of the 40 training prompts and scores
them; its training gets what is left of the budget. Three parts of that data path are timed both ways, each pair
interleaved over `--repeats` (the best of each kept), on the same prompts and seeds:

1. denoising: one prompt's 4 samples per batch (the rollout's units before they could span prompts) against
   `--batch-size` samples across prompts (the world's rollout.yaml);
2. VAE decoding: diffusers' `WanRMS_norm` against the loader's CPU-friendly one (`rlhf.models.wan_vae`);
3. the `motion` reward's Lucas-Kanade window sums: 1-D convolutions with a kernel of ones against running sums
   (`rewards.flow._box`), through the whole `motion` scorer.

Each pair's outputs are compared (latents, decoded frames, motion scores) so a speed-up is never a change of
result. Prints one JSON row; `--record` appends it to benchmarks/RESULTS.md.

    python benchmarks/world_round_costs.py --record        # ~2 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import record  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "world"


def conv_box(image: torch.Tensor, window: int) -> torch.Tensor:
    """The former `rewards.flow._box`: window sums as two 1-D convolutions with a kernel of ones."""
    batch, channels, height, width = image.shape
    pad = window // 2
    ones = image.new_ones(1, 1, 1, window)

    def window_sums(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, ones, padding=(0, pad)), ones.view(1, 1, window, 1), padding=(pad, 0))

    sums = window_sums(image.reshape(batch * channels, 1, height, width))
    return (sums / window_sums(image.new_ones(1, 1, height, width))).view(batch, channels, height, width)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    import rewards.flow
    from rewards.build import build_scorers, score_videos
    from rlhf.generation import VideoGenerator
    from rlhf.models.wan_vae import cpu_friendly_rms_norm
    from rlhf.options import ModelOptions, SamplingOptions
    from rlhf.sampling import PromptEmbeds
    from rlhf.video import to_scorer_frames
    from rlhf.world import MODEL_DIR
    from rollouts.rollout import sample_seed

    rollout = yaml.safe_load((CONFIGS / "rollout.yaml").read_text())
    sampling = SamplingOptions(**{k: rollout[k] for k in ("frames", "height", "width", "steps", "guidance",
                                                          "negative_prompt")})
    generator = VideoGenerator(ModelOptions(model=str(MODEL_DIR), device="cpu", dtype=rollout["dtype"]))
    prompts = [line.strip() for line in (CONFIGS / "train_prompts.txt").read_text().splitlines() if line.strip()]
    embeds = [generator.encode_prompts([p]) for p in prompts]
    uncond = generator.encode_prompts([sampling.negative_prompt])
    k = args.samples_per_prompt
    rows = [(p, e, sample_seed(rollout["seed"], p, i)) for p, e in zip(prompts, embeds, strict=True) for i in range(k)]

    def denoise(batch: int) -> torch.Tensor:
        return torch.cat([generator.sample_latents(PromptEmbeds.cat([e for _, e, _ in rows[i:i + batch]]), uncond,
                                                   [s for _, _, s in rows[i:i + batch]], sampling, progress=False)
                          for i in range(0, len(rows), batch)])

    norms = [m for m in generator.vae.modules() if isinstance(m, WanRMS_norm)]

    def decode(norm_class: type, latents: torch.Tensor) -> torch.Tensor:
        for module in norms:
            module.__class__ = norm_class
        return torch.cat([generator.decode(latents[i:i + args.batch_size])
                          for i in range(0, len(latents), args.batch_size)])

    scorers = build_scorers({"scorers": {"motion": yaml.safe_load((CONFIGS / "rewards.yaml").read_text())
                                         ["scorers"]["motion"]}, "device": "cpu"})
    new_box = rewards.flow._box

    def motion(box, video: torch.Tensor) -> torch.Tensor:
        rewards.flow._box = box
        try:
            with torch.no_grad():
                return score_videos(scorers, to_scorer_frames(video), [p for p, _, _ in rows], batch_size=16)["motion"]
        finally:
            rewards.flow._box = new_box

    seconds: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved: drift in machine load hits both sides alike
        before_latents, t0 = timed(denoise, k)
        latents, t1 = timed(denoise, args.batch_size)
        before_video, t2 = timed(decode, WanRMS_norm, latents)
        video, t3 = timed(decode, cpu_friendly_rms_norm(), latents)
        before_motion, t4 = timed(motion, conv_box, video)
        after_motion, t5 = timed(motion, new_box, video)
        for name, value in zip(("denoise_per_prompt", "denoise_across_prompts", "decode_diffusers_norm",
                                "decode_cpu_friendly_norm", "motion_conv_sums", "motion_running_sums"),
                               (t0, t1, t2, t3, t4, t5), strict=True):
            seconds.setdefault(name, []).append(value)
    best = {name: round(min(values), 2) for name, values in seconds.items()}
    result = {
        "benchmark": "world_round_costs",
        "videos": len(rows),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "seconds_best_of": args.repeats,
        "seconds": best,
        "speedups": {
            "denoise": round(best["denoise_per_prompt"] / best["denoise_across_prompts"], 2),
            "decode": round(best["decode_diffusers_norm"] / best["decode_cpu_friendly_norm"], 2),
            "motion": round(best["motion_conv_sums"] / best["motion_running_sums"], 2),
            "all_three": round((best["denoise_per_prompt"] + best["decode_diffusers_norm"] + best["motion_conv_sums"])
                               / (best["denoise_across_prompts"] + best["decode_cpu_friendly_norm"]
                                  + best["motion_running_sums"]), 2),
        },
        "same_results": {
            "latents_max_abs_diff": float((before_latents - latents).abs().max()),
            "frames_max_abs_diff": float((before_video - video).abs().max()),
            "motion_max_abs_diff": float((before_motion - after_motion).abs().max()),
        },
    }
    print(json.dumps(result, indent=2))
    if args.record:
        record("world_round_costs", result)


if __name__ == "__main__":
    main()
