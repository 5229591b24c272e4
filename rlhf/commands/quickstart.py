"""`contentv-rlhf quickstart`: the whole loop on the tiny default model, on any machine, in minutes.

tiny model -> rollout -> score -> pairs -> train (Flow-DPO) -> merge -> eval -> report. Every stage is the
real command a user runs on ContentV-8B (called through the CLI entry point with the flags printed); only the
model is tiny and the rewards are weight-free. The stage configs are written to OUT/configs/ so the run can
be repeated stage by stage. Finished stages are skipped when the quickstart is rerun.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

HELP = "Run the whole pipeline end to end on a tiny random model (no weights or GPU needed)."
EXAMPLES = """\
  contentv-rlhf quickstart
  contentv-rlhf quickstart --out runs/quickstart --device cpu
"""

# Training prompts and held-out evaluation prompts (disjoint), as in a real run.
_SUBJECTS = ["a red ball", "a blue lake", "a dog", "city lights", "a sailboat", "snow", "a candle", "clouds",
             "a cat", "rain", "a balloon", "waves"]
TRAIN_PROMPTS = [f"{s} {where}" for where in ("at night", "in the morning") for s in _SUBJECTS]
EVAL_PROMPTS = ["a yellow taxi in traffic", "a horse galloping in a field", "fireworks over a river",
                "a child flying a kite", "leaves blowing in autumn wind", "a train crossing a bridge"]
# The trained reward and held-out ones (weight-free scorers, so nothing needs downloading).
REWARDS = {"scorers": {"brightness": {"weight": 1.0}}}
HELD_OUT_REWARDS = {"scorers": {"colorfulness": {"weight": 1.0}, "contrast": {"weight": 1.0}}}
SAMPLES_PER_PROMPT = 8  # K: best-of-K from the base is the toy benchmark's bar
EVAL_SEEDS = 2 * SAMPLES_PER_PROMPT
MAX_TRAIN_STEPS = 1_000_000  # a toy run: days of CPU time
# 5 frames (2 latent frames) at 32x32 keep every stage a few seconds on a CPU.
SAMPLING = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "8", "--guidance", "4", "--fps", "8"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="quickstart-out", help="Output directory (default: quickstart-out).")
    parser.add_argument("--device", default="auto", help="auto, cuda, npu or cpu (default: auto).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the tiny model and the rollout.")
    parser.add_argument("--train-steps", type=int, default=600, help="Flow-DPO optimiser steps (default: 600).")


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag is checked before the first file is written (the stages check their own configs later)."""
    from rlhf.commands.tiny_model import MAX_SEED
    from rlhf.errors import UserError
    from rlhf.io import output_path_problem
    from rlhf.options import device_name_problem

    if problem := output_path_problem(args.out, "dir"):
        raise UserError(f"--out {problem}")
    if problem := device_name_problem(args.device):
        raise UserError(f"--device {problem}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if not 1 <= args.train_steps <= MAX_TRAIN_STEPS:
        raise UserError(f"--train-steps must be in 1..{MAX_TRAIN_STEPS}, got {args.train_steps}")


def run(args: argparse.Namespace) -> int:
    import yaml

    from rlhf.cli import main as cli

    check_arguments(args)
    out = Path(args.out)
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    (configs / "train_prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (configs / "eval_prompts.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    (configs / "rewards.yaml").write_text(yaml.safe_dump({**REWARDS, "device": args.device}))
    (configs / "held_out_rewards.yaml").write_text(yaml.safe_dump({**HELD_OUT_REWARDS, "device": args.device}))
    from rlhf.training import holds_run

    paths = {name: out / name for name in ("tiny-model", "rollout", "pairs", "train", "merged", "eval")}
    common = ["--device", args.device, "--dtype", "fp32"]
    stages = [
        ("tiny model", paths["tiny-model"] / "model_index.json",
         ["tiny-model", paths["tiny-model"], "--seed", args.seed]),
        ("rollout", paths["rollout"] / "manifest.parquet",
         ["rollout", "--model", paths["tiny-model"], "--prompts", configs / "train_prompts.txt",
          "--out", paths["rollout"], "--samples-per-prompt", SAMPLES_PER_PROMPT, "--batch-size", SAMPLES_PER_PROMPT,
          "--save-frames", "4",
          "--seed", args.seed, *SAMPLING, *common]),
        ("score", None, ["score", "--store", paths["rollout"], "--config", configs / "rewards.yaml"]),
        ("pairs", paths["pairs"] / "summary.json",
         ["pairs", "--store", paths["rollout"], "--out", paths["pairs"], "--policy", "all_above_margin",
          "--min-margin", "1.0"]),
        ("train (Flow-DPO)", paths["train"] / "adapter" / "adapter_model.safetensors",
         ["train", "--pairs", paths["pairs"], "--output-dir", paths["train"], "--max-steps", args.train_steps,
          "--learning-rate", "2e-3", "--beta", "2", "--batch-size", "4", "--lora-rank", "8", "--lora-alpha", "8",
          "--mixed-precision", "no", "--no-gradient-checkpointing", "--save-every", "100",
          "--report-to", "none", "--seed", args.seed, *common,
          *(["--resume-from", "latest"] if holds_run(paths["train"]) else [])]),  # continue an interrupted one
        ("merge", paths["merged"] / "model_index.json",
         ["merge", "--model", paths["tiny-model"], "--adapter", paths["train"] / "adapter", "--out", paths["merged"]]),
        ("eval", paths["eval"] / "eval.json",
         ["eval", "--model", paths["tiny-model"], "--adapters", paths["train"] / "adapter",
          "--prompts", configs / "eval_prompts.txt", "--seeds", EVAL_SEEDS, "--rewards", configs / "rewards.yaml",
          "--held-out-rewards", configs / "held_out_rewards.yaml", "--out", paths["eval"], *SAMPLING, *common]),
    ]
    for number, (title, done_marker, argv) in enumerate(stages, 1):
        argv = [str(a) for a in argv]
        print(f"[{number}/{len(stages) + 1}] {title}: contentv-rlhf {shlex.join(argv)}", flush=True)
        if done_marker is not None and done_marker.exists():
            print(f"    already done ({done_marker})")
            continue
        start = time.perf_counter()
        status = cli(argv)
        if status != 0:
            return status
        print(f"    done in {time.perf_counter() - start:.1f}s", flush=True)

    from rlhf.report import write_run_manifest

    write_run_manifest(out, store=paths["rollout"], pairs=paths["pairs"], train=paths["train"], eval=paths["eval"])
    report = ["report", "--run", str(out)]
    print(f"[{len(stages) + 1}/{len(stages) + 1}] report: contentv-rlhf {shlex.join(report)}", flush=True)
    status = cli(report)
    if status == 0:
        print(f"quickstart finished: open {out / 'report.html'}")
    return status
