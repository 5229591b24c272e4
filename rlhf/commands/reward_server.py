"""`contentv-rlhf reward-server`: serve the scorers of a rewards YAML over HTTP (rewards/server.py)."""

from __future__ import annotations

import argparse

from rlhf.config import add_config_arguments, config_from_args

HELP = ("Load the scorers of a rewards YAML once and serve batched scores over HTTP; a scorer entry "
        "`remote: http://host:port` in any rewards YAML scores there.")
EXAMPLES = """\
  contentv-rlhf reward-server --rewards configs/world/rewards.yaml --port 8765
  contentv-rlhf reward-server --rewards configs/rewards.yaml --host 0.0.0.0 --port 8765   # other machines too
  # then, in a rewards YAML:  scorers: {clip: {remote: "http://127.0.0.1:8765", weight: 1.0}}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rewards.server import RewardServerConfig

    add_config_arguments(parser, RewardServerConfig)


def run(args: argparse.Namespace) -> int:
    from rewards.server import RewardServerConfig, serve

    return serve(config_from_args(RewardServerConfig, args))
