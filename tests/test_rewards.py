"""Reward registry, config, builder and the weight-free analytic scorers (no model files needed)."""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import pytest
import torch

from rewards.analytic import BrightnessScorer, ColorfulnessScorer, ContrastScorer, FrameDiffMotionScorer
from rewards.base import ModelCache, Scorer, segment_middles
from rewards.build import WeightedScorer, build_scorers, score_videos, weighted_reward
from rewards.config import RewardsConfig, scorer_specs
from rewards.registry import SCORERS, scorer_class
from rlhf.config import ConfigError, config_from_dict, help_problems, load_yaml, option
from rlhf.errors import UserError

ANALYTIC = {"brightness": {}, "contrast": {}, "colorfulness": {}, "frame_diff_motion": {}}


@dataclasses.dataclass
class ConstantOptions:
    value: float = option(1.0, "The score every video gets.")

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ConfigError("value", f"must be >= 0, got {self.value}")


class ConstantScorer(Scorer):
    """A custom scorer loaded through `class: tests.test_rewards:ConstantScorer`."""

    name = "constant"
    Options = ConstantOptions

    def score(self, frames, prompts):
        return frames.new_full((frames.shape[0],), self.options.value)


class NotAScorer:
    pass


def video(batch=2, frames=5, height=16, width=20, seed=0) -> torch.Tensor:
    return torch.rand(batch, frames, 3, height, width, generator=torch.Generator().manual_seed(seed))


# --- registry and config ---------------------------------------------------------------------------


def test_every_registered_scorer_imports_with_documented_options():
    for name in SCORERS:
        cls = scorer_class(name)
        assert issubclass(cls, Scorer) and cls.name == name
        assert cls.__doc__ and cls.Options.__doc__
        assert help_problems(cls.Options) == [], name
    assert help_problems(RewardsConfig) == []


def test_unknown_scorer_lists_the_known_ones_and_suggests_the_nearest():
    with pytest.raises(UserError, match=r"rewards\.scorers\.clpi: unknown scorer 'clpi'; did you mean 'clip'\? "
                                        r"known scorers: clip, aesthetic, motion, consistency, brightness"):
        RewardsConfig(scorers={"clpi": {}})


def test_unknown_option_suggests_the_nearest_field():
    with pytest.raises(UserError, match=r"rewards\.scorers\.clip: unknown field 'chekpoint' .*did you mean 'checkpoint'"):
        RewardsConfig(scorers={"clip": {"chekpoint": "/models/ViT-L-14.pt"}})
    with pytest.raises(UserError, match=r"rewards\.scorers\.motion: field 'stride' expects an integer"):
        RewardsConfig(scorers={"motion": {"backend": "lucas_kanade", "stride": "fast"}})


def test_options_are_validated_when_the_config_loads():
    with pytest.raises(UserError, match=r"rewards\.scorers\.clip: field 'checkpoint' is required: .*ViT-L-14\.pt"):
        RewardsConfig(scorers={"clip": {}})
    with pytest.raises(UserError, match=r"raft_weights' is required for backend 'raft_large'.*lucas_kanade"):
        RewardsConfig(scorers={"motion": {}})
    with pytest.raises(UserError, match=r"raft_weights' is only used by the raft backends"):
        RewardsConfig(scorers={"motion": {"backend": "lucas_kanade", "raft_weights": "x.pth"}})
    with pytest.raises(UserError, match=r"expects one of 'raft_large', 'raft_small', 'lucas_kanade'"):
        RewardsConfig(scorers={"motion": {"backend": "farneback"}})
    with pytest.raises(UserError, match=r"weight expects a finite number, got 'heavy'"):
        RewardsConfig(scorers={"brightness": {"weight": "heavy"}})
    with pytest.raises(ConfigError, match="needs at least one scorer"):
        RewardsConfig()
    with pytest.raises(ConfigError, match="batch_size"):
        RewardsConfig(scorers=dict(ANALYTIC), batch_size=0)


def test_yaml_config_with_builtin_and_custom_scorers(tmp_path):
    path = tmp_path / "rewards.yaml"
    path.write_text(textwrap.dedent("""\
        scorers:
          clip: {weight: 1.0, arch: ViT-L-14-quickgelu, checkpoint: /models/clip/ViT-L-14.pt, num_frames: 8}
          aesthetic: {weight: 0.5, head: /models/sac+logos+ava1-l14-linearMSE.pth, clip_checkpoint: /models/clip/ViT-L-14.pt}
          motion: {weight: 0.5, backend: raft_small, raft_weights: /models/raft_small.pth}
          brightness: {weight: 0.1}
          contrast:
          my_scorer: {class: "tests.test_rewards:ConstantScorer", weight: 2, options: {value: 3}}
        batch_size: 4
        """))
    config = config_from_dict(RewardsConfig, load_yaml(path), source=str(path))
    specs = {spec.name: spec for spec in scorer_specs(config)}
    assert list(specs) == ["clip", "aesthetic", "motion", "brightness", "contrast", "my_scorer"]
    assert specs["clip"].options.num_frames == 8 and specs["clip"].weight == 1.0
    assert specs["aesthetic"].options.clip_arch == "ViT-L-14-quickgelu"  # the default, for OpenAI weights
    assert specs["contrast"].weight == 1.0  # an empty entry means defaults
    assert specs["my_scorer"].cls is ConstantScorer and specs["my_scorer"].options == ConstantOptions(3.0)
    assert config.batch_size == 4 and config.device == "auto"


def test_custom_scorer_class_builds_and_scores():
    scorers = build_scorers({"scorers": {"mine": {"class": "tests.test_rewards:ConstantScorer", "weight": 2,
                                                  "options": {"value": 3}}}, "device": "cpu"})
    scorer, weight = scorers["mine"]
    assert isinstance(scorer, ConstantScorer) and scorer.name == "mine" and weight == 2.0
    assert scorer(video(), ["a", "b"]).tolist() == [3.0, 3.0]
    with pytest.raises(UserError, match=r"rewards\.scorers\.mine: unknown field 'valeu'.*did you mean 'value'"):
        RewardsConfig(scorers={"mine": {"class": "tests.test_rewards:ConstantScorer", "options": {"valeu": 3}}})
    with pytest.raises(UserError, match=r"rewards\.scorers\.mine: field 'value' must be >= 0, got -1.0"):
        RewardsConfig(scorers={"mine": {"class": "tests.test_rewards:ConstantScorer", "options": {"value": -1}}})
    with pytest.raises(UserError, match=r"takes only class, weight and options, got 'value'"):
        RewardsConfig(scorers={"mine": {"class": "tests.test_rewards:ConstantScorer", "value": 3}})


def test_a_builtin_can_be_used_twice_under_other_names():
    config = RewardsConfig(scorers={"luma_a": {"class": "brightness"}, "luma_b": {"class": "brightness", "weight": 0}})
    assert [spec.cls for spec in scorer_specs(config)] == [BrightnessScorer, BrightnessScorer]


@pytest.mark.parametrize("spec, message", [
    ("no_such_pkg.rewards:Thing", r"cannot import module 'no_such_pkg.rewards' .*PYTHONPATH"),
    ("tests.test_rewards:Missing", r"module 'tests.test_rewards' has no attribute 'Missing'"),
    ("tests.test_rewards:NotAScorer", r".*is not a subclass of rewards.base.Scorer"),
    ("tests.test_rewards", r"unknown scorer 'tests.test_rewards'"),
    ("tests.test_rewards:", r"class 'tests.test_rewards:' should look like 'package.module:ClassName'"),
])
def test_bad_class_paths_are_clear_user_errors(spec, message):
    with pytest.raises(UserError, match=r"rewards\.scorers\.mine: " + message):
        RewardsConfig(scorers={"mine": {"class": spec}})


def test_missing_weight_files_are_named_with_where_to_get_them(tmp_path):
    missing = tmp_path / "nowhere"
    cases = [
        ({"clip": {"checkpoint": str(missing / "ViT-L-14.pt")}}, r"clip: checkpoint: CLIP weights not found at .*"
         r"ViT-L-14\.pt; download OpenAI CLIP ViT-L/14: .*openaipublic"),
        ({"aesthetic": {"head": str(missing / "head.pth"), "clip_checkpoint": str(missing / "ViT-L-14.pt")}},
         r"aesthetic: head: aesthetic head not found at .*head\.pth; download sac\+logos\+ava1-l14-linearMSE\.pth "
         r"from https://github\.com/christophschuhmann/improved-aesthetic-predictor"),
        ({"motion": {"backend": "raft_small", "raft_weights": str(missing / "raft.pth")}},
         r"motion: raft_weights: raft_small weights not found at .*raft\.pth; download "
         r"https://download\.pytorch\.org/models/raft_small_C_T_V2-01064c6d\.pth"),
    ]
    for scorers, message in cases:
        with pytest.raises(UserError, match=r"rewards\.scorers\." + message):
            build_scorers({"scorers": scorers, "device": "cpu"})


# --- the scorer interface ----------------------------------------------------------------------------


def test_segment_middles_match_vbench_sampling():
    for num_frames in (1, 2, 7, 16, 33, 125):
        for count in (1, 4, 8, 16):
            n = min(count, num_frames)
            edges = np.linspace(0, num_frames, n + 1).astype(int)  # VBench get_frame_indices("middle")
            expected = [(edges[i] + edges[i + 1] - 1) // 2 for i in range(n)]
            assert segment_middles(num_frames, count) == expected
    assert segment_middles(10, 4) == [0, 3, 5, 8]


def test_inputs_are_checked():
    scorer = BrightnessScorer()
    with pytest.raises(ValueError, match=r"shape \(B, T, 3, H, W\)"):
        scorer(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="2 prompts"):
        scorer(video(), ["only one"])
    with pytest.raises(ValueError, match="float frames"):
        scorer((video() * 255).to(torch.uint8), ["a", "b"])
    moved = ConstantScorer()
    moved.register_buffer("anchor", torch.zeros(1))
    with pytest.raises(ValueError, match="is on meta but the frames are on cpu"):
        moved.to("meta")(video(), ["a", "b"])


def test_scorers_stay_in_eval_mode():
    scorer = ConstantScorer()
    scorer.add_module("dropout", torch.nn.Dropout(0.5))
    scorer.train()
    assert not scorer.training and not scorer.dropout.training


def test_model_cache_loads_each_key_once():
    cache, calls = ModelCache(), []
    load = lambda: calls.append(1) or torch.nn.Linear(1, 1)  # noqa: E731
    assert cache.get(("a", 1), load) is cache.get(("a", 1), load)
    cache.get(("b", 1), load)
    assert len(calls) == 2 and len(cache) == 2


# --- analytic scorers --------------------------------------------------------------------------------


def test_brightness_and_contrast_formulas():
    frames = video()
    luma = 0.299 * frames[:, :, 0] + 0.587 * frames[:, :, 1] + 0.114 * frames[:, :, 2]  # (B, T, H, W)
    torch.testing.assert_close(BrightnessScorer()(frames, ["", ""]), luma.mean(dim=(1, 2, 3)))
    rms = luma.flatten(2).std(dim=2, unbiased=False).mean(1)
    torch.testing.assert_close(ContrastScorer()(frames, ["", ""]), rms, atol=1e-5, rtol=1e-5)
    grey = torch.full((1, 3, 3, 8, 8), 0.25)
    torch.testing.assert_close(BrightnessScorer()(grey, [""]), torch.tensor([0.25]))


def test_colorfulness_is_hasler_suesstrunk():
    frames = video(batch=1, frames=2)
    expected = []
    for frame in (frames[0] * 255).double().numpy():  # the paper works on 0-255 values
        red, green, blue = frame
        rg, yb = red - green, 0.5 * (red + green) - blue
        expected.append(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    score = ColorfulnessScorer()(frames, [""])
    assert score.item() * 255 == pytest.approx(np.mean(expected), rel=1e-4)
    grey = torch.rand(1, 2, 1, 8, 8).expand(1, 2, 3, 8, 8)
    assert ColorfulnessScorer()(grey, [""]).item() < 1e-3


def test_frame_diff_motion_is_the_mean_absolute_difference_and_rewards_flicker():
    frames = video(frames=4)
    expected = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(FrameDiffMotionScorer()(frames, ["", ""]), expected)
    static = frames[:, :1].expand(-1, 4, -1, -1, -1)
    flicker = static * torch.tensor([1.0, 0.5, 1.0, 0.5]).view(1, 4, 1, 1, 1)
    scorer = FrameDiffMotionScorer()
    assert scorer(static, ["", ""]).abs().max() == 0
    assert (scorer(flicker, ["", ""]) > 0.1).all()  # documented weakness: use `motion` to train
    assert scorer(frames[:, :1], ["", ""]).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("cls", [BrightnessScorer, ContrastScorer, ColorfulnessScorer, FrameDiffMotionScorer])
def test_analytic_scorers_are_differentiable(cls):
    frames = video().requires_grad_()
    scores = cls()(frames, ["a", "b"])
    assert cls.differentiable and scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    constant = torch.full((1, 2, 3, 4, 4), 0.5, requires_grad=True)  # zero variance: sqrt must stay finite
    cls()(constant, [""]).sum().backward()
    assert torch.isfinite(constant.grad).all()


# --- building and running ----------------------------------------------------------------------------


def test_build_scorers_returns_weighted_frozen_scorers_in_config_order():
    config = RewardsConfig(scorers={**ANALYTIC, "brightness": {"weight": 0.5}}, device="cpu")
    scorers = build_scorers(config)
    assert list(scorers) == list(ANALYTIC)
    assert isinstance(scorers["brightness"], WeightedScorer) and scorers["brightness"].weight == 0.5
    for name, (scorer, _) in scorers.items():
        assert scorer.name == name and not scorer.training


def test_score_videos_batches_without_changing_results():
    scorers = build_scorers({"scorers": dict(ANALYTIC), "device": "cpu"})
    frames, prompts = video(batch=5), ["p"] * 5
    chunked = score_videos(scorers, frames, prompts, batch_size=2)
    whole = score_videos(scorers, frames, prompts, batch_size=5)
    assert set(chunked) == set(ANALYTIC)
    for name in ANALYTIC:
        assert chunked[name].shape == (5,) and chunked[name].device.type == "cpu"
        torch.testing.assert_close(chunked[name], whole[name])


def test_weighted_reward_sums_weighted_scores_with_gradients():
    scorers = build_scorers({"scorers": {"brightness": {"weight": 2.0}, "contrast": {"weight": 0.0},
                                         "mine": {"class": "tests.test_rewards:ConstantScorer",
                                                  "weight": -1, "options": {"value": 0.5}}}, "device": "cpu"})
    frames = video().requires_grad_()
    total, parts = weighted_reward(scorers, frames, ["a", "b"])
    torch.testing.assert_close(total, 2 * parts["brightness"] - 0.5)
    assert not parts["contrast"].requires_grad and set(parts) == {"brightness", "contrast", "mine"}
    total.sum().backward()
    # Only brightness (weight 2) carries gradient: d mean(luma) / d pixel = 2 * luma weight / count.
    count = frames[0].numel() / 3
    torch.testing.assert_close(frames.grad[0, 0, 0, 0, 0], torch.tensor(2 * 0.299 / count))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scorers_run_on_cuda():
    scorers = build_scorers({"scorers": dict(ANALYTIC), "device": "cuda"})
    frames = video().cuda()
    for scorer, _ in scorers.values():
        assert scorer(frames, ["a", "b"]).device.type == "cuda"
