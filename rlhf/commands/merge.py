"""`contentv-rlhf merge`: fuse LoRA adapters into the transformer and write a complete release checkpoint."""

from __future__ import annotations

import argparse
import math

from rlhf.errors import UserError
from rlhf.io import output_path_problem
from rlhf.options import MAX_ADAPTER_SCALE

HELP = "Fuse one or more LoRA adapters into the transformer and write a complete checkpoint (same layout)."
EXAMPLES = """\
  contentv-rlhf merge --model ContentV-8B --adapter runs/dpo/adapter --out ContentV-8B-dpo
  contentv-rlhf merge --model ContentV-8B --adapter runs/dpo/adapter --adapter runs/reward/adapter \\
      --weight 0.5 --weight 1.5 --out ContentV-8B-mix --overwrite
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Checkpoint directory (diffusers layout).")
    parser.add_argument("--family", metavar="NAME", help="Model family of --model (default: the one its "
                        "model_index.json names; docs/models.md).")
    parser.add_argument(
        "--adapter", required=True, action="append", metavar="DIR",
        help="LoRA adapter directory (peft or diffusers format); repeat to merge several, in order.",
    )
    parser.add_argument(
        "--weight", action="append", type=float, metavar="W",
        help=f"Multiplier of an adapter's update, -{MAX_ADAPTER_SCALE}..{MAX_ADAPTER_SCALE} (default 1.0); give it "
        "once per --adapter, in the same order.",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR",
        help="Output checkpoint directory. Other components are hard-linked to the model's files when on "
        "the same filesystem (else copied); built in a temporary sibling and renamed into place.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace the model checkpoint in --out (never a folder of another kind).")


def check_arguments(args: argparse.Namespace) -> None:
    """Bad weights or an --out of the wrong kind fail here, before the model is read."""
    for weight in args.weight or []:
        if not math.isfinite(weight):  # a NaN weight would fuse into a checkpoint of NaN weights
            raise UserError(f"--weight expects a finite number, got {weight}")
        if abs(weight) > MAX_ADAPTER_SCALE:
            raise UserError(f"--weight must be in -{MAX_ADAPTER_SCALE}..{MAX_ADAPTER_SCALE}, got {weight}")
    if problem := output_path_problem(args.out, "dir"):
        raise UserError(f"--out {problem}")


def run(args: argparse.Namespace) -> int:
    from rlhf.merge import merge_adapters

    check_arguments(args)

    summary = merge_adapters(args.model, args.adapter, args.out, weights=args.weight, overwrite=args.overwrite,
                             family=args.family)
    print(summary.describe())
    return 0
