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


def test_world_definition():
    assert len(scene.COLOURS) == 6 and len(scene.SHAPES) == 3 and len(scene.DIRECTIONS) == 4
    assert len(scene.HELD_OUT) >= 4
    assert set(scene.HELD_OUT).isdisjoint(scene.TRAINING)
    assert len(scene.HELD_OUT) + len(scene.TRAINING) == 18
    # every colour and every shape is still seen in training, in other combinations
    assert {c for c, _ in scene.TRAINING} == set(scene.COLOURS)
    assert {s for _, s in scene.TRAINING} == set(scene.SHAPES)
    assert len(scene.PHRASINGS) >= 3
    assert scene.prompt("red", "circle", "left") == "a red circle moving left"
    for colour, shape, direction, phrasing in product(scene.COLOURS, scene.SHAPES, scene.DIRECTIONS, range(3)):
        assert scene.parse_prompt(scene.prompt(colour, shape, direction, phrasing)) == (colour, shape, direction)
    assert scene.parse_prompt("a yellow taxi in traffic") is None


def test_renders_follow_the_spec():
    rng = random.Random(1)
    for colour, shape, direction in product(scene.COLOURS, scene.SHAPES, scene.DIRECTIONS):
        spec = scene.SceneSpec.sample(colour, shape, direction, rng)
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
        # the centroid moves the stated way by speed * (T - 1) pixels
        ys, xs = np.nonzero(lit[0])
        ye, xe = np.nonzero(lit[-1])
        dx, dy = scene.DIRECTIONS[direction]
        travel = spec.speed * (scene.FRAMES - 1)
        assert (xe.mean() - xs.mean()) == pytest.approx(dx * travel, abs=1.0)
        assert (ye.mean() - ys.mean()) == pytest.approx(dy * travel, abs=1.0)


def _clips(count_per_key: int, seed: int):
    rng = random.Random(seed)
    for colour, shape, direction in product(scene.COLOURS, scene.SHAPES, scene.DIRECTIONS):
        for _ in range(count_per_key):
            yield (colour, shape, direction), scene.render(scene.SceneSpec.sample(colour, shape, direction, rng))


def _rotate(frames: np.ndarray, degrees: float) -> np.ndarray:
    video = degrade._float(frames)  # (T, 3, H, W)
    return degrade._uint8(torch.stack([degrade._rotate_hue(frame, degrees) for frame in video]))


def _blurred(frames: np.ndarray, sigma: float) -> np.ndarray:
    return degrade._uint8(degrade._gaussian_blur(degrade._float(frames), sigma))


@pytest.mark.parametrize("spoil", ["clean", "blur", "hue_shift", "dim"])
def test_oracle_reads_every_attribute(spoil):
    """>= 99% on clean renders, and on the blur and colour shifts a VAE introduces."""
    hits = {"colour": 0, "shape": 0, "direction": 0}
    total = 0
    for (colour, shape, direction), frames in _clips(2 if spoil == "clean" else 1, seed=7):
        if spoil == "blur":
            frames = _blurred(frames, 1.0)
        elif spoil == "hue_shift":
            frames = _rotate(frames, 20.0)
        elif spoil == "dim":
            frames = (frames.astype(np.float32) * 0.8).round().astype(np.uint8)
        reading = read_clip(frames)
        for name, ok in reading.matches(colour, shape, direction).items():
            if name in hits:
                hits[name] += ok
        total += 1
    assert total == (144 if spoil == "clean" else 72)
    for name, count in hits.items():
        assert count / total >= 0.99, (spoil, name, count / total)


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


def test_oracle_scorer_reports_accuracy_and_refuses_other_prompts():
    from rlhf.errors import UserError
    from rlhf.world.metrics import OracleOptions, OracleScorer

    rng = random.Random(0)
    spec = scene.SceneSpec.sample("blue", "square", "up", rng)
    frames = torch.from_numpy(scene.render(spec)).float().div(255).permute(0, 3, 1, 2)[None].repeat(2, 1, 1, 1, 1)
    prompts = ["a blue square moving up", "a red square moving up"]
    assert OracleScorer(OracleOptions("all"))(frames, prompts).tolist() == [1.0, 0.0]
    assert OracleScorer(OracleOptions("shape"))(frames, prompts).tolist() == [1.0, 1.0]
    assert OracleScorer(OracleOptions("cleanliness"))(frames, prompts).min() >= 0.95
    with pytest.raises(UserError, match="not a shapes-world prompt"):
        OracleScorer(OracleOptions("colour"))(frames, ["a cat", "a dog"])


def test_word_merges_make_every_world_word_one_clip_token(tmp_path):
    from transformers import CLIPTokenizer

    from rlhf.models.tiny import write_clip_tokenizer
    from rlhf.world.pretrain import CLIP_LENGTH, word_merges

    words = scene.vocabulary()
    write_clip_tokenizer(tmp_path / "tokenizer", word_merges(words), CLIP_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in words)
    longest = max(len(tokenizer(scene.prompt(c, s, d, p)).input_ids)
                  for c, s, d, p in product(scene.COLOURS, scene.SHAPES, scene.DIRECTIONS, range(3)))
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
    embeds = parts.prompt_encoder.encode(["a red circle moving left", "a blue square moving up"])
    assert embeds.prompt_embeds.shape[1] <= 32  # short world sequences: CLIP + T5 lengths of its tokenizers
    assert not torch.allclose(embeds.prompt_embeds[0], embeds.prompt_embeds[1])
    clip = ClipScorer(ClipOptions(checkpoint=f"local-dir:{CLIP_DIR}", num_frames=3))
    aesthetic = AestheticScorer(AestheticOptions(head=str(AESTHETIC_HEAD), clip_checkpoint=f"local-dir:{CLIP_DIR}",
                                                 num_frames=3))
    rng = random.Random(5)
    spec = scene.SceneSpec.sample("blue", "square", "up", rng)
    clean = torch.from_numpy(scene.render(spec)).float().div(255).permute(0, 3, 1, 2)[None]
    spoilt = torch.from_numpy(degrade.degrade(scene.render(spec), "noise", 1.0, rng)).float().div(255)
    spoilt = spoilt.permute(0, 3, 1, 2)[None]
    right, wrong = clip(clean.repeat(2, 1, 1, 1, 1), ["a blue square moving up", "a red triangle moving up"])
    assert right > wrong  # the learned CLIP reads colour and shape
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
                                   recorded["clips_per_prompt"], [], None, stop_after=50)
    finally:
        torch.set_num_threads(threads)
    assert losses == recorded["losses"][:50]


WORLD_CONFIGS = {  # configs/world file -> the dataclass it loads into, plus fields given on the command line
    "rollout.yaml": ("rollouts.config:RolloutConfig", {}),
    "rewards.yaml": ("rewards.config:RewardsConfig", {}),
    "ground_truth.yaml": ("rewards.config:RewardsConfig", {}),
    "pairs.yaml": ("rlhf.commands.pairs:PairsStageConfig", {"store": "s", "out": "o"}),
    "dpo.yaml": ("dpo.config:DPOConfig", {}),
    "reward_gradient.yaml": ("dpo.reward_gradient_config:RewardGradientConfig", {}),
    "grpo.yaml": ("dpo.grpo_config:GRPOConfig", {}),
    "sft.yaml": ("dpo.sft_config:SFTConfig", {}),
    "eval.yaml": ("rlhf.evaluation:EvalConfig", {"adapters": ["a"]}),
    "compare.yaml": ("rlhf.commands.compare:CompareConfig", {"adapters": ["a"]}),
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
    for key in ("model", "prompts", "rewards", "ground_truth"):
        value = getattr(config, key, None)
        if isinstance(value, str):
            assert Path(value).exists(), (name, key, value)


def test_world_prompt_files_match_the_world_definition():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "configs" / "world"
    assert (folder / "train_prompts.txt").read_text().split("\n")[:-1] == scene.prompts_for(scene.TRAINING)
    assert (folder / "heldout_prompts.txt").read_text().split("\n")[:-1] == scene.prompts_for(scene.HELD_OUT)


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
        assert combo == (spec.colour, spec.shape, "clean")
    assert len({caption for caption in captions}) > 1 and torch.all(quality == 8.0)
    rendered, *_ = frame_batch(random.Random(1), 8, degraded_share=0.0, pool=pool, pool_share=0.0)
    assert rendered.amax() == 1.0  # renders: full-value colours, none from the pool


def test_transformer_early_stop_saves_the_model_there_and_logs_it(tmp_path):
    """`stop_at` ends the run inside its schedule: the model is the EMA there, snapshots before it kept."""
    import shutil

    from safetensors.torch import load_file

    from rlhf.world import MODEL_DIR
    from rlhf.world.pretrain import Log, train_transformer

    shutil.copytree(MODEL_DIR, tmp_path / "model")
    log = Log(tmp_path / "pretrain_log.json", "test")
    losses = train_transformer(tmp_path, seed=0, steps=20, batch=2, clips_per_prompt=1, save_at=[2, 5, 20], log=log,
                               phase=2, lr=1e-4, stop_at=3)
    assert len(losses) == 3
    entry = json.loads((tmp_path / "pretrain_log.json").read_text())["transformer_phase2"]
    assert entry["stop_at"] == 3 and entry["steps"] == 20 and entry["losses"] == losses
    assert (tmp_path / "transformer-phase2-2").is_dir() and not (tmp_path / "transformer-phase2-5").exists()
    shipped = json.loads((MODEL_DIR / "transformer" / "config.json").read_text())
    saved = json.loads((tmp_path / "model" / "transformer" / "config.json").read_text())
    assert saved["num_layers"] == shipped["num_layers"]  # a later phase keeps the saved architecture
    assert not all(torch.equal(a, b) for a, b in zip(
        load_file(str(MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors")).values(),
        load_file(str(tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors")).values(),
        strict=True))
