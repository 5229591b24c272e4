"""`contentv-rlhf score`: run the reward scorers over a rollout store."""

from __future__ import annotations

import argparse

from rlhf.config import add_config_arguments, config_from_args

HELP = "Score every sample of a rollout store with the configured reward scorers (resumable)."
EXAMPLES = """\
  contentv-rlhf score --store runs/rollout-r0 --config configs/rewards.yaml
  contentv-rlhf score --store runs/rollout-r0 --config configs/rewards.yaml --device cuda --batch-size 16
  contentv-rlhf score --store runs/rollout-r0 --config configs/rewards.yaml --rescore   # after changing options
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rewards.scoring import ScoreConfig

    add_config_arguments(parser, ScoreConfig)


def run(args: argparse.Namespace) -> int:
    from rewards.scoring import ScoreConfig, score_store

    summary = score_store(config_from_args(ScoreConfig, args))
    width = max(len(name) for name in summary)
    print(f"{'scorer':<{width}}  scored  mean       non-finite")
    for name, row in summary.items():
        mean = f"{row['mean']:.4f}" if row["mean"] is not None else "-"
        print(f"{name:<{width}}  {row['scored']:>6}  {mean:<9}  {len(row['non_finite'])}")
    return 0
