"""`contentv-rlhf rollout`: sample K videos per prompt into a resumable rollout store."""

from __future__ import annotations

import argparse

from rlhf.config import add_config_arguments, config_from_args

HELP = "Sample K videos per prompt into a resumable, multi-process rollout store."
EXAMPLES = """\
  contentv-rlhf rollout --config configs/rollout.yaml
  contentv-rlhf rollout --config configs/rollout.yaml --samples-per-prompt 8 --out runs/r1
  contentv-rlhf rollout --config configs/rollout.yaml --num-processes 4      # 4 local processes
  torchrun --nproc_per_node 8 -m rlhf.cli rollout --config configs/rollout.yaml
  accelerate launch --num_processes 8 -m rlhf.cli rollout --config configs/rollout.yaml
Rerunning the same command after an interruption completes only the missing samples.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rollouts.config import RolloutConfig

    add_config_arguments(parser, RolloutConfig)


def run(args: argparse.Namespace) -> int:
    from rlhf.distributed import launched_world_size, relaunch_with_torchrun
    from rollouts.config import RolloutConfig
    from rollouts.rollout import run_rollout

    config = config_from_args(RolloutConfig, args)
    if config.num_processes > 1 and launched_world_size() == 1:
        argv = [*args.argv, "--num-processes", "1"]
        return relaunch_with_torchrun(config.num_processes, argv)
    run_rollout(config)
    return 0
