"""World alignment: does a trainer make the shapes-world generator follow its prompts, by the oracle?

The world (README "The shapes world") is capable but misaligned by construction: its base draws every colour
and size cleanly but follows each taught word (colour, size) about half the time. On the shipped world model and
the shipped `configs/world/` files (no per-run tuning), for each training seed (`--training-seeds`, >= 2), this
runs the real pipeline through the CLI on the **train** split's prompts and compares, on the **test** split
(combinations never used for training or for any choice) and on the train split, with evaluation seeds of the
world's "test" seed namespace:

- `base`: the pretrained generator;
- `vae_reconstruction`: renders of the same prompts and seeds through the world VAE: the ceiling a perfect
  transformer would reach;
- `best_of_8_reward`: 8 base samples per prompt and seed, the one the trained reward ranks first (8x inference);
- `best_of_8_oracle`: the same 8, the first the oracle reads right: how often the right answer is among the
  base's samples (the headroom);
- `sft`: rejection-sampling fine-tuning on each prompt's best samples by the learned reward (`configs/world/sft.yaml`);
- `dpo`: Flow-DPO on pairs ranked by the learned rewards (`configs/world/{pairs,dpo}.yaml`);
- `dpo_oracle`: Flow-DPO on pairs of the same rollout ranked by the oracle (colour hit + size hit + 0.25 x
  cleanliness): the best preferences any reward could give, the trainer's ceiling;
- `reward_gradient`, `grpo`, `nft`: the online trainers (`configs/world/{reward_gradient,grpo,nft}.yaml`);
- `dpo_online`: Flow-DPO in rounds (`online --config configs/world/online_dpo.yaml`): each round samples with the
  last round's adapter, scores, pairs and trains on them, all inside the one budget;
- `dpo_online_oracle`: the same rounds with every round's pairs ranked by the oracle (`dpo_oracle`'s weights).

Every trained method gets the same wall-time budget (`--budget-seconds`), counted from its command's start
(model loading and calibration included, `max_seconds`); the offline methods' data (rollout, scoring, pairs or
selection) is charged to each of them at the time it took. Per method and split: the oracle's accuracy per
attribute, on the taught attributes together (`taught`) and on all three, its share of readable videos,
cleanliness, the trained reward, the win rate against the base on it (same prompt and seed), the hacking gap
(trained-reward gain minus taught-accuracy gain, each in units of the base's spread; positive: the reward rose
more than the truth), and cost. Trained methods: the gain per training seed, the mean and a t-based 95% interval
over the seeds (ddof 1: it includes the run-to-run variance); best-of-8 rows: the interval over evaluation
seeds. `amortisation` is a method's taught gain over best-of-8-by-reward's (1x inference vs 8x).
Prints one JSON row per method and split; `--record` appends them, with the command, to RESULTS.md.

    python benchmarks/world_alignment.py [--out DIR] [--record] [--split validation]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402

CONFIGS = ROOT / "configs" / "world"
ATTRIBUTES = ("colour", "size", "direction", "taught", "all")
READABLE = "readable:"  # per-video indicator arrays: the oracle read a value for that attribute
VIDEOS_PER_BATCH = 16
BEST_OF = 8
# Each taught attribute on its own: ranking by `oracle_taught` (both right) left most pairs to cleanliness alone,
# since few of the base's samples get both right.
ORACLE_WEIGHTS = {"oracle_colour": 1.0, "oracle_size": 1.0, "oracle_cleanliness": 0.25}
OFFLINE = ("sft", "dpo", "dpo_oracle")
ONLINE = ("reward_gradient", "grpo", "nft")  # online trainers of the `train` command
IN_ROUNDS = ("dpo_online", "dpo_online_oracle")  # the `online` command: rollout -> score -> pairs -> train, in rounds
METHODS = (*OFFLINE, *ONLINE, *IN_ROUNDS)
ONLINE_DPO_ROUNDS = 1000  # seed indices per training seed of `dpo_online` (round r uses the r-th)
TRAIN_SPLIT_SEED_INDEX = 100_000  # train-split evaluation seeds: the "test" namespace from here on


def run_stage(argv: list) -> float:
    """Run one CLI stage in this process; return its wall time. Stops the benchmark if the stage fails."""
    from rlhf.cli import main as cli

    start = time.perf_counter()
    argv = [str(a) for a in argv]
    print("contentv-rlhf " + " ".join(argv), flush=True)
    if cli(argv) != 0:
        raise SystemExit(f"stage failed: contentv-rlhf {' '.join(argv)}")
    return time.perf_counter() - start


def pair_contrast(pairs_dir: Path, store_dir: Path) -> dict:
    """How many pairs have a winner the oracle reads right on the taught attributes and a loser it reads wrong
    (`teach_right`), the reverse (`teach_wrong`), or both the same (`same`)."""
    from datasets import load_from_disk

    from rollouts.store import RolloutStore

    hits = RolloutStore(store_dir).read_scores("oracle_taught")["scores"]
    rows = load_from_disk(str(pairs_dir))
    counts = {"pairs": len(rows), "teach_right": 0, "teach_wrong": 0, "same": 0}
    for chosen, rejected in zip(rows["chosen_id"], rows["rejected_id"], strict=True):
        difference = hits[chosen] - hits[rejected]
        counts["teach_right" if difference > 0 else "teach_wrong" if difference < 0 else "same"] += 1
    return counts


def train_methods(out: Path, index: int, device: str, budget: float, methods: list[str],
                  configs: dict[str, Path] | None = None, extra: tuple = (), reuse: bool = False) -> dict[str, dict]:
    """Each of `methods` for training seed `index` within `budget` seconds each; returns per method its adapter,
    the seconds it cost (data charged at the time it took) and the optimiser steps it ran. The rollout, scoring
    and pairs run only when an offline method needs them. `configs` replaces a method's shipped training config
    (settings explored on the validation split); `extra` flags go to every train command.

    What was trained is recorded in `out/trained.json`; with `reuse`, a method recorded there with the same
    config, budget and flags is not trained again (so more training seeds can be added to a kept `--out`). The
    offline methods share one rollout: if one of them has to be trained, all of them are, on fresh data."""
    from rlhf.io import write_text
    from rlhf.world import scene

    shipped = {"dpo_oracle": "dpo.yaml", "dpo_online": "online_dpo.yaml", "dpo_online_oracle": "online_dpo.yaml"}
    config = {method: CONFIGS / shipped.get(method, f"{method}.yaml") for method in methods}
    config.update(configs or {})
    signature = {m: {"config": str(config[m]), "budget": budget, "extra": [str(e) for e in extra]} for m in methods}
    record = out / "trained.json"
    kept = json.loads(record.read_text()) if record.is_file() else {}
    done = {m: run for m, run in kept.items() if reuse and m in methods and Path(run["adapter"]).is_dir()
            and {k: run.get(k) for k in signature[m]} == signature[m]}
    if any(m in OFFLINE and m not in done for m in methods):
        done = {m: run for m, run in done.items() if m not in OFFLINE}
    todo = [m for m in methods if m not in done]

    common = ["--device", device]
    train_seed = ["--seed", scene.seed("training", index)]
    store = out / "rollout"
    spent: dict[str, dict[str, float]] = {}
    if any(method in OFFLINE for method in todo):
        for folder in ("rollout", "pairs", "pairs_oracle"):  # fresh data: a resumed rollout would cost nothing
            shutil.rmtree(out / folder, ignore_errors=True)
        data = {"rollout": run_stage(["rollout", "--config", CONFIGS / "rollout.yaml", "--out", store, *common,
                                      "--seed", scene.seed("rollout", index)]),
                "score": run_stage(["score", "--store", store, "--config", CONFIGS / "rewards.yaml"])}
        spent["sft"] = {**data}
        if "dpo" in todo:
            spent["dpo"] = {**data, "pairs": run_stage(["pairs", "--store", store, "--out", out / "pairs", "--config",
                                                        CONFIGS / "pairs.yaml"])}
        if "dpo_oracle" in todo:
            oracle_score = run_stage(["score", "--store", store, "--config", CONFIGS / "ground_truth.yaml"])
            oracle_pairs_config = out / "pairs_oracle.yaml"
            oracle_pairs_config.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS / "pairs.yaml").read_text()),
                                                           "weights": ORACLE_WEIGHTS}))
            spent["dpo_oracle"] = {**data, "score_oracle": oracle_score,
                                   "pairs": run_stage(["pairs", "--store", store, "--out", out / "pairs_oracle",
                                                       "--config", oracle_pairs_config])}
    commands = {
        "sft": ["train", "--config", config.get("sft"), "--store", store],
        "dpo": ["train", "--config", config.get("dpo"), "--pairs", out / "pairs"],
        "dpo_oracle": ["train", "--config", config.get("dpo_oracle"), "--pairs", out / "pairs_oracle"],
        **{method: ["train", "--config", config.get(method)] for method in ONLINE},
    }
    runs = {}
    for method in todo:
        if method in IN_ROUNDS:
            runs[method] = train_online_dpo(out / method, index, config[method], common, budget,
                                            oracle=method == "dpo_online_oracle")
            continue
        charged = sum(spent.get(method, {}).values())
        seconds = run_stage([*commands[method], "--output-dir", out / method, "--overwrite", *common, *train_seed,
                             "--max-seconds", max(budget - charged, 1.0), *extra])
        summary = json.loads((out / method / "summary.json").read_text())
        runs[method] = {"adapter": out / method / "adapter",
                        "seconds": {**{k: round(v, 1) for k, v in spent.get(method, {}).items()},
                                    "train": round(seconds, 1)},
                        "steps_done": summary["steps_done"], "max_steps": summary["steps"],
                        "stopped_by_budget": summary["stopped_by_max_seconds"]}
    if "dpo_oracle" in spent:  # the oracle scored the store
        for method, pairs_dir in (("dpo", out / "pairs"), ("dpo_oracle", out / "pairs_oracle")):
            if method in runs:
                runs[method]["pair_contrast"] = pair_contrast(pairs_dir, store)
    kept.update({m: {**run, "adapter": str(run["adapter"]), **signature[m]} for m, run in runs.items()})
    write_text(record, json.dumps(kept, indent=1))
    reused = {m: {**{k: v for k, v in run.items() if k not in signature[m]}, "adapter": Path(run["adapter"])}
              for m, run in done.items()}
    return {**reused, **runs}


def train_online_dpo(out: Path, index: int, config: Path, common: list, budget: float, oracle: bool = False) -> dict:
    """Online Flow-DPO for training seed `index`, the whole run (every round's data and training) within `budget`
    seconds from the command's start; with `oracle`, every round is scored by the oracle and its pairs ranked with
    ORACLE_WEIGHTS. Round r of seed `index` samples with the rollout namespace's (1 + index) x ONLINE_DPO_ROUNDS + r-th
    seed and trains with the training namespace's: disjoint from the offline methods' rollouts (indices below
    ONLINE_DPO_ROUNDS) and from every other training seed's rounds. The oracle variant uses the same seeds, so its
    first round samples the same videos."""
    from dpo.online import OnlineConfig
    from rlhf.world import scene

    fields = yaml.safe_load(Path(config).read_text())
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: a resumed one would be charged only what is left
    out.mkdir(parents=True)
    if oracle:  # the ground truth's scorers that ORACLE_WEIGHTS ranks by
        ground_truth = yaml.safe_load((CONFIGS / "ground_truth.yaml").read_text())
        oracle_rewards = out / "oracle_rewards.yaml"
        oracle_rewards.write_text(yaml.safe_dump({**ground_truth, "scorers": {
            name: ground_truth["scorers"][name] for name in ORACLE_WEIGHTS}}))
        config = out / "online_dpo_oracle.yaml"
        config.write_text(yaml.safe_dump({**fields, "rewards": str(oracle_rewards),
                                          "pairs": {**fields.get("pairs", {}), "weights": ORACLE_WEIGHTS}}))
    rounds = fields.get("rounds", OnlineConfig.rounds)
    if rounds >= ONLINE_DPO_ROUNDS:
        raise SystemExit(f"{config}: rounds must be below {ONLINE_DPO_ROUNDS} (seed indices per training seed)")
    first = (1 + index) * ONLINE_DPO_ROUNDS
    seconds = run_stage(["online", "--config", config, "--out", out / "run", *common,
                         "--seed", scene.seed("rollout", first), "--train", f"{{seed: {scene.seed('training', first)}}}",
                         "--max-seconds", budget])
    rows = json.loads((out / "run" / "rounds.json").read_text())
    steps_per_round = fields.get("train", {}).get("max_steps")
    return {"adapter": out / "run" / f"round-{rows[-1]['round']:02d}" / "train" / "adapter",
            "seconds": {"total": round(seconds, 1), "rounds": [row["seconds"] for row in rows]},
            "steps_done": sum(row["steps_done"] for row in rows),
            "max_steps": steps_per_round and rounds * steps_per_round, "rounds_done": len(rows),
            "stopped_by_budget": len(rows) < rounds or rows[-1]["stopped_by_max_seconds"]}


class WorldEvaluator:
    """Samples world videos from the base model or an adapter and reads them with the rewards and the oracle."""

    def __init__(self, adapters: dict[str, Path], device: str, rewards: Path = CONFIGS / "rewards.yaml"):
        from rewards.build import build_scorers
        from rlhf.generation import VideoGenerator
        from rlhf.lora import load_adapter
        from rlhf.options import ModelOptions, SamplingOptions
        from rlhf.world import MODEL_DIR

        rollout = yaml.safe_load((CONFIGS / "rollout.yaml").read_text())
        self.sampling = SamplingOptions(**{k: rollout[k] for k in ("frames", "height", "width", "steps", "guidance",
                                                                      "negative_prompt")})
        self.generator = VideoGenerator(ModelOptions(model=str(MODEL_DIR), device=device, dtype=rollout["dtype"]))
        for name, path in adapters.items():
            load_adapter(self.generator.transformer, str(path), adapter_name=name)
        self.generator.transformer.requires_grad_(False)
        self.scorers = build_scorers({**yaml.safe_load(Path(rewards).read_text()), "device": device})
        self.weights = {name: weighted.weight for name, weighted in self.scorers.items()}

    def use(self, adapter: str | None) -> None:
        from rlhf.lora import use_adapter

        use_adapter(self.generator.transformer, adapter)

    def videos(self, prompts: list[str], seeds: list[int]):
        """Sample every (prompt, seed) in batches of several prompts (one prompt's seeds are few); yields each
        batch's prompts (each repeated per seed) and its videos `(P*S, 3, T, H, W)` in [-1, 1]."""
        embeds = self.generator.encode_prompts([*prompts, self.sampling.negative_prompt])
        uncond = embeds.select(len(prompts))
        per_chunk = max(1, VIDEOS_PER_BATCH // len(seeds))
        for first in range(0, len(prompts), per_chunk):
            chunk = range(first, min(first + per_chunk, len(prompts)))
            cond = embeds.select([index for index in chunk for _ in seeds])
            latents = self.generator.sample_latents(cond, uncond, [*seeds] * len(chunk), self.sampling, progress=False)
            yield [prompts[index] for index in chunk for _ in seeds], self.generator.decode(latents)

    def sample(self, prompts: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
        """Per (prompt, seed): each reward, the trained reward, oracle hits and readability, cleanliness."""
        import torch

        from rewards.build import score_videos
        from rlhf.video import to_scorer_frames, to_uint8_frames
        from rlhf.world.oracle import read_clip

        rows: dict[str, list] = {}
        for chunk_prompts, video in self.videos(prompts, seeds):
            groups = len(chunk_prompts) // len(seeds)
            frames = to_scorer_frames(video)  # (P*S, T, 3, H, W)
            with torch.no_grad():
                scores = {name: values.numpy().reshape(groups, len(seeds))
                          for name, values in score_videos(self.scorers, frames, chunk_prompts).items()}
            readings = [read_clip(to_uint8_frames(v)) for v in video]
            per_prompt = {**scores, "trained": sum(self.weights[n] * scores[n] for n in scores),
                          **oracle_arrays(readings, chunk_prompts, groups)}
            for name, values in per_prompt.items():
                rows.setdefault(name, []).extend(values)
        return {name: np.stack(values) for name, values in rows.items()}  # each (prompts, seeds)

    def vae_ceiling(self, prompts: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
        """The oracle on rendered clips of each (prompt, seed) passed through the VAE (encode, decode): what a
        perfect transformer would score, the ceiling every method is under."""
        import torch

        from rlhf.video import to_uint8_frames
        from rlhf.world import scene
        from rlhf.world.oracle import read_clip

        rows: dict[str, list] = {}
        for index, text in enumerate(prompts):
            clips = [scene.to_model_range(clip) for clip in renders(text, index, seeds)]
            with torch.no_grad():
                vae = self.generator.vae
                latents = vae.encode(torch.stack(clips).to(vae.device, vae.dtype)).latent_dist.mean
                video = vae.decode(latents, return_dict=False)[0].clamp(-1, 1).float().cpu()
            readings = [read_clip(to_uint8_frames(v)) for v in video]
            for name, values in oracle_arrays(readings, [text] * len(seeds), 1).items():
                rows.setdefault(name, []).extend(values)
        return {name: np.stack(values) for name, values in rows.items()}


def renders(text: str, index: int, seeds: list[int]) -> list[np.ndarray]:
    """Clean renders `(T, H, W, 3)` uint8 of the `index`-th evaluated prompt `text`, one per seed: the clips a
    perfect generator could draw for it (the VAE ceiling's and `world_base.clip_reads`' inputs)."""
    import random

    from rlhf.world import scene

    colour, size, direction = scene.parse_prompt(text)
    return [scene.render(scene.SceneSpec.sample(colour, size, direction, random.Random(seed * 1000 + index)))
            for seed in seeds]


def evaluation_splits(split: str, seeds: int, train_seeds: int) -> dict[str, tuple[list[str], list[int]]]:
    """The evaluated prompts and seeds: every prompt of `split` (test, or validation when choosing settings)
    and of the train split, in every direction, each with seeds of the "test" namespace (or "validation")."""
    from rlhf.world import scene

    namespace = "validation" if split == "validation" else "test"
    return {split: (scene.prompts_for(scene.SPLITS[split]), [scene.seed(namespace, i) for i in range(seeds)]),
            "train": (scene.prompts_for(scene.SPLITS["train"]),
                      [scene.seed(namespace, TRAIN_SPLIT_SEED_INDEX + i) for i in range(train_seeds)])}


def oracle_arrays(readings: list, prompts: list[str], groups: int) -> dict[str, np.ndarray]:
    """Oracle hits per attribute, whether each attribute was readable, and cleanliness, each (groups, -1)."""
    from rlhf.world.scene import parse_prompt

    asked = [parse_prompt(p) for p in prompts]
    hits = [r.matches(*attributes) for r, attributes in zip(readings, asked, strict=True)]
    arrays = {a: [h[a] for h in hits] for a in ATTRIBUTES}
    for attribute in ("colour", "size", "direction"):
        arrays[f"{READABLE}{attribute}"] = [getattr(r, attribute) is not None for r in readings]
    arrays[f"{READABLE}all"] = [all(getattr(r, a) is not None for a in ("colour", "size", "direction"))
                                for r in readings]
    arrays["cleanliness"] = [r.cleanliness for r in readings]
    return {name: np.array(values, float).reshape(groups, -1) for name, values in arrays.items()}


def following_per_word(scores: dict[str, np.ndarray], prompts: list[str]) -> dict[str, dict[str, float]]:
    """Per taught attribute and word: the share of videos of the prompts asking for that word that show it (rows
    of `scores` are `prompts`). A split's mean hides which words a method fixed and which it broke: the world's
    confusions form a cycle (red draws red or yellow, yellow draws yellow or green, ...), so a method that learns
    to draw a value more often for every prompt fixes one word and breaks the word whose partner that value is."""
    from rlhf.world.scene import TAUGHT, parse_prompt

    asked = [parse_prompt(p) for p in prompts]
    out: dict[str, dict[str, float]] = {}
    for position, attribute in enumerate(TAUGHT):
        for word in dict.fromkeys(a[position] for a in asked):
            rows = [i for i, a in enumerate(asked) if a[position] == word]
            out.setdefault(attribute, {})[word] = float(scores[attribute][rows].mean())
    return out


def oracle_summary(scores: dict[str, np.ndarray]) -> dict:
    """The oracle's part of a row: accuracy per attribute, readable shares and cleanliness."""
    return {"oracle": {attribute: float(scores[attribute].mean()) for attribute in ATTRIBUTES},
            "readable": {name.removeprefix(READABLE): float(values.mean()) for name, values in scores.items()
                         if name.startswith(READABLE)},
            "cleanliness": float(scores["cleanliness"].mean())}


def best_of(own: dict[str, np.ndarray], more: dict[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
    """For each (prompt, seed): among its own sample and its K - 1 extra ones (`more` holds them per seed, in
    order), the one with the highest `key` (the first on ties)."""
    seeds = own[key].shape[1]
    extra = more[key].shape[1] // seeds
    picked = {name: np.empty_like(values) for name, values in own.items()}
    for j in range(seeds):
        group = {name: np.concatenate([own[name][:, j:j + 1], more[name][:, j * extra:(j + 1) * extra]], axis=1)
                 for name in own}
        best = group[key].argmax(axis=1)  # (prompts,)
        for name in own:
            picked[name][:, j] = group[name][np.arange(len(best)), best]
    return picked


def per_run_gains(scores: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, float]:
    """One run's gains over the base on the same (prompt, seed) videos."""
    def spread(values: np.ndarray) -> float:
        return float(values.std()) or 1.0

    reward_gain = float((scores["trained"] - base["trained"]).mean())
    taught_gain = float((scores["taught"] - base["taught"]).mean())
    return {
        **{f"{a}_gain": float((scores[a] - base[a]).mean()) for a in ATTRIBUTES},
        "cleanliness_gain": float((scores["cleanliness"] - base["cleanliness"]).mean()),
        "trained_reward_gain": reward_gain,
        "win_rate_vs_base": float((scores["trained"] > base["trained"]).mean()),
        "hacking_gap": reward_gain / spread(base["trained"]) - taught_gain / spread(base["taught"]),
    }


def interval(values: list[float]) -> dict:
    from rlhf.stats import mean_interval

    mean, low, high = mean_interval(np.array(values))
    return {"mean": mean, "ci95": [low, high] if np.isfinite(low) else None, "per_run": values}


def summarise_runs(method: str, split: str, runs: list[dict[str, np.ndarray]], base: dict[str, np.ndarray],
                   extra: dict) -> dict:
    """A trained method's row: the pooled oracle read-out and, per gain, its per-seed values, mean and t-CI."""
    gains = [per_run_gains(scores, base) for scores in runs]
    pooled = {name: np.concatenate([scores[name] for scores in runs], axis=1) for name in runs[0]}
    return {"benchmark": "world_alignment", "method": method, "split": split, "n_per_run": int(base["taught"].size),
            "runs": len(runs), "trained_reward": float(pooled["trained"].mean()), **oracle_summary(pooled),
            "gains": {name: interval([g[name] for g in gains]) for name in gains[0]}, **extra}


def summarise_single(method: str, split: str, scores: dict[str, np.ndarray], base: dict[str, np.ndarray],
                     extra: dict) -> dict:
    """An untrained method's row (base, best-of-K): gains with a t-CI over the evaluation seeds (paired)."""
    per_seed = [per_run_gains({k: v[:, j:j + 1] for k, v in scores.items()},
                              {k: v[:, j:j + 1] for k, v in base.items()}) for j in range(base["taught"].shape[1])]
    overall = per_run_gains(scores, base)
    return {"benchmark": "world_alignment", "method": method, "split": split, "n_per_run": int(base["taught"].size),
            "runs": 1, "trained_reward": float(scores["trained"].mean()), **oracle_summary(scores),
            "gains": {name: {**interval([g[name] for g in per_seed]), "mean": overall[name], "per_run": None}
                      for name in overall}, **extra}


def base_noise(base: dict[str, np.ndarray]) -> dict[str, float]:
    """Seed-to-seed noise of the base: the std (ddof 1) over evaluation seeds of the per-seed mean."""
    return {name: float(base[name].mean(axis=0).std(ddof=1)) for name in ("taught", "direction", "cleanliness")}


def reference_rows(evaluator: WorldEvaluator, split: str, prompts: list[str], seeds: list[int],
                   base: dict[str, np.ndarray]) -> list[dict]:
    """The rows every method is read against: the VAE ceiling, best-of-8 by the trained reward and by the oracle."""
    from rlhf.world import scene

    start = time.perf_counter()
    ceiling = evaluator.vae_ceiling(prompts, seeds)
    rows = [{"benchmark": "world_alignment", "method": "vae_reconstruction", "split": split,
             "n_per_run": int(ceiling["taught"].size), **oracle_summary(ceiling),
             "seconds": {"render_encode_decode": round(time.perf_counter() - start, 1)}}]
    start = time.perf_counter()
    more = evaluator.sample(prompts, [scene.seed("best_of_k", j) for j in range(len(seeds) * (BEST_OF - 1))])
    cost = {"seconds": {"sample_and_score": round(time.perf_counter() - start, 1)}}
    for name, key in (("reward", "trained"), ("oracle", "taught")):
        picked = best_of(base, more, key)
        rows.append({**summarise_single(f"best_of_{BEST_OF}_{name}", split, picked, base, cost),
                     "following_per_word": following_per_word(picked, prompts)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", help="device of every stage (default: cpu)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="the split reported beside train: test (the benchmark), or validation (for choosing "
                             "settings; its seeds come from the validation namespace)")
    parser.add_argument("--seeds", type=int, default=8, help="evaluation seeds per test prompt (default: 8)")
    parser.add_argument("--train-seeds", type=int, default=2,
                        help="evaluation seeds per train-split prompt (default: 2)")
    parser.add_argument("--training-seeds", type=int, default=2,
                        help="independent training runs per method (default: 2; each its own rollout)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="trained methods to run (comma-separated; default: all)")
    parser.add_argument("--budget-seconds", type=float, default=150.0,
                        help="wall-time budget of every trained method from its command's start, its data "
                             "included (default: 150 s)")
    parser.add_argument("--config", action="append", default=[], metavar="METHOD=YAML",
                        help="train METHOD with this config instead of the shipped one (repeatable; for choosing "
                             "settings on --split validation)")
    parser.add_argument("--no-references", action="store_true",
                        help="skip the VAE-ceiling and best-of-8 rows (faster, for choosing settings)")
    parser.add_argument("--no-train-split", action="store_true",
                        help="evaluate only --split, not the train split too (faster, for choosing settings)")
    parser.add_argument("--reuse", action="store_true",
                        help="with --out: do not retrain a method and training seed already trained there with the "
                             "same config and budget (e.g. to add training seeds to an earlier run)")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.training_seeds < 2 and methods:
        parser.error("--training-seeds: at least 2 (one run per method is not a measurement)")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
    if args.reuse and not args.out:
        parser.error("--reuse: needs --out (the folder an earlier run kept)")
    configs = {}
    for item in args.config:
        method, _, path = item.partition("=")
        if method not in methods or not Path(path).is_file():
            parser.error(f"--config {item}: expected METHOD=YAML with METHOD in --methods and an existing file")
        configs[method] = Path(path).resolve()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for index in range(args.training_seeds if methods else 0):
            trained = train_methods(out / f"seed{index}", index, args.device, args.budget_seconds, methods, configs,
                                    reuse=args.reuse)
            for method in methods:
                runs[method].append(trained[method])
        adapters = {f"{m}@{i}": run["adapter"] for m, method_runs in runs.items() for i, run in enumerate(method_runs)}
        evaluator = WorldEvaluator(adapters, args.device)
        rows = []
        splits = evaluation_splits(args.split, args.seeds, args.train_seeds)
        if args.no_train_split:
            splits.pop("train")
        for split, (prompts, seeds) in splits.items():
            start = time.perf_counter()
            evaluator.use(None)
            base = evaluator.sample(prompts, seeds)
            sampled = {"seconds": {"sample": round(time.perf_counter() - start, 1)}}
            rows.append({**summarise_single("base", split, base, base, sampled), "seed_noise": base_noise(base),
                         "following_per_word": following_per_word(base, prompts)})
            reference_gain = None
            if not args.no_references:
                references = reference_rows(evaluator, split, prompts, seeds, base)
                rows.extend(references)
                reference_gain = references[1]["gains"]["taught_gain"]["mean"]  # best-of-8 by the trained reward
            for method, method_runs in runs.items():
                scores = []
                for i in range(len(method_runs)):
                    evaluator.use(f"{method}@{i}")
                    scores.append(evaluator.sample(prompts, seeds))
                row = summarise_runs(method, split, scores, base, {
                    "budget_seconds": args.budget_seconds,
                    "cost": [{k: run[k] for k in ("seconds", "steps_done", "max_steps", "stopped_by_budget")}
                             for run in method_runs],
                    **({"pair_contrast": [run["pair_contrast"] for run in method_runs]}
                       if "pair_contrast" in method_runs[0] else {})})
                row["following_per_word"] = following_per_word(
                    {name: np.concatenate([run[name] for run in scores], axis=1) for name in scores[0]}, prompts)
                row["amortisation"] = (row["gains"]["taught_gain"]["mean"] / reference_gain
                                       if reference_gain is not None and reference_gain > 0 else None)
                rows.append(row)
    emit_rows("world_alignment", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
