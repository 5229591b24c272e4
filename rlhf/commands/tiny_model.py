"""`contentv-rlhf tiny-model OUT_DIR`: write a tiny random ContentV-layout checkpoint."""

from __future__ import annotations

import argparse

HELP = "Write a tiny, randomly initialised ContentV-layout checkpoint (real classes, a few MB)."
EXAMPLES = """\
  contentv-rlhf tiny-model runs/tiny-model
  contentv-rlhf tiny-model runs/tiny-model --seed 1 --overwrite
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Directory to create (must not exist or be empty).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default: 0).")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR if it is not empty.")


def run(args: argparse.Namespace) -> int:
    from rlhf.models.tiny import build_tiny_model

    path = build_tiny_model(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote tiny ContentV checkpoint to {path} ({size / 1e6:.1f} MB, seed {args.seed})")
    return 0
