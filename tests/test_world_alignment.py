"""benchmarks/world_alignment.py's read-outs: oracle arrays, best-of-K picks, gains with intervals, the ceiling."""

import numpy as np
import pytest

from benchmarks.world_alignment import (
    READABLE,
    WorldEvaluator,
    best_of,
    oracle_arrays,
    per_run_gains,
    summarise_runs,
)
from rlhf.world.oracle import Reading


def reading(colour, size, direction) -> Reading:
    return Reading(colour=colour, size=size, direction=direction, cleanliness=0.5)


def test_oracle_arrays_count_hits_and_readability():
    prompts = ["a small red circle moving left", "a small red circle moving up", "a large blue circle moving left",
               "a large blue circle moving down"]
    readings = [reading("red", "small", "left"), reading("red", "medium", "up"),
                reading("blue", None, "left"), reading(None, "large", "down")]
    arrays = oracle_arrays(readings, prompts, groups=2)  # two prompts' worth of rows, two videos each
    # Written out: taught = colour and size right: only the first; unreadable counts as wrong.
    assert arrays["taught"].tolist() == [[1, 0], [0, 0]]
    assert arrays["size"].tolist() == [[1, 0], [0, 1]] and arrays["colour"].tolist() == [[1, 1], [1, 0]]
    assert arrays[f"{READABLE}size"].tolist() == [[1, 1], [0, 1]]
    assert arrays[f"{READABLE}all"].tolist() == [[1, 1], [0, 0]]


def test_best_of_picks_the_highest_key_among_own_and_extra_samples():
    # 2 prompts x 2 seeds; 2 extra samples per seed (K = 3), laid out seed by seed.
    own = {"trained": np.array([[0.1, 0.5], [0.3, 0.0]]), "taught": np.array([[0.0, 1.0], [1.0, 0.0]])}
    more = {"trained": np.array([[0.4, 0.2, 0.1, 0.9], [0.1, 0.2, 0.0, 0.0]]),
            "taught": np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])}
    picked = best_of(own, more, "trained")
    # prompt 0: seed 0 {0.1, 0.4, 0.2} -> 0.4 (taught 1); seed 1 {0.5, 0.1, 0.9} -> 0.9 (taught 1)
    # prompt 1: seed 0 {0.3, 0.1, 0.2} -> own 0.3 (taught 1); seed 1 {0.0, 0.0, 0.0} -> own (ties: first)
    assert picked["trained"].tolist() == [[0.4, 0.9], [0.3, 0.0]]
    assert picked["taught"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert best_of(own, more, "taught")["taught"].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_gains_per_training_run_and_their_t_interval():
    def scores(taught, trained):
        return {"taught": np.array(taught, float), "trained": np.array(trained, float),
                **{a: np.array(taught, float) for a in ("colour", "size", "direction", "all")},
                "cleanliness": np.zeros((1, 4))}

    base = scores([[0, 0, 1, 0]], [[0.0, 0.0, 1.0, 0.0]])
    runs = [scores([[1, 0, 1, 1]], [[1.0, 0.0, 1.0, 1.0]]), scores([[1, 1, 1, 0]], [[1.0, 1.0, 1.0, 0.0]])]
    assert per_run_gains(runs[0], base)["taught_gain"] == pytest.approx(0.5)
    assert per_run_gains(runs[0], base)["win_rate_vs_base"] == pytest.approx(0.5)
    row = summarise_runs("dpo", "test", runs, base, {})
    gain = row["gains"]["taught_gain"]
    assert gain["per_run"] == [0.5, 0.5] and gain["mean"] == pytest.approx(0.5)
    assert gain["ci95"] == pytest.approx([0.5, 0.5])  # identical runs: no run-to-run spread
    assert row["oracle"]["taught"] == pytest.approx(6 / 8)


@pytest.mark.slow
def test_vae_ceiling_reads_renders_through_the_world_vae():
    evaluator = WorldEvaluator({}, "cpu")
    prompts = ["a large red circle moving left", "a small green circle moving up"]
    ceiling = evaluator.vae_ceiling(prompts, [0, 1])
    assert ceiling["colour"].shape == (2, 2)
    # The world VAE keeps what the oracle reads: colour, size and motion (the world's "capable" premise).
    assert ceiling["taught"].mean() == 1.0 and ceiling["direction"].mean() == 1.0
    again = evaluator.vae_ceiling(prompts, [0, 1])  # renders are seeded by (seed, prompt): the same clips
    assert all(np.array_equal(ceiling[name], again[name]) for name in ceiling)


def test_pair_contrast_counts_pairs_by_what_the_oracle_read_of_winner_and_loser(tmp_path):
    import json

    from datasets import Dataset

    from benchmarks.world_alignment import pair_contrast

    (tmp_path / "store" / "scores").mkdir(parents=True)
    hits = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}  # the oracle's taught hit per sample
    (tmp_path / "store" / "scores" / "oracle_taught.json").write_text(json.dumps({"scores": hits}))
    Dataset.from_dict({"chosen_id": ["a", "b", "a", "d", "c"],
                       "rejected_id": ["b", "c", "c", "b", "d"]}).save_to_disk(str(tmp_path / "pairs"))
    # Written out: a>b right, b>c wrong, a>c same, d>b same, c>d right.
    assert pair_contrast(tmp_path / "pairs", tmp_path / "store") == {"pairs": 5, "teach_right": 2,
                                                                     "teach_wrong": 1, "same": 2}


def test_draws_above_is_the_logit_normal_tail_the_trainers_sample():
    import torch

    from benchmarks.world_dpo_noise import draws_above
    from dpo.losses import sample_sigmas

    assert draws_above(0.0, sigma=0.5) == pytest.approx(0.5)
    for mean in (0.0, 2.0):
        sigmas = sample_sigmas(200_000, torch.Generator().manual_seed(0), "logit_normal", mean, 1.0, shift=1.0)
        assert draws_above(mean) == pytest.approx(float((sigmas > 0.85).float().mean()), abs=0.003)


@pytest.mark.slow
def test_decision_by_sigma_reads_the_final_clip_at_the_last_step():
    from benchmarks.world_dpo_noise import decision_by_sigma

    decided = decision_by_sigma(WorldEvaluator({}, "cpu"), ["a large red circle moving left"], [0, 1])
    sigmas = [float(s) for s in decided]
    assert len(sigmas) == 20 and sigmas == sorted(sigmas, reverse=True) and sigmas[0] == pytest.approx(1.0)
    # At the last step x_t - sigma * v is (almost) the final clip: whatever is readable there is decided.
    assert decided[f"{sigmas[-1]:.2f}"]["direction"] == 1.0
    assert all(0.0 <= share <= 1.0 for shares in decided.values() for share in shares.values())


@pytest.mark.slow
def test_the_world_reads_colour_words_from_the_token_features():
    from benchmarks.world_dpo_noise import text_channel, token_compositionality

    evaluator = WorldEvaluator({}, "cpu")
    shares = text_channel(evaluator, ["a large red circle moving left", "a small blue circle moving up"], [0, 1])
    for swap in ("pooled_swapped", "tokens_swapped"):
        # The two colour sets are disjoint (a colour and its partner vs the opposite colour and its partner).
        assert shares[swap]["follows_tokens"] + shares[swap]["follows_pooled"] <= 1.0
        assert shares[swap]["follows_tokens"] > shares[swap]["follows_pooled"]  # the README's claim
    cosines = token_compositionality(evaluator)
    assert list(cosines) == ["small/medium", "small/large", "medium/large"]
    assert all(0.5 < value <= 1.0 for value in cosines.values())


def test_train_methods_runs_only_the_data_and_trainers_asked_for(tmp_path, monkeypatch):
    import json

    import benchmarks.world_alignment as benchmark

    stages = []

    def fake_stage(argv):
        argv = [str(a) for a in argv]
        stages.append(argv)
        if argv[0] == "train":  # what the real train command leaves behind
            out = tmp_path / argv[argv.index("--output-dir") + 1]
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps({"steps_done": 3, "steps": 5, "stopped_by_max_seconds": True}))
        return 10.0  # seconds each stage "took"

    monkeypatch.setattr(benchmark, "run_stage", fake_stage)
    runs = benchmark.train_methods(tmp_path / "seed0", 0, "cpu", 150.0, ["reward_gradient"])
    # An online method: no rollout, scoring or pairs, and its whole budget.
    assert [argv[0] for argv in stages] == ["train"] and set(runs) == {"reward_gradient"}
    assert stages[0][stages[0].index("--max-seconds") + 1] == "150.0"

    stages.clear()
    runs = benchmark.train_methods(tmp_path / "seed1", 1, "cpu", 150.0, ["dpo"])
    assert [argv[0] for argv in stages] == ["rollout", "score", "pairs", "train"]
    # The offline method is charged its rollout, scoring and pairs (10 s each here): 150 - 30.
    assert stages[-1][stages[-1].index("--max-seconds") + 1] == "120.0"
    assert runs["dpo"]["seconds"] == {"rollout": 10.0, "score": 10.0, "pairs": 10.0, "train": 10.0}

    # A config explored on the validation split replaces the shipped one for its method only.
    stages.clear()
    explored = tmp_path / "nft_explored.yaml"
    benchmark.train_methods(tmp_path / "seed2", 2, "cpu", 150.0, ["nft", "grpo"], {"nft": explored})
    used = {argv[argv.index("--output-dir") + 1].rsplit("/", 1)[-1]: argv[argv.index("--config") + 1]
            for argv in stages}
    assert used == {"nft": str(explored), "grpo": str(benchmark.CONFIGS / "grpo.yaml")}


def test_world_base_per_word_shares_count_the_word_and_its_confusion_partner():
    from benchmarks.world_base import per_word

    readings = [(("red", "small", "left"), reading("red", "small", "left")),
                (("red", "large", "up"), reading("yellow", "small", "up")),  # partners: red -> yellow, large -> small
                (("red", "small", "down"), reading(None, "medium", "down")),  # size: small's partner medium
                (("blue", "small", "left"), reading("green", "large", "left"))]  # neither word nor partner
    shares = per_word(readings)
    assert shares["colour"]["red"] == {"n": 3, "following": 1 / 3, "partner": 1 / 3}
    assert shares["colour"]["blue"] == {"n": 1, "following": 0.0, "partner": 0.0}
    assert shares["size"]["small"] == {"n": 3, "following": 1 / 3, "partner": 1 / 3}
    assert shares["size"]["large"] == {"n": 1, "following": 0.0, "partner": 1.0}
    assert "yellow" not in shares["colour"]  # never asked


def test_world_base_guidance_rows_sample_each_split_at_each_scale_and_restore_the_shipped_one():
    """A stand-in generator that draws the asked colour and size at guidance >= 3 and their confusion partners
    below it: the rows follow 100% and 0%, record their scale, and leave the evaluator at its own scale."""
    import dataclasses

    import torch

    from benchmarks.world_alignment import renders
    from benchmarks.world_base import guidance_rows
    from rlhf.world import scene

    Sampling = dataclasses.make_dataclass("Sampling", [("guidance", float)])

    class Generator:
        def __init__(self):
            self.sampling, self.scales = Sampling(4.0), []

        def videos(self, prompts, seeds):
            self.scales.append(self.sampling.guidance)
            clips, texts = [], []
            for index, text in enumerate(prompts):
                colour, size, direction = scene.parse_prompt(text)
                if self.sampling.guidance < 3:
                    colour, size = scene.CONFUSION["colour"][colour], scene.CONFUSION["size"][size]
                clips += [scene.to_model_range(clip) for clip in renders(scene.prompt(colour, size, direction), index,
                                                                        seeds)]
                texts += [text] * len(seeds)
            yield texts, torch.stack(clips)

    generator = Generator()
    rows = guidance_rows(generator, seeds=[1], guidances=[1.5, 3.0])
    assert [(row["guidance"], row["split"]) for row in rows] == [
        (g, split) for g in (1.5, 3.0) for split in ("train", "validation", "test")]
    assert generator.scales == [1.5] * 3 + [3.0] * 3 and generator.sampling.guidance == 4.0
    for row in rows:
        following = 0.0 if row["guidance"] == 1.5 else 1.0
        assert row["colour"]["following"] == following and row["size"]["following"] == following
        assert row["colour"]["partner"] == row["size"]["partner"] == 1.0 - following
        assert row["direction"]["following"] == 1.0 and row["n"] == len(scene.prompts_for(scene.SPLITS[row["split"]]))


def test_world_base_clip_reads_ranks_the_18_captions_by_the_clip_scorer():
    """A stand-in `clip` that reads the disc's colour from the pixels and always answers "small": it ranks the
    right caption first exactly for small prompts, the right colour always, the right size for small only."""
    from types import SimpleNamespace

    import torch

    from benchmarks.world_base import clip_reads
    from rlhf.world import scene

    class ColourReader:
        def score(self, frames, prompts):  # frames (B, T, 3, H, W) in [0, 1]
            assert frames.shape[1:] == (scene.FRAMES, 3, scene.SIZE, scene.SIZE)
            lit = frames.amax(dim=(1, 3, 4))  # (B, 3): the disc's colour at full value
            scores = []
            for rgb, text in zip(lit, prompts, strict=True):
                colour, size, _ = scene.parse_prompt(text)
                scores.append(-(rgb - torch.tensor(scene.rgb(colour))).abs().sum() + (0.5 if size == "small" else 0))
            return torch.stack(scores)

    evaluator = SimpleNamespace(scorers={"clip": SimpleNamespace(scorer=ColourReader(), weight=1.0)})
    prompts = ["a small red circle moving left", "a large blue circle moving up",
               scene.prompt("cyan", "medium", "down", 2)]  # another phrasing: its captions use it too
    assert clip_reads(evaluator, prompts, seeds=[1, 2]) == {"right": 1 / 3, "colour": 1.0, "size": 1 / 3}


def test_following_per_word_groups_videos_by_the_word_their_prompt_asks_for():
    from benchmarks.world_alignment import following_per_word

    prompts = ["a small red circle moving left", "a large red circle moving up", "a small blue circle moving left"]
    scores = {"colour": np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),  # rows: prompts; columns: seeds
              "size": np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])}
    shares = following_per_word(scores, prompts)
    # Written out: red is asked in rows 0 and 1 (3 of 4 videos red), blue in row 2; small in rows 0 and 2.
    assert shares == {"colour": {"red": 0.75, "blue": 0.0}, "size": {"small": 0.5, "large": 0.5}}


def test_train_methods_reuses_what_a_kept_run_trained_with_the_same_settings(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import benchmarks.world_alignment as benchmark

    stages = []

    def fake_stage(argv):
        argv = [str(a) for a in argv]
        stages.append(argv)
        if argv[0] == "train":
            out = Path(argv[argv.index("--output-dir") + 1])
            (out / "adapter").mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps({"steps_done": 3, "steps": 5, "stopped_by_max_seconds": True}))
        return 10.0

    monkeypatch.setattr(benchmark, "run_stage", fake_stage)
    seed = tmp_path / "seed0"
    first = benchmark.train_methods(seed, 0, "cpu", 150.0, ["dpo", "reward_gradient"])
    stages.clear()
    again = benchmark.train_methods(seed, 0, "cpu", 150.0, ["dpo", "reward_gradient"], reuse=True)
    assert stages == [] and again == first  # nothing retrained, the same adapters, costs and steps
    # Another budget is another run; without reuse everything is trained again.
    benchmark.train_methods(seed, 0, "cpu", 100.0, ["reward_gradient"], reuse=True)
    assert [argv[0] for argv in stages] == ["train"]
    stages.clear()
    benchmark.train_methods(seed, 0, "cpu", 150.0, ["dpo"])
    assert [argv[0] for argv in stages] == ["rollout", "score", "pairs", "train"]
    # An offline method to train means fresh data for all of them: sft is new, so dpo is trained again too.
    stages.clear()
    benchmark.train_methods(seed, 0, "cpu", 150.0, ["dpo", "sft"], reuse=True)
    assert sorted(argv[argv.index("--output-dir") + 1].rsplit("/", 1)[-1] for argv in stages if argv[0] == "train") \
        == ["dpo", "sft"]


def test_online_dpo_runs_the_online_command_with_the_whole_budget_and_seeds_of_its_own(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import yaml

    import benchmarks.world_alignment as benchmark
    from rlhf.world import scene

    stages = []

    def fake_stage(argv):
        argv = [str(a) for a in argv]
        stages.append(argv)
        run = Path(argv[argv.index("--out") + 1])
        run.mkdir(parents=True)
        (run / "rounds.json").write_text(json.dumps([
            {"round": r, "steps_done": 200, "stopped_by_max_seconds": r == 2, "seconds": {"rollout": 25.0}}
            for r in range(3)]))
        return 150.2

    monkeypatch.setattr(benchmark, "run_stage", fake_stage)
    runs = {index: benchmark.train_methods(tmp_path / f"seed{index}", index, "cpu", 150.0,
                                           ["dpo_online", "dpo_online_oracle"]) for index in (0, 1)}
    assert [argv[0] for argv in stages] == ["online"] * 4  # no shared rollout: each run samples its own rounds
    first = stages[0]
    assert first[first.index("--config") + 1] == str(benchmark.CONFIGS / "online_dpo.yaml")
    assert first[first.index("--max-seconds") + 1] == "150.0"  # the whole budget: its data is inside the run
    run = runs[0]["dpo_online"]
    assert run["steps_done"] == 600 and run["rounds_done"] == 3 and run["stopped_by_budget"]
    assert run["adapter"] == tmp_path / "seed0" / "dpo_online" / "run" / "round-02" / "train" / "adapter"
    # Seeds: the rollout and training namespaces, per training seed a block above the offline methods' indices.
    seeds = [int(argv[argv.index("--seed") + 1]) for argv in stages]
    assert seeds == [scene.seed("rollout", 1000)] * 2 + [scene.seed("rollout", 2000)] * 2
    assert stages[0][stages[0].index("--train") + 1] == f"{{seed: {scene.seed('training', 1000)}}}"
    # The oracle variant: the same config with the oracle's scores and the oracle pairs' weights.
    oracle_config = yaml.safe_load(Path(stages[1][stages[1].index("--config") + 1]).read_text())
    shipped = yaml.safe_load((benchmark.CONFIGS / "online_dpo.yaml").read_text())
    assert oracle_config["pairs"]["weights"] == benchmark.ORACLE_WEIGHTS
    assert oracle_config["train"] == shipped["train"] and oracle_config["rollout"] == shipped["rollout"]
    scorers = yaml.safe_load(Path(oracle_config["rewards"]).read_text())["scorers"]
    assert {name: s["options"]["attribute"] for name, s in scorers.items()} == {
        "oracle_colour": "colour", "oracle_size": "size", "oracle_cleanliness": "cleanliness"}
