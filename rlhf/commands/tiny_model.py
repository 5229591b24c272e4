"""`contentv-rlhf tiny-model OUT_DIR [--family F]`: write a tiny random checkpoint of a model family."""

from __future__ import annotations

import argparse

from rlhf.errors import UserError
from rlhf.io import output_path_problem

MAX_SEED = 2**32 - 1
HELP = ("Write a tiny, randomly initialised checkpoint (ContentV, Wan2.1, Wan2.2 TI2V or Wan2.2 A14B layout, or HunyuanVideo's; real "
        "classes, a few MB).")
# rlhf.models.tiny.TINY_FAMILIES, repeated so that `--help` imports no torch
TINY_FAMILIES = ("contentv", "wan2.1", "wan2.2-ti2v", "wan2.2-a14b", "hunyuanvideo")
EXAMPLES = """\
  contentv-rlhf tiny-model runs/tiny-model
  contentv-rlhf tiny-model runs/tiny-wan --family wan2.1
  contentv-rlhf tiny-model runs/tiny-hunyuan --family hunyuanvideo
  contentv-rlhf tiny-model runs/tiny-model --seed 1 --overwrite
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Directory to create (must not exist, be empty, or with --overwrite hold a model).")
    parser.add_argument("--seed", type=int, default=0, help=f"Seed of the random weights, 0..{MAX_SEED} (default: 0).")
    parser.add_argument("--family", choices=TINY_FAMILIES, default="contentv",
                        help="Model family whose diffusers layout and classes to write (default: contentv; wan2.1 "
                        "wan2.2-ti2v and wan2.2-a14b write WanPipeline's layout; hunyuanvideo HunyuanVideoPipeline's).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the model checkpoint in OUT_DIR (never a folder of another kind).")


def check_arguments(args: argparse.Namespace) -> None:
    """A seed torch cannot take or an OUT_DIR of the wrong kind fails here, before any weight is drawn."""
    if not 0 <= args.seed <= MAX_SEED:  # each component is seeded with seed * 1000 + index (torch's int64)
        raise UserError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if problem := output_path_problem(args.out_dir, "dir"):
        raise UserError(f"OUT_DIR {problem}")


def run(args: argparse.Namespace) -> int:
    from rlhf.models.tiny import build_tiny_model

    check_arguments(args)

    path = build_tiny_model(args.out_dir, seed=args.seed, overwrite=args.overwrite, family=args.family)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    name = {"contentv": "ContentV", "wan2.1": "Wan2.1", "wan2.2-ti2v": "Wan2.2 TI2V", "wan2.2-a14b": "Wan2.2 A14B",
            "hunyuanvideo": "HunyuanVideo"}[args.family]
    print(f"wrote tiny {name} checkpoint to {path} ({size / 1e6:.1f} MB, seed {args.seed})")
    return 0
