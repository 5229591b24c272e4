"""World alignment: does a trainer make the shapes-world generator follow prompts better, by the oracle?

On the shipped world model (`rlhf/world/weights`), with the shipped world configs (`configs/world/`, no
per-run tuning), runs the real pipeline through the CLI: rollout (K samples per training prompt) -> score
(learned CLIP + aesthetic + motion) -> pairs -> train Flow-DPO; and train the reward-gradient and the online
GRPO trainers on the same prompts and rewards. Then, on held-out colour-shape combinations and on training combinations, with
seeds never used in training, compares per method:

- `base`: the pretrained generator;
- `best_of_K`: K base samples per prompt and seed (the base's own sample among them), the one the trained
  reward ranks first (K = the rollout's samples per prompt);
- `dpo`, `reward_gradient`, `grpo`: the trained adapters (each trainer's shipped world config), each trained
  within the same wall-time budget (`--budget-seconds`; Flow-DPO's data stages count against it).

Per method and split: the trained reward (the rewards config's weighted sum) and each reward's mean; the
oracle's accuracy on colour, shape, direction, colour+shape and all three, and its cleanliness; the win
rate against the base on the trained reward (same prompt and seed); the reward-hacking gap (trained-reward
gain minus colour+shape-accuracy gain, each in units of the base's standard deviation: positive when the
reward rose more than the ground truth did); and the wall time the method cost. Seed-to-seed noise of the
base (the std over seed indices of the per-seed mean) is reported for direction accuracy, cleanliness and
colour+shape accuracy, and each method's colour+shape gain comes with its paired standard error.
Prints one JSON row per method and split; `--record` appends them, with the command, to RESULTS.md.

    python benchmarks/world_alignment.py [--out DIR] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402

CONFIGS = ROOT / "configs" / "world"
ATTRIBUTES = ("colour", "shape", "direction", "colour_shape", "all")
EVAL_SEED_OFFSET = 500_000  # rollout seeds are derived from (seed, prompt, index) far below this
VIDEOS_PER_BATCH = 16
ASKED, READ = "shape_asked:", "shape_read:"  # per-video indicator arrays behind the shape confusion


def run_stage(argv: list[str]) -> float:
    """Run one CLI stage; return its wall time. Stops the benchmark if the stage fails."""
    from rlhf.cli import main as cli

    start = time.perf_counter()
    argv = [str(a) for a in argv]
    print("contentv-rlhf " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        raise SystemExit(f"stage failed: contentv-rlhf {' '.join(argv)}")
    return time.perf_counter() - start


def train_all(out: Path, device: str, budget: float) -> dict[str, dict]:
    """The pipeline with the shipped configs, each method within `budget` seconds of wall time (Flow-DPO's
    rollout, scoring and pairs count against its budget; a trainer stops at its config's max_steps or at the
    first step that ends past its budget, `max_seconds`); returns each method's adapter, the seconds it cost
    and the optimiser steps it ran."""
    common = ["--device", device]
    rollout_s = run_stage(["rollout", "--config", CONFIGS / "rollout.yaml", "--out", out / "rollout", *common])
    score_s = run_stage(["score", "--store", out / "rollout", "--config", CONFIGS / "rewards.yaml"])
    pairs_s = run_stage(["pairs", "--store", out / "rollout", "--out", out / "pairs", "--config", CONFIGS / "pairs.yaml"])
    data_s = rollout_s + score_s + pairs_s
    dpo_s = run_stage(["train", "--config", CONFIGS / "dpo.yaml", "--pairs", out / "pairs", "--output-dir", out / "dpo",
                       "--overwrite", "--max-seconds", max(budget - data_s, 1.0), *common])
    rg_s = run_stage(["train", "--config", CONFIGS / "reward_gradient.yaml", "--output-dir", out / "reward_gradient",
                      "--overwrite", "--max-seconds", budget, *common])
    grpo_s = run_stage(["train", "--config", CONFIGS / "grpo.yaml", "--output-dir", out / "grpo", "--overwrite",
                        "--max-seconds", budget, *common])

    def steps(run: str) -> dict:
        summary = json.loads((out / run / "summary.json").read_text())
        return {"steps_done": summary["steps_done"], "max_steps": summary["steps"],
                "stopped_by_budget": summary["stopped_by_max_seconds"]}

    return {
        "dpo": {"adapter": out / "dpo" / "adapter", "seconds": {"rollout_score_pairs": data_s, "train": dpo_s},
                **steps("dpo")},
        "reward_gradient": {"adapter": out / "reward_gradient" / "adapter", "seconds": {"train": rg_s},
                            **steps("reward_gradient")},
        "grpo": {"adapter": out / "grpo" / "adapter", "seconds": {"train_with_online_rollouts": grpo_s},
                 **steps("grpo")},
    }


class WorldEvaluator:
    """Samples world videos from the base model or an adapter and reads them with the rewards and the oracle."""

    def __init__(self, adapters: dict[str, Path], device: str):
        import yaml

        from rewards.build import build_scorers
        from rlhf.generation import VideoGenerator
        from rlhf.lora import load_adapter
        from rlhf.options import ModelOptions, SamplingOptions
        from rlhf.world import MODEL_DIR

        rollout = yaml.safe_load((CONFIGS / "rollout.yaml").read_text())
        self.sampling = SamplingOptions(**{k: rollout[k] for k in ("frames", "height", "width", "steps", "guidance",
                                                                      "negative_prompt")})
        self.samples_per_prompt = int(rollout["samples_per_prompt"])
        self.generator = VideoGenerator(ModelOptions(model=str(MODEL_DIR), device=device, dtype=rollout["dtype"]))
        for name, path in adapters.items():
            load_adapter(self.generator.transformer, str(path), adapter_name=name)
        self.generator.transformer.requires_grad_(False)
        rewards = yaml.safe_load((CONFIGS / "rewards.yaml").read_text())
        self.scorers = build_scorers({**rewards, "device": device})
        self.weights = {name: weighted.weight for name, weighted in self.scorers.items()}

    def use(self, adapter: str | None) -> None:
        from rlhf.lora import use_adapter

        use_adapter(self.generator.transformer, adapter)

    def sample(self, prompts: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
        """Per (prompt, seed): each reward, the trained reward, oracle hits per attribute, cleanliness."""
        import torch

        from rewards.build import score_videos
        from rlhf.video import to_uint8_frames
        from rlhf.world.oracle import read_clip

        embeds = self.generator.encode_prompts([*prompts, self.sampling.negative_prompt])
        uncond = embeds.select(len(prompts))
        rows: dict[str, list] = {}
        per_chunk = max(1, VIDEOS_PER_BATCH // len(seeds))  # several prompts per batch: one prompt's seeds are few
        for first in range(0, len(prompts), per_chunk):
            chunk = range(first, min(first + per_chunk, len(prompts)))
            cond = embeds.select([index for index in chunk for _ in seeds])
            latents = self.generator.sample_latents(cond, uncond, [*seeds] * len(chunk), self.sampling, progress=False)
            video = self.generator.decode(latents)  # (P*S, 3, T, H, W) in [-1, 1]
            frames = ((video + 1) / 2).permute(0, 2, 1, 3, 4)  # (P*S, T, 3, H, W)
            chunk_prompts = [prompts[index] for index in chunk for _ in seeds]
            with torch.no_grad():
                scores = {name: values.numpy().reshape(len(chunk), len(seeds))
                          for name, values in score_videos(self.scorers, frames, chunk_prompts).items()}
            readings = [read_clip(to_uint8_frames(v)) for v in video]
            per_prompt = {**scores, "trained": sum(self.weights[n] * scores[n] for n in scores),
                          **oracle_arrays(readings, chunk_prompts, len(chunk))}
            for name, values in per_prompt.items():
                rows.setdefault(name, []).extend(values)
        return {name: np.stack(values) for name, values in rows.items()}  # each (prompts, seeds)

    def vae_ceiling(self, prompts: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
        """The oracle on rendered clips of each (prompt, seed) passed through the VAE (encode, decode): what a
        perfect transformer would score, the ceiling every method is under."""
        import random

        import torch

        from rlhf.video import to_uint8_frames
        from rlhf.world import scene
        from rlhf.world.oracle import read_clip

        rows: dict[str, list] = {}
        for index, text in enumerate(prompts):
            colour, shape, direction = scene.parse_prompt(text)
            clips = [scene.to_model_range(scene.render(scene.SceneSpec.sample(
                colour, shape, direction, random.Random(seed * 1000 + index)))) for seed in seeds]
            with torch.no_grad():
                vae = self.generator.vae
                latents = vae.encode(torch.stack(clips).to(vae.device, vae.dtype)).latent_dist.mean
                video = vae.decode(latents, return_dict=False)[0].clamp(-1, 1).float().cpu()
            readings = [read_clip(to_uint8_frames(v)) for v in video]
            for name, values in oracle_arrays(readings, [text] * len(seeds), 1).items():
                rows.setdefault(name, []).extend(values)
        return {name: np.stack(values) for name, values in rows.items()}


def evaluation_splits(held_out_seeds: int, training_seeds: int) -> dict[str, tuple[list[str], list[int]]]:
    """The evaluation prompts and seeds per split: every held-out prompt, every other training prompt, each with
    seeds from `EVAL_SEED_OFFSET` on (never used in training)."""
    from rlhf.world import scene

    def seeds(count: int) -> list[int]:
        return [EVAL_SEED_OFFSET + i for i in range(count)]

    return {"held_out": (scene.prompts_for(scene.HELD_OUT), seeds(held_out_seeds)),
            "training": (scene.prompts_for(scene.TRAINING)[::2], seeds(training_seeds))}


def oracle_arrays(readings: list, prompts: list[str], groups: int) -> dict[str, np.ndarray]:
    """Oracle hits per attribute, cleanliness, and which shape was asked for and which was read (for the shape
    confusion), each reshaped to (groups, -1)."""
    from rlhf.world.scene import SHAPES, parse_prompt

    asked = [parse_prompt(p) for p in prompts]
    hits = [r.matches(*attributes) for r, attributes in zip(readings, asked, strict=True)]
    arrays = {a: [h[a] for h in hits] for a in ATTRIBUTES}
    arrays["cleanliness"] = [r.cleanliness for r in readings]
    for shape in SHAPES:
        arrays[f"{ASKED}{shape}"] = [attributes[1] == shape for attributes in asked]
    for shape in (*SHAPES, None):
        arrays[f"{READ}{shape or 'none'}"] = [r.shape == shape for r in readings]
    return {name: np.array(values, float).reshape(groups, -1) for name, values in arrays.items()}


def oracle_summary(scores: dict[str, np.ndarray]) -> dict:
    """The oracle's part of a row: accuracy per attribute, the shape confusion and cleanliness."""
    return {"oracle": {attribute: float(scores[attribute].mean()) for attribute in ATTRIBUTES},
            "shape_confusion": shape_confusion(scores),
            "cleanliness": float(scores["cleanliness"].mean())}


def shape_confusion(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """For each shape asked for, the share of videos the oracle reads as each shape (or none)."""
    from rlhf.world.scene import SHAPES

    confusion = {}
    for shape in SHAPES:
        asked = scores[f"{ASKED}{shape}"]
        if asked.sum():
            confusion[shape] = {read.removeprefix(READ): float((asked * scores[read]).sum() / asked.sum())
                                for read in scores if read.startswith(READ)}
    return confusion


def best_of_k(evaluator: WorldEvaluator, prompts: list[str], seeds: list[int], k: int) -> dict[str, np.ndarray]:
    """For each (prompt, seed): among K base samples (that seed plus K - 1 more), the one the trained reward ranks
    first."""
    extra = [EVAL_SEED_OFFSET + 10_000 + i for i in range(len(seeds) * (k - 1))]
    own = evaluator.sample(prompts, seeds)
    more = evaluator.sample(prompts, extra)
    picked = {name: np.empty_like(values) for name, values in own.items()}
    for j in range(len(seeds)):
        group = {name: np.concatenate([own[name][:, j:j + 1], more[name][:, j * (k - 1):(j + 1) * (k - 1)]], axis=1)
                 for name in own}
        best = group["trained"].argmax(axis=1)  # (prompts,)
        for name in own:
            picked[name][:, j] = group[name][np.arange(len(prompts)), best]
    return picked


def write_figure(evaluator: WorldEvaluator, prompts: list[str], seed: int, methods: list[str | None],
                 path: Path) -> None:
    """A PNG grid: per prompt, a row of frames (first, middle, last) for each method, same seed."""
    from PIL import Image

    from rlhf.video import to_uint8_frames

    embeds = evaluator.generator.encode_prompts([*prompts, evaluator.sampling.negative_prompt])
    uncond = embeds.select(len(prompts))
    rows = []
    for index in range(len(prompts)):
        strips = []
        for method in methods:
            evaluator.use(method)
            latents = evaluator.generator.sample_latents(embeds.select(index), uncond, [seed], evaluator.sampling,
                                                         progress=False)
            frames = to_uint8_frames(evaluator.generator.decode(latents)[0])  # (T, H, W, 3)
            picked = [frames[0], frames[len(frames) // 2], frames[-1]]
            gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
            strips.append(np.concatenate([x for f in picked for x in (f, gap)][:-1], axis=1))
        sep = np.full((strips[0].shape[0], 8, 3), 255, np.uint8)
        rows.append(np.concatenate([x for strip in strips for x in (strip, sep)][:-1], axis=1))
    spacer = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for row in rows for x in (row, spacer)][:-1], axis=0)
    image = Image.fromarray(grid)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(path)


def summarise(method: str, split: str, scores: dict[str, np.ndarray], base: dict[str, np.ndarray],
              seconds: dict[str, float]) -> dict:
    diff = (scores["trained"] - base["trained"]).ravel()

    def std(values: np.ndarray) -> float:
        return float(values.std()) or 1.0

    reward_gain = float(diff.mean())
    truth_gain = float((scores["colour_shape"] - base["colour_shape"]).mean())
    row = {
        "benchmark": "world_alignment", "method": method, "split": split,
        "n": int(scores["trained"].size),
        "trained_reward": float(scores["trained"].mean()),
        "rewards": {name: float(scores[name].mean()) for name in scores
                    if name not in (*ATTRIBUTES, "cleanliness", "trained") and not name.startswith((ASKED, READ))},
        **oracle_summary(scores),
        "win_rate_vs_base": float((diff > 0).mean()),
        "tie_rate_vs_base": float((diff == 0).mean()),
        "trained_reward_gain": reward_gain,
        "colour_shape_gain": truth_gain,
        # The paired standard error of that gain: the std over seeds of the per-seed gain, over sqrt(seeds).
        "colour_shape_gain_stderr": float((scores["colour_shape"] - base["colour_shape"]).mean(axis=0).std()
                                          / np.sqrt(base["colour_shape"].shape[1])),
        "hacking_gap": reward_gain / std(base["trained"]) - truth_gain / std(base["colour_shape"]),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    if method == "base":
        per_seed = {name: base[name].mean(axis=0) for name in ("direction", "cleanliness", "colour_shape")}
        row["seed_noise"] = {name: float(values.std()) for name, values in per_seed.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", help="device of every stage (default: cpu)")
    parser.add_argument("--seeds", type=int, default=12,
                        help="evaluation seeds per held-out prompt (default: 12; at 4 the seed-to-seed noise of "
                             "colour+shape accuracy is about 8 points)")
    parser.add_argument("--training-seeds", type=int, default=4,
                        help="evaluation seeds per training-combination prompt (default: 4)")
    parser.add_argument("--budget-seconds", type=float, default=180.0,
                        help="wall-time budget of every trained method, its data stages included (default: 180 s, "
                             "about what Flow-DPO's shipped config costs on 2 cores)")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    parser.add_argument("--figure", help="write a PNG of held-out prompts: base | Flow-DPO | GRPO frames, same seed")
    args = parser.parse_args()


    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        methods = train_all(out, args.device, args.budget_seconds)
        evaluator = WorldEvaluator({name: m["adapter"] for name, m in methods.items()}, args.device)
        splits = evaluation_splits(args.seeds, args.training_seeds)
        rows = []
        for split, (prompts, seeds) in splits.items():
            start = time.perf_counter()
            evaluator.use(None)
            base = evaluator.sample(prompts, seeds)
            base_s = time.perf_counter() - start
            rows.append(summarise("base", split, base, base, {"sample": base_s}))
            start = time.perf_counter()
            ceiling = evaluator.vae_ceiling(prompts, seeds)
            rows.append({"benchmark": "world_alignment", "method": "vae_reconstruction", "split": split,
                         "n": int(ceiling["colour_shape"].size), **oracle_summary(ceiling),
                         "seconds": {"render_encode_decode": round(time.perf_counter() - start, 1)}})
            start = time.perf_counter()
            picked = best_of_k(evaluator, prompts, seeds, evaluator.samples_per_prompt)
            rows.append(summarise(f"best_of_{evaluator.samples_per_prompt}", split, picked, base,
                                  {"sample_and_score": time.perf_counter() - start}))
            for name, method in methods.items():
                evaluator.use(name)
                rows.append({**summarise(name, split, evaluator.sample(prompts, seeds), base, method["seconds"]),
                             "budget_seconds": args.budget_seconds,
                             **{k: method[k] for k in ("steps_done", "max_steps", "stopped_by_budget")}})
        if args.figure:
            write_figure(evaluator, splits["held_out"][0][::4], EVAL_SEED_OFFSET, [None, "dpo", "grpo"], Path(args.figure))
    emit_rows("world_alignment", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
