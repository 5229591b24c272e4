"""`contentv-rlhf train`: train a LoRA adapter (Flow-DPO; more methods as they land)."""

from __future__ import annotations

import argparse

from rlhf.config import add_config_arguments, config_from_args

HELP = "Train a LoRA adapter on the transformer (method: dpo) from a pairs dataset."
EXAMPLES = """\
  contentv-rlhf train --config configs/dpo.yaml
  contentv-rlhf train --config configs/dpo.yaml --learning-rate 5e-5 --max-steps 500 --output-dir runs/dpo2
  contentv-rlhf train --config configs/dpo.yaml --resume-from latest
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m rlhf.cli train --config configs/dpo.yaml
  torchrun --nproc_per_node 2 -m rlhf.cli train --config configs/dpo.yaml --device cpu    # 2 CPU processes
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpo.config import DPOConfig

    add_config_arguments(parser, DPOConfig)


def run(args: argparse.Namespace) -> int:
    from dpo.config import DPOConfig

    config = config_from_args(DPOConfig, args)
    from dpo.trainer import train_dpo

    adapter = train_dpo(config)
    print(f"adapter written to {adapter}")
    return 0
