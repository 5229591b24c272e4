"""`contentv-rlhf quickstart`: the whole loop on the tiny default model, on any machine, in minutes.

Every stage calls the same code a user runs on ContentV-8B; only the model is tiny. Stages that later
issues add (rollout, score, pairs, train, merge, eval, report) join this list as they land.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "Run the pipeline end to end on a tiny random model (no weights or GPU needed)."
EXAMPLES = """\
  contentv-rlhf quickstart
  contentv-rlhf quickstart --out runs/quickstart --device cpu
"""

PROMPTS = ("a red ball bouncing on grass", "a calm blue lake at sunset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="quickstart-out", help="Output directory (default: quickstart-out).")
    parser.add_argument("--device", default="auto", help="auto, cuda, npu or cpu (default: auto).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny model and the samples.")


def _stage(number: int, title: str) -> float:
    print(f"[{number}] {title}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    from rlhf.cli import main as cli_main
    from rlhf.models.loader import check_model_dir

    out = Path(args.out)
    model_dir = out / "tiny-model"

    start = _stage(1, f"tiny model -> {model_dir}")
    if (model_dir / "model_index.json").exists():
        check_model_dir(model_dir)
        print(f"    reusing {model_dir}")
    elif cli_main(["tiny-model", str(model_dir), "--seed", str(args.seed)]) != 0:
        return 2
    print(f"    done in {time.perf_counter() - start:.1f}s")

    start = _stage(2, f"generate {len(PROMPTS)} videos -> {out / 'samples'}")
    for index, prompt in enumerate(PROMPTS):
        status = cli_main([
            "generate", "--model", str(model_dir), "--device", args.device, "--dtype", "fp32",
            "--prompt", prompt, "--out", str(out / "samples" / f"sample_{index}.mp4"),
            "--frames", "17", "--height", "64", "--width", "64", "--steps", "8", "--guidance", "4",
            "--fps", "8", "--seed", str(args.seed + index),
        ])
        if status != 0:
            return status
    print(f"    done in {time.perf_counter() - start:.1f}s")
    print(f"quickstart finished: outputs in {out}")
    return 0
