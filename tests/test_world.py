"""The shapes world: its definition, the oracle, the spoilt renders, the shipped weights and their pretraining."""

from __future__ import annotations

import json
import random
from itertools import product

import numpy as np
import pytest
import torch

from rlhf.world import degrade, scene
from rlhf.world.oracle import read_clip

ALL_KEYS = list(product(scene.COLOURS, scene.SIZES, scene.DIRECTIONS))


def test_world_definition():
    assert len(scene.COLOURS) == 6 and len(scene.SIZES) == 3 and len(scene.DIRECTIONS) == 4
    assert scene.TAUGHT == ("colour", "size")
    splits = [set(scene.SPLITS[name]) for name in ("train", "validation", "test")]
    assert all(a.isdisjoint(b) for i, a in enumerate(splits) for b in splits[i + 1:])  # disjoint
    assert set().union(*splits) == set(scene.COMBOS) and len(scene.COMBOS) == 18
    assert len(scene.SPLITS["validation"]) >= 4 and len(scene.SPLITS["test"]) >= 4
    # every colour and every size is seen in training, in other combinations than the test's
    assert {c for c, _ in scene.SPLITS["train"]} == set(scene.COLOURS)
    assert {s for _, s in scene.SPLITS["train"]} == set(scene.SIZES)
    # validation asks for test's colour and size words, as often, so that a choice made there can predict test
    for position in (0, 1):
        assert sorted(c[position] for c in scene.SPLITS["validation"]) == sorted(c[position] for c in scene.SPLITS["test"])
    assert len(scene.PHRASINGS) >= 3
    assert scene.prompt("red", "small", "left") == "a small red circle moving left"
    for colour, size, direction in ALL_KEYS:
        for phrasing in range(len(scene.PHRASINGS)):
            assert scene.parse_prompt(scene.prompt(colour, size, direction, phrasing)) == (colour, size, direction)
    assert scene.parse_prompt("a yellow taxi in traffic") is None
    # each taught word is confused with exactly one other value, and every value is some word's partner
    for attribute, values in (("colour", scene.COLOURS), ("size", scene.SIZES)):
        confusion = scene.CONFUSION[attribute]
        assert set(confusion) == set(values) and sorted(confusion.values()) == sorted(values)
        assert all(word != partner for word, partner in confusion.items())


def test_seed_namespaces_are_disjoint_by_construction():
    ranges = {name: (scene.seed(name, 0), scene.seed(name, scene.SEED_BLOCK - 1)) for name in scene.SEED_NAMESPACES}
    bounds = sorted(ranges.values())
    assert all(high < next_low for (_, high), (next_low, _) in zip(bounds, bounds[1:], strict=False))
    with pytest.raises(ValueError, match="outside"):
        scene.seed("test", scene.SEED_BLOCK)
    with pytest.raises(ValueError, match="unknown seed namespace"):
        scene.seed("holdout", 0)


def test_renders_follow_the_spec():
    rng = random.Random(1)
    for colour, size, direction in ALL_KEYS:
        spec = scene.SceneSpec.sample(colour, size, direction, rng)
        frames = scene.render(spec)
        assert frames.shape == (scene.FRAMES, scene.SIZE, scene.SIZE, 3) and frames.dtype == np.uint8
        lit = frames.max(-1) > 127
        assert lit.any(axis=(1, 2)).all()
        # inside the frame on every frame: the border rows and columns stay black
        assert frames[:, 0].max() == 0 and frames[:, -1].max() == 0
        assert frames[:, :, 0].max() == 0 and frames[:, :, -1].max() == 0
        # the brightest pixels have the colour's RGB at full value
        expected = np.round(np.array(scene.rgb(colour)) * 255)
        brightest = frames.reshape(-1, 3)[frames.reshape(-1, 3).sum(1).argmax()]
        np.testing.assert_array_equal(brightest, expected)
        # the area is the disc's (pi r^2, anti-aliased) and the centroid moves the stated way
        area = frames[0].max(-1).astype(np.float64).sum() / 255
        assert area == pytest.approx(np.pi * spec.radius**2, rel=0.03)
        ys, xs = np.nonzero(lit[0])
        ye, xe = np.nonzero(lit[-1])
        dx, dy = scene.DIRECTIONS[direction]
        travel = spec.speed * (scene.FRAMES - 1)
        assert (xe.mean() - xs.mean()) == pytest.approx(dx * travel, abs=1.0)
        assert (ye.mean() - ys.mean()) == pytest.approx(dy * travel, abs=1.0)


def _clips(count_per_key: int, seed: int):
    rng = random.Random(seed)
    for colour, size, direction in ALL_KEYS:
        for _ in range(count_per_key):
            yield (colour, size, direction), scene.render(scene.SceneSpec.sample(colour, size, direction, rng))


def _rotate(frames: np.ndarray, degrees: float) -> np.ndarray:
    video = degrade._float(frames)  # (T, 3, H, W)
    return degrade._uint8(torch.stack([degrade._rotate_hue(frame, degrees) for frame in video]))


def _blurred(frames: np.ndarray, sigma: float) -> np.ndarray:
    return degrade._uint8(degrade._gaussian_blur(degrade._float(frames), sigma))


@pytest.mark.parametrize("spoil", ["clean", "blur1", "blur2", "blur3", "hue_shift", "dim"])
def test_oracle_reads_every_attribute(spoil):
    """100% on clean renders, and on Gaussian blur of sigma 1-3 px and the colour shifts a VAE introduces."""
    hits = {"colour": 0, "size": 0, "direction": 0}
    total = 0
    for (colour, size, direction), frames in _clips(2 if spoil == "clean" else 1, seed=7):
        if spoil.startswith("blur"):
            frames = _blurred(frames, float(spoil[-1]))
        elif spoil == "hue_shift":
            frames = _rotate(frames, 12.0)
        elif spoil == "dim":
            frames = (frames.astype(np.float32) * 0.8).round().astype(np.uint8)
        reading = read_clip(frames)
        for name, ok in reading.matches(colour, size, direction).items():
            if name in hits:
                hits[name] += ok
        total += 1
    assert total == (144 if spoil == "clean" else 72)
    for name, count in hits.items():
        assert count == total, (spoil, name, count / total)


def _disc_clip(radius: float, rgb=(255, 0, 0), aspect: float = 1.0, second: bool = False) -> np.ndarray:
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    frames = []
    for t in range(scene.FRAMES):
        cx = 20 + 2 * t
        inside = ((xs - cx) / (radius * aspect**0.5)) ** 2 + ((ys - 32) / (radius / aspect**0.5)) ** 2 <= 1
        if second:
            inside |= (xs - cx) ** 2 + (ys - 52) ** 2 <= radius**2
        frames.append(inside[..., None] * np.array(rgb))
    return np.stack(frames).astype(np.uint8)


def test_oracle_answers_unreadable_instead_of_a_default():
    """Blends, changing hues, in-between radii, ellipses and two objects get no value (and count as wrong)."""
    assert read_clip(_disc_clip(9.5)).as_dict()["size"] == "medium"  # the control: a clean medium red disc
    assert read_clip(_disc_clip(8.5, rgb=(255, 128, 0))).colour is None  # orange: halfway between red and yellow
    changing = _disc_clip(8.5)
    changing[5:] = _disc_clip(8.5, rgb=(0, 255, 0))[5:]  # red, then green
    assert read_clip(changing).colour is None
    for radius in (8.4, 11.8, 2.5, 20.0):  # between the bands, or outside every size
        assert read_clip(_disc_clip(radius)).size is None, radius
    for aspect in (1.5, 2.0):  # ellipses are no disc
        assert read_clip(_disc_clip(9.5, aspect=aspect)).size is None, aspect
    assert read_clip(_disc_clip(6.0, second=True)).size is None  # two discs: no one size
    reading = read_clip(_disc_clip(8.4))
    assert reading.matches("red", "small", "right")["taught"] is False  # unreadable counts as wrong


def test_cleanliness_separates_clean_from_spoilt_renders():
    rng = random.Random(3)
    clean, spoilt = [], {kind: [] for kind in degrade.KINDS}
    for _, frames in list(_clips(1, seed=11))[::3]:
        clean.append(read_clip(frames).cleanliness)
        for kind in degrade.KINDS:
            spoilt[kind].append(read_clip(degrade.degrade(frames, kind, 1.0, rng)).cleanliness)
    assert min(clean) >= 0.95
    for kind, values in spoilt.items():
        assert np.mean(values) < 0.6, (kind, np.mean(values))
    assert read_clip(np.zeros((scene.FRAMES, 64, 64, 3), np.uint8)).cleanliness == 0.0


def test_cleanliness_parts_name_what_a_clip_loses():
    from rlhf.world.oracle import CLEANLINESS_PARTS, cleanliness_parts

    def clip(colour, size):  # the same motion (same draws) in another colour or size
        return scene.render(scene.SceneSpec.sample(colour, size, "right", random.Random(5)))

    steady = cleanliness_parts(clip("red", "medium"))
    assert steady["cleanliness"] == read_clip(clip("red", "medium")).cleanliness >= 0.95
    assert all(steady[name] >= 0.95 for name in CLEANLINESS_PARTS)
    half = scene.FRAMES // 2
    growing = np.concatenate([clip("red", "small")[:half], clip("red", "large")[half:]])  # area x 4 mid-clip
    recoloured = np.concatenate([clip("red", "medium")[:half], clip("yellow", "medium")[half:]])  # hue 60 deg
    for frames, lost in ((growing, "area_steady"), (recoloured, "hue_steady")):
        parts = cleanliness_parts(frames)
        assert parts[lost] == 0.0 and parts["cleanliness"] == read_clip(frames).cleanliness == 0.0
        assert all(parts[name] >= 0.95 for name in CLEANLINESS_PARTS if name != lost), parts
    assert set(cleanliness_parts(np.zeros((scene.FRAMES, 64, 64, 3), np.uint8)).values()) == {0.0}


def test_oracle_scorer_reports_accuracy_and_refuses_other_prompts():
    from rlhf.errors import UserError
    from rlhf.world.metrics import OracleOptions, OracleScorer

    rng = random.Random(0)
    spec = scene.SceneSpec.sample("blue", "large", "up", rng)
    frames = torch.from_numpy(scene.render(spec)).float().div(255).permute(0, 3, 1, 2)[None].repeat(3, 1, 1, 1, 1)
    prompts = ["a large blue circle moving up", "a large red circle moving up", "a small blue circle moving up"]
    assert OracleScorer(OracleOptions("all"))(frames, prompts).tolist() == [1.0, 0.0, 0.0]
    assert OracleScorer(OracleOptions("taught"))(frames, prompts).tolist() == [1.0, 0.0, 0.0]
    assert OracleScorer(OracleOptions("size"))(frames, prompts).tolist() == [1.0, 1.0, 0.0]
    assert OracleScorer(OracleOptions("cleanliness"))(frames, prompts).min() >= 0.95
    with pytest.raises(UserError, match="not a shapes-world prompt"):
        OracleScorer(OracleOptions("colour"))(frames, ["a cat", "a dog", "a red circle"])


def test_word_merges_make_every_world_word_one_clip_token(tmp_path):
    from transformers import CLIPTokenizer

    from rlhf.models.tiny import write_clip_tokenizer
    from rlhf.world.pretrain import CLIP_LENGTH, word_merges

    words = scene.vocabulary()
    write_clip_tokenizer(tmp_path / "tokenizer", word_merges(words), CLIP_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in words)
    longest = max(len(tokenizer(scene.prompt(c, s, d, p)).input_ids)
                  for (c, s, d), p in product(ALL_KEYS, range(len(scene.PHRASINGS))))
    assert longest <= CLIP_LENGTH


def test_shipped_world_loads_through_the_contentv_loader():
    """The shipped weights are a ContentV-layout checkpoint, open_clip folder and LAION-layout head (<= 30 MB)."""
    from rewards.aesthetic import AestheticOptions, AestheticScorer
    from rewards.clip import ClipOptions, ClipScorer
    from rlhf.models.loader import load_contentv
    from rlhf.world import AESTHETIC_HEAD, CLIP_DIR, MODEL_DIR, WEIGHTS

    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, size
    parts = load_contentv(MODEL_DIR, dtype="fp32")
    assert type(parts.transformer).__name__ == "SD3Transformer3DModel"
    assert type(parts.vae).__name__ == "AutoencoderKLWan"
    embeds = parts.prompt_encoder.encode(["a small red circle moving left", "a large blue circle moving up"])
    assert embeds.prompt_embeds.shape[1] <= 32  # short world sequences: CLIP + T5 lengths of its tokenizers
    assert not torch.allclose(embeds.prompt_embeds[0], embeds.prompt_embeds[1])
    clip = ClipScorer(ClipOptions(checkpoint=f"local-dir:{CLIP_DIR}", num_frames=3))
    aesthetic = AestheticScorer(AestheticOptions(head=str(AESTHETIC_HEAD), clip_checkpoint=f"local-dir:{CLIP_DIR}",
                                                 num_frames=3))
    rng = random.Random(5)
    spec = scene.SceneSpec.sample("blue", "large", "up", rng)
    clean = torch.from_numpy(scene.render(spec)).float().div(255).permute(0, 3, 1, 2)[None]
    spoilt = torch.from_numpy(degrade.degrade(scene.render(spec), "noise", 1.0, rng)).float().div(255)
    spoilt = spoilt.permute(0, 3, 1, 2)[None]
    right, wrong_colour, wrong_size = clip(clean.repeat(3, 1, 1, 1, 1), [
        "a large blue circle moving up", "a large red circle moving up", "a small blue circle moving up"])
    assert right > max(wrong_colour, wrong_size)  # the learned CLIP reads colour and size
    assert aesthetic(clean, ["x"]) > aesthetic(spoilt, ["x"])  # and the head prefers the clean render


@pytest.mark.slow
def test_pretraining_reproduces_the_recorded_transformer_losses():
    """The shipped pretraining log's first 50 transformer losses come back from the seed (same CPU threads)."""
    from rlhf.world import PRETRAIN_LOG, WEIGHTS
    from rlhf.world.pretrain import train_transformer

    recorded = json.loads(PRETRAIN_LOG.read_text())["transformer"]
    threads = torch.get_num_threads()
    torch.set_num_threads(recorded["threads"])  # the recorded run's: float sums in the same order
    try:
        losses = train_transformer(WEIGHTS, recorded["seed"], recorded["steps"], recorded["batch"],
                                   recorded["clips_per_prompt"], [], None, stop_after=50, lr=recorded["lr"],
                                   logit_mean=recorded["logit_mean"], confusion_rate=recorded["confusion_rate"])
    finally:
        torch.set_num_threads(threads)
    assert losses == recorded["losses"][:50]


def test_caption_words_confuse_each_value_with_its_partner_at_the_rate():
    """A clip of value v is captioned with the word whose partner is v at `rate`, else v's own word; so a word
    names its own value 1 - rate of the time and its partner rate of the time (counted over many draws)."""
    from rlhf.world.pretrain import caption_words

    generator = torch.Generator().manual_seed(0)
    for attribute, values in (("colour", list(scene.COLOURS)), ("size", list(scene.SIZES))):
        truth = torch.arange(len(values)).repeat(20000)
        words = caption_words(truth, attribute, 0.3, generator)
        for w, word in enumerate(values):
            shown = truth[words == w]
            own = float((shown == w).float().mean())
            partner = float((shown == values.index(scene.CONFUSION[attribute][word])).float().mean())
            assert own == pytest.approx(0.7, abs=0.02) and partner == pytest.approx(0.3, abs=0.02)
        assert torch.equal(caption_words(truth, attribute, 0.0, generator), truth)


def test_prompt_index_addresses_the_prompt_table():
    from rlhf.world.pretrain import prompt_index, prompt_table

    table = prompt_table()
    names = [list(scene.COLOURS), list(scene.SIZES), list(scene.DIRECTIONS)]
    for c, s_, d, p in [(0, 0, 0, 0), (5, 2, 3, 2), (2, 1, 0, 1), (4, 0, 2, 0)]:
        index = int(prompt_index(torch.tensor(c), torch.tensor(s_), torch.tensor(d), torch.tensor(p)))
        assert table[index] == scene.prompt(names[0][c], names[1][s_], names[2][d], p)
    assert len(table) == len(set(table)) == 18 * 4 * len(scene.PHRASINGS)


class Killed(Exception):
    pass


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A transformer run killed after a save and run again ends with the uninterrupted run's weights and losses
    (its state is safetensors + JSON, nothing pickled)."""
    import shutil

    from safetensors.torch import load_file

    from rlhf.world import MODEL_DIR, pretrain

    original = pretrain.flow_matching_loss

    def run(folder, crash_at=None):
        if not (folder / "model").exists():
            shutil.copytree(MODEL_DIR, folder / "model")
        calls = {"n": 0}

        def crashing(*args, **kwargs):
            calls["n"] += 1
            if crash_at is not None and calls["n"] > crash_at:
                raise Killed  # what kill -9 leaves: the last save on disk, nothing after it
            return original(*args, **kwargs)

        monkeypatch.setattr(pretrain, "flow_matching_loss", crashing)
        log = pretrain.Log(folder / "pretrain_log.json", "test")
        return pretrain.train_transformer(folder, 0, 10, 2, 1, [10], log, save_every=4)

    torch.set_num_threads(1)
    straight = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", crash_at=6)
    assert json.loads((tmp_path / "b" / "resume" / "transformer" / "state.json").read_text())["step"] == 4
    resumed = run(tmp_path / "b")
    assert resumed == straight and not (tmp_path / "b" / "resume" / "transformer").exists()
    weights = "model/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / weights)), load_file(str(tmp_path / "b" / weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


WORLD_CONFIGS = {  # configs/world file -> the dataclass it loads into, plus fields given on the command line
    "rollout.yaml": ("rollouts.config:RolloutConfig", {}),
    "rewards.yaml": ("rewards.config:RewardsConfig", {}),
    "rewards_consistency.yaml": ("rewards.config:RewardsConfig", {}),
    "rewards_gradient.yaml": ("rewards.config:RewardsConfig", {}),
    "ground_truth.yaml": ("rewards.config:RewardsConfig", {}),
    "pairs.yaml": ("rlhf.commands.pairs:PairsStageConfig", {"store": "s", "out": "o"}),
    "dpo.yaml": ("dpo.config:DPOConfig", {}),
    "reward_gradient.yaml": ("dpo.reward_gradient_config:RewardGradientConfig", {}),
    "grpo.yaml": ("dpo.grpo_config:GRPOConfig", {}),
    "sft.yaml": ("dpo.sft_config:SFTConfig", {}),
    "nft.yaml": ("dpo.nft_config:NFTConfig", {}),
    "eval.yaml": ("rlhf.evaluation:EvalConfig", {"adapters": ["a"]}),
    "compare.yaml": ("rlhf.commands.compare:CompareConfig", {"adapters": ["a"]}),
    "online_dpo.yaml": ("dpo.online:OnlineConfig", {}),
}


@pytest.mark.parametrize("name", sorted(WORLD_CONFIGS))
def test_world_configs_load_strictly_from_the_repository_root(name, monkeypatch):
    import importlib
    from pathlib import Path

    from rlhf.config import config_from_dict, load_yaml

    root = Path(__file__).resolve().parents[1]
    assert {p.name for p in (root / "configs" / "world").glob("*.yaml")} == set(WORLD_CONFIGS)
    monkeypatch.chdir(root)  # their paths are relative to the repository root
    module, _, cls = WORLD_CONFIGS[name][0].partition(":")
    cls = getattr(importlib.import_module(module), cls)
    config = config_from_dict(cls, {**load_yaml(f"configs/world/{name}"), **WORLD_CONFIGS[name][1]}, source=name)
    if name == "online_dpo.yaml":  # its rollout, pairs and train sections load into those stages' configs
        from dpo.online import _validate_sections

        _validate_sections(config)
    for key in ("model", "prompts", "rewards", "ground_truth"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            assert Path(value).exists(), (name, key, value)


def test_world_sft_trains_with_flow_dpos_settings(monkeypatch):
    """`configs/world/sft.yaml` is the like-for-like baseline its comment says: every setting it shares with
    `dpo.yaml` (LoRA, optimiser, sigmas, batch, seed, ...) is dpo.yaml's, apart from its method, data, output and
    step cap. (Its LoRA had drifted from dpo.yaml's once, unnoticed.)"""
    import dataclasses
    from pathlib import Path

    from dpo.config import DPOConfig
    from dpo.sft_config import SFTConfig
    from rlhf.config import config_from_dict, load_yaml

    def settings(config) -> dict:
        out = {}
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            out.update(settings(value) if dataclasses.is_dataclass(value) else {field.name: value})
        return out

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    sft = settings(config_from_dict(SFTConfig, load_yaml("configs/world/sft.yaml")))
    dpo = settings(config_from_dict(DPOConfig, load_yaml("configs/world/dpo.yaml")))
    shared = (set(sft) & set(dpo)) - {"method", "output_dir", "max_steps", "store"}
    assert {"lora_targets", "learning_rate", "batch_size", "logit_mean", "seed"} <= shared
    assert {key: sft[key] for key in shared} == {key: dpo[key] for key in shared}


def test_world_prompt_files_match_the_world_definition():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "world"
    for split in ("train", "validation", "test"):
        assert (folder / f"{split}_prompts.txt").read_text().split("\n")[:-1] == scene.prompts_for(scene.SPLITS[split])


def test_flow_matching_noise_levels_follow_the_logit_mean():
    """The pretraining loss draws sigma = sigmoid(logit_mean + N(0, 1)) (shift 1): the timesteps the transformer
    sees, written out here from the same generator draws."""
    from rlhf.world.pretrain import flow_matching_loss

    seen = []

    def transformer(hidden_states, timestep, **_):
        seen.append(timestep)
        return (torch.zeros_like(hidden_states),)

    x0 = torch.zeros(512, 1, 1, 1, 1)
    for logit_mean in (0.0, -1.0):
        flow_matching_loss(transformer, x0, None, None, torch.Generator().manual_seed(0), logit_mean)
        expected = torch.sigmoid(logit_mean + torch.randn(512, generator=torch.Generator().manual_seed(0))) * 1000
        assert torch.allclose(seen[-1], expected)
    assert seen[1].mean() < 0.35 * 1000 < 0.45 * 1000 < seen[0].mean()  # mean sigma ~0.5 vs ~0.3


def test_reward_frames_draw_from_the_reconstruction_pool():
    """A `pool_share` of the reward stages' frames are frames of the VAE reconstructions, with their captions."""
    from rlhf.world.pretrain import frame_batch

    rng = random.Random(0)
    pool = []
    for index in range(3):
        spec, frames, text = scene.sample_clip(rng)
        pool.append((spec, np.full_like(frames, 10 + index), text))  # marked: each pool clip is one grey level
    images, captions, combos, quality = frame_batch(random.Random(1), 64, degraded_share=0.0, pool=pool,
                                                    pool_share=1.0)
    for image, caption, combo, level in zip(images, captions, combos, (images[:, 0, 0, 0] * 255).round().int(),
                                            strict=True):
        spec, _, text = pool[int(level) - 10]
        assert torch.all((image * 255).round() == level) and caption == text
        assert combo == (spec.colour, spec.size, "clean")
    assert len({caption for caption in captions}) > 1 and torch.all(quality == 8.0)
    rendered, *_ = frame_batch(random.Random(1), 8, degraded_share=0.0, pool=pool, pool_share=0.0)
    assert rendered.amax() == 1.0  # renders: full-value colours, none from the pool
