"""`contentv-rlhf quickstart`: the whole loop on the shapes world, on any machine, in minutes.

rollout -> score -> pairs -> train (Flow-DPO) -> train (reward-gradient) -> merge -> eval -> report, on the
shipped world model
(`rlhf/world/weights`: a pretrained text-to-video generator in ContentV's classes and layout) with its
learned rewards (a world CLIP, an aesthetic head on it, the weight-free motion reward). Two trainers learn
from the same rewards, and the eval and the report put both beside the base: Flow-DPO (offline, on the
rollout's pairs: the product's main loop) and reward-gradient (online, through the rewards' gradients; README
"What the trainers do to it" compares them). Every stage is the
real command a user runs on ContentV-8B, called through the CLI entry point with the flags printed, and
reads the shipped `configs/world/` files; the eval scores the test colour-size combinations with the
trained rewards, weight-free held-out rewards and the world's oracle (ground truth no reward sees). The
stage configs are written to OUT/configs/ so the run can be repeated stage by stage. Finished stages are
skipped when the quickstart is rerun.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

HELP = "Run the whole pipeline end to end on the shipped shapes-world model (no downloads or GPU needed)."
EXAMPLES = """\
  contentv-rlhf quickstart
  contentv-rlhf quickstart --out runs/quickstart --device cpu
"""

MAX_TRAIN_STEPS = 1_000_000  # a toy run: days of CPU time
MAX_PROMPTS = 1_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="quickstart-out", help="Output directory (default: quickstart-out).")
    parser.add_argument("--device", default="auto", help="auto, cuda, npu or cpu (default: auto).")
    parser.add_argument("--seed", type=int, default=0, help="Seed index of the rollout and of training (the world's "
                        "\"rollout\" and \"training\" seed namespaces: rlhf.world.scene.seed).")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="Flow-DPO optimiser steps (default: configs/world/dpo.yaml's).")
    parser.add_argument("--reward-gradient-steps", type=int, default=None,
                        help="Reward-gradient optimiser steps (default: configs/world/reward_gradient.yaml's).")
    parser.add_argument("--train-prompts", type=int, default=None,
                        help="Use only the first N training prompts (default: all of configs/world/train_prompts.txt).")
    parser.add_argument("--samples-per-prompt", type=int, default=None,
                        help="K videos per training prompt (default: configs/world/rollout.yaml's).")
    parser.add_argument("--eval-seeds", type=int, default=None, help="Seeds per test prompt in the eval "
                        "(default: configs/world/eval.yaml's).")


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag is checked before the first file is written (the stages check their own configs later)."""
    from rlhf.errors import UserError
    from rlhf.io import output_path_problem
    from rlhf.options import device_name_problem

    if problem := output_path_problem(args.out, "dir"):
        raise UserError(f"--out {problem}")
    if problem := device_name_problem(args.device):
        raise UserError(f"--device {problem}")
    from rlhf.world.scene import SEED_BLOCK

    if not 0 <= args.seed < SEED_BLOCK:
        raise UserError(f"--seed must be in 0..{SEED_BLOCK - 1} (an index into the world's seed namespaces), "
                        f"got {args.seed}")
    limits = {"train_steps": MAX_TRAIN_STEPS, "reward_gradient_steps": MAX_TRAIN_STEPS, "train_prompts": MAX_PROMPTS,
              "samples_per_prompt": 1024, "eval_seeds": 1024}
    for name, high in limits.items():
        value = getattr(args, name)
        if value is not None and not 1 <= value <= high:
            raise UserError(f"--{name.replace('_', '-')} must be in 1..{high}, got {value}")
    if args.samples_per_prompt == 1:
        raise UserError("--samples-per-prompt must be >= 2: pairs need two samples of a prompt")


def world_configs() -> Path:
    """The shipped `configs/world/` folder of the repository this package runs from."""
    from rlhf.errors import UserError

    folder = Path(__file__).resolve().parents[2] / "configs" / "world"
    if not (folder / "rollout.yaml").is_file():
        raise UserError(f"{folder}: the shapes-world configs are missing; run the quickstart from a clone of the "
                        "repository installed with `pip install -e .`")
    return folder


def absolute_rewards(path: Path, root: Path, device: str) -> dict:
    """A world rewards/ground-truth YAML with its repository-relative weight paths made absolute."""
    import yaml

    config = yaml.safe_load(path.read_text())
    for entry in config["scorers"].values():
        for key in ("checkpoint", "clip_checkpoint", "head"):
            value = entry.get(key)
            if isinstance(value, str):
                prefix = "local-dir:" if value.startswith("local-dir:") else ""
                entry[key] = prefix + str(root / value.removeprefix(prefix))
    return {**config, "device": device}


def run(args: argparse.Namespace) -> int:
    import yaml

    from rlhf.cli import main as cli
    from rlhf.training import holds_run
    from rlhf.world import MODEL_DIR, scene

    check_arguments(args)
    shipped = world_configs()
    root = shipped.parents[1]
    out = Path(args.out)
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    train_prompts = (shipped / "train_prompts.txt").read_text().split("\n")
    train_prompts = [p for p in train_prompts if p.strip()][: args.train_prompts]
    (configs / "train_prompts.txt").write_text("\n".join(train_prompts) + "\n")
    (configs / "rewards.yaml").write_text(yaml.safe_dump(absolute_rewards(shipped / "rewards.yaml", root, args.device)))
    # reward-gradient trains on the reward its shipped config names (rewards.yaml plus a little `consistency`)
    gradient_rewards = root / yaml.safe_load((shipped / "reward_gradient.yaml").read_text())["rewards"]
    (configs / "rewards_gradient.yaml").write_text(yaml.safe_dump(absolute_rewards(gradient_rewards, root, args.device)))
    (configs / "held_out_rewards.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load((root / "configs" / "rewards_heldout.yaml").read_text()), "device": args.device}))
    (configs / "ground_truth.yaml").write_text(
        yaml.safe_dump(absolute_rewards(shipped / "ground_truth.yaml", root, args.device)))

    world_batch = yaml.safe_load((shipped / "rollout.yaml").read_text())["batch_size"]
    paths = {name: out / name for name in ("rollout", "pairs", "train", "reward_gradient", "merged", "eval")}
    # The two trainers' adapters go in the eval config as a list (no splitting of --adapters at commas in --out).
    adapters = [str(paths[trained] / "adapter") for trained in ("train", "reward_gradient")]
    (configs / "eval.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load((shipped / "eval.yaml").read_text()), "adapters": adapters}))
    device = ["--device", args.device]
    optional = lambda flag, value: [flag, value] if value is not None else []  # noqa: E731
    resume = lambda folder: ["--resume-from", "latest"] if holds_run(folder) else []  # noqa: E731  (continue an interrupted run)
    training_seed = scene.seed("training", args.seed)
    stages = [
        ("rollout", paths["rollout"] / "manifest.parquet",
         ["rollout", "--config", shipped / "rollout.yaml", "--model", MODEL_DIR, "--prompts",
          configs / "train_prompts.txt", "--out", paths["rollout"], "--seed", scene.seed("rollout", args.seed),
          *device,
          *optional("--samples-per-prompt", args.samples_per_prompt),
          # a batch holds one prompt's samples at most
          *optional("--batch-size", args.samples_per_prompt and min(args.samples_per_prompt, world_batch))]),
        ("score", None, ["score", "--store", paths["rollout"], "--config", configs / "rewards.yaml"]),
        ("pairs", paths["pairs"] / "summary.json",
         ["pairs", "--store", paths["rollout"], "--out", paths["pairs"], "--config", shipped / "pairs.yaml"]),
        ("train (Flow-DPO)", paths["train"] / "adapter" / "adapter_model.safetensors",
         ["train", "--config", shipped / "dpo.yaml", "--pairs", paths["pairs"], "--output-dir", paths["train"],
          "--seed", training_seed, *device, *optional("--max-steps", args.train_steps), *resume(paths["train"])]),
        ("train (reward-gradient)", paths["reward_gradient"] / "adapter" / "adapter_model.safetensors",
         ["train", "--config", shipped / "reward_gradient.yaml", "--model", MODEL_DIR, "--prompts",
          configs / "train_prompts.txt", "--rewards", configs / "rewards_gradient.yaml", "--output-dir",
          paths["reward_gradient"], "--seed", training_seed, *device,
          *optional("--max-steps", args.reward_gradient_steps), *resume(paths["reward_gradient"])]),
        ("merge", paths["merged"] / "model_index.json",
         ["merge", "--model", MODEL_DIR, "--adapter", paths["train"] / "adapter", "--out", paths["merged"]]),
        ("eval", paths["eval"] / "eval.json",
         ["eval", "--config", configs / "eval.yaml", "--model", MODEL_DIR,
          "--prompts", shipped / "test_prompts.txt", "--rewards", configs / "rewards.yaml",
          "--held-out-rewards", configs / "held_out_rewards.yaml", "--ground-truth", configs / "ground_truth.yaml",
          "--out", paths["eval"], *device, *optional("--seeds", args.eval_seeds)]),
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
    report = ["report", "--run", str(out), "--overwrite"]  # the quickstart's own page, from its last run
    print(f"[{len(stages) + 1}/{len(stages) + 1}] report: contentv-rlhf {shlex.join(report)}", flush=True)
    status = cli(report)
    if status == 0:
        print(f"quickstart finished: open {out / 'report.html'}")
    return status
