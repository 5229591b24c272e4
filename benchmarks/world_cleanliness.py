"""Where trained adapters lose the oracle's cleanliness, and which reward could have seen it.

For the base and each `--adapter NAME=PATH` (adapters trained on the world, e.g. a `world_alignment.py --out`
run's), this samples every prompt of `--split` (validation by default: a diagnostic informs choices, so it never
reads the test split unless asked) with `--seeds` seeds, the ones `world_alignment.py` evaluates that split with,
and reads each video with the oracle's cleanliness factors (`rlhf.world.oracle.cleanliness_parts`: single object,
black background, sharp edge, hue and area steady across frames) and with every scorer of `--rewards` (default:
the world's rewards plus `consistency`). It prints per model the mean of every factor and reward, and, over all models' videos, the
Pearson correlation of each factor with each reward: pooled, and within a prompt (scores centred per prompt and
model, what a pair of one prompt's samples compares).

    python benchmarks/world_cleanliness.py --adapter online=RUN/seed0/dpo_online/run/round-01/train/adapter \
        [--split validation] [--seeds 4] [--rewards configs/world/rewards_consistency.yaml] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402
from benchmarks.world_alignment import CONFIGS, WorldEvaluator, evaluation_splits  # noqa: E402


def correlations(rows: dict[str, np.ndarray], factors: list[str], rewards: list[str],
                 groups: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Pearson r of each factor with each reward over all videos (`pooled`) and after subtracting each group's
    mean from both (`within_prompt`; a group is one prompt of one model)."""
    def centred(values: np.ndarray) -> np.ndarray:
        means = {group: values[groups == group].mean() for group in np.unique(groups)}
        return values - np.array([means[group] for group in groups])

    def pearson(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")

    return {kind: {factor: {reward: round(pearson(transform(rows[factor]), transform(rows[reward])), 3)
                            for reward in rewards} for factor in factors}
            for kind, transform in (("pooled", lambda v: v), ("within_prompt", centred))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a trained adapter folder to compare with the base (repeatable)")
    parser.add_argument("--split", choices=("train", "validation", "test"), default="validation",
                        help="prompts and seed namespace (default: validation)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default: 4)")
    parser.add_argument("--rewards", default=str(CONFIGS / "rewards_consistency.yaml"),
                        help="rewards YAML whose scorers are correlated with the factors")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    adapters = {}
    for item in args.adapter:
        name, _, path = item.partition("=")
        if not name or not Path(path).is_dir():
            raise SystemExit(f"--adapter: expected NAME=PATH of an adapter folder, got {item!r}")
        adapters[name] = Path(path)

    from rewards.build import score_videos
    from rlhf.video import to_scorer_frames, to_uint8_frames
    from rlhf.world.oracle import CLEANLINESS_PARTS, cleanliness_parts

    start = time.perf_counter()
    evaluator = WorldEvaluator(adapters, args.device, rewards=Path(args.rewards))
    # world_alignment's prompts and seeds for the split (the train split with its test-namespace seeds).
    reported = "test" if args.split == "train" else args.split
    prompts, seeds = evaluation_splits(reported, args.seeds, args.seeds)[args.split]
    factors, rewards = [*CLEANLINESS_PARTS, "cleanliness"], list(evaluator.scorers)
    rows: dict[str, list[float]] = {name: [] for name in (*factors, *rewards)}
    groups, means = [], {}
    for model in ["base", *adapters]:
        evaluator.use(None if model == "base" else model)
        first = len(groups)
        for chunk_prompts, video in evaluator.videos(prompts, seeds):
            frames = to_scorer_frames(video)  # (B, T, 3, H, W) in [0, 1]
            scores = score_videos(evaluator.scorers, frames, chunk_prompts)
            for index, clip in enumerate(video):
                for name, value in cleanliness_parts(to_uint8_frames(clip)).items():
                    rows[name].append(value)
                for name in rewards:
                    rows[name].append(float(scores[name][index]))
                groups.append(f"{model}\0{chunk_prompts[index]}")
        means[model] = {name: round(float(np.mean(values[first:])), 4) for name, values in rows.items()}
    arrays = {name: np.array(values) for name, values in rows.items()}
    result = {"benchmark": "world_cleanliness", "split": args.split, "videos_per_model": len(prompts) * len(seeds),
              "adapters": {name: str(path) for name, path in adapters.items()}, "means": means,
              "correlation": correlations(arrays, factors, rewards, np.array(groups)),
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result, indent=2))
    if args.record:
        record("world_cleanliness", result)


if __name__ == "__main__":
    main()
