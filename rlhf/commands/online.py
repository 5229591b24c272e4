"""`contentv-rlhf online`: R rounds of rollout -> score -> pairs -> Flow-DPO, resumable."""

from __future__ import annotations

import argparse

from rlhf.config import add_config_arguments, config_from_args

HELP = "Online DPO: rounds of rollout with the current adapter -> score -> pairs -> train (resumable)."
EXAMPLES = """\
  contentv-rlhf online --config configs/online_dpo.yaml
  contentv-rlhf online --config configs/online_dpo.yaml --rounds 4 --reference previous
Rerun the same command after an interruption: finished rounds and stages are skipped and an unfinished
training resumes from its latest checkpoint.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpo.online import OnlineConfig

    add_config_arguments(parser, OnlineConfig)


def run(args: argparse.Namespace) -> int:
    from dpo.online import OnlineConfig, run_online

    config = config_from_args(OnlineConfig, args)
    run_online(config)
    print(f"online run finished: per-round summary in {config.out}/rounds.json")
    return 0
