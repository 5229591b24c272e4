"""`contentv-rlhf eval`: base vs tuned on the same held-out prompts and seeds; rewards, CIs, win rates."""

from __future__ import annotations

import argparse

from rlhf.config import add_config_arguments, config_from_args

HELP = "Compare the base model with LoRA adapters on held-out prompts and seeds (mean, 95% CI, win rate)."
EXAMPLES = """\
  contentv-rlhf eval --model /models/ContentV-8B --adapters runs/dpo-r0/adapter --prompts prompts/heldout.txt \\
      --seeds 4 --rewards configs/rewards.yaml --held-out-rewards configs/rewards_heldout.yaml --out runs/eval-r0
  contentv-rlhf eval --config configs/eval.yaml --adapters runs/dpo-r0/adapter,runs/dpo-r1/adapter
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlhf.evaluation import EvalConfig

    add_config_arguments(parser, EvalConfig)


def run(args: argparse.Namespace) -> int:
    from rlhf.evaluation import EvalConfig, format_table, run_eval

    config = config_from_args(EvalConfig, args)
    result = run_eval(config)
    print(format_table(result))
    print(f"eval written to {config.out}/eval.json")
    return 0
