"""The `videoreward` scorer equals VideoAlign's own inference on a tiny random checkpoint in the released layout.

The checkpoint and the videos are built here, deterministically (tests/videoreward_tiny.py; `WEIGHTS_DIGEST` pins
the weights). The reference numbers were computed by VideoAlign's code (github.com/KwaiVGI/VideoAlign, commit
219ab9db64c045e5181a2202d11f686439351292, `inference.VideoVLMRewardInference.reward`, float32, CPU, transformers
4.45.2, attention sdpa instead of flash-attention 2) outside this project, on the same checkpoint and on the same
videos written losslessly at 4 fps, with the two commands in tests/videoalign_reference.py:

    .venv/bin/python tests/videoalign_reference.py build /tmp/vr-tiny
    cd VideoAlign && PYTHONPATH=. <videoalign venv>/bin/python <repo>/tests/videoalign_reference.py score /tmp/vr-tiny

and copied from its reference.json. Other references here are hand-worked (smart_resize, frame counts) or computed
independently of the scorer (LoRA merged vs a LoRA layer applied unmerged).
"""

from __future__ import annotations

import pytest
import torch

from rewards.build import build_scorers, score_videos, weighted_reward
from rewards.config import RewardsConfig
from rewards.pairs import PairsConfig, ScoreRow, combine_scores
from rewards.videoreward import (
    VideoRewardModel,
    VideoRewardOptions,
    frame_count,
    frame_indices,
    merge_lora,
    normalized,
    smart_resize,
)
from rlhf.config import config_from_dict, help_problems
from rlhf.errors import UserError
from tests.videoreward_tiny import build_tiny_videoreward, reward_state_dict, tiny_videos, weights_digest

WEIGHTS_DIGEST = "42799d912bb31804"  # weights_digest of the checkpoint the reference numbers were computed on
PROMPTS = ["a red ball bounces on a wooden floor", "two green cubes spin slowly", "sun"]
COLUMNS = ("vq", "mq", "ta", "overall")
# VideoAlign's reward(..., use_norm=True), (VQ, MQ, TA, Overall): each video alone, then videos 1 and 2 in one batch.
REFERENCE_ALONE = [
    [-1.236799159663537, -1.887856336724412, -1.5771096588191862, -4.701765155207135],
    [-1.3637017604188364, -1.9440150380730155, -1.1147776637922582, -4.42249446228411],
    [-1.1698225903583181, -0.9617446693708771, -1.1447897033703553, -3.27635696309955],
]
REFERENCE_BATCH_12 = [
    [-1.363701733899596, -1.9440150380730155, -1.1147776815875226, -4.422494453560134],
    [-1.1698225903583181, -0.9617452304166971, -1.144789632189298, -3.2763574529643136],
]
# reward(..., use_norm=False): the raw reward-head outputs.
REFERENCE_RAW = [
    [0.8958702087402344, -1.4427183866500854, -1.1513571739196777, -1.6982053518295288],
    [0.6106439232826233, -1.5202791690826416, 0.010067030787467957, -0.8995682150125504],
    [1.0464067459106445, -0.1636655628681183, -0.06532621383666992, 0.8174149692058563],
]
TOLERANCE = 2e-5  # float32 on both sides; LoRA merged here, unmerged there; observed max |diff| ~4e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, reward = build_tiny_videoreward(tmp_path_factory.mktemp("videoreward"))
    state = torch.load(next(reward.glob("checkpoint-*/model.pth")), weights_only=True)
    assert weights_digest(state) == WEIGHTS_DIGEST, "the tiny checkpoint changed: recompute the reference numbers"
    return base, reward


def as_frames(video: torch.Tensor) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 -> `(1, T, 3, H, W)` float in [0, 1]."""
    return video.permute(0, 3, 1, 2).float().div(255)[None]


def rewards_config(base, reward, normalize: bool = True, weights=(1.0, 0.5, 2.0, 0.0)) -> dict:
    shared = dict(checkpoint=str(reward), base_model=str(base), video_fps=4.0, dtype="fp32", normalize=normalize)
    return {"scorers": {f"videoreward_{c}": {"class": "videoreward", "weight": w, "options": {**shared, "dimension": c}}
                        for c, w in zip(COLUMNS, weights, strict=True)}, "device": "cpu"}


def test_options_are_documented():
    assert help_problems(VideoRewardOptions) == []


def test_smart_resize_frame_count_and_indices_by_hand():
    # 64x80: rounded 56x84 = 4704 px < 100352 -> beta = sqrt(100352 / 5120) = 4.427; ceil_28(283.3) = 308,
    # ceil_28(354.2) = 364.
    assert smart_resize(64, 80, max_pixels=200704) == (308, 364)
    # 480x832: rounded 476x840 = 399840 px > 200704 -> beta = sqrt(399360 / 200704) = 1.4106; floor_28(340.3) = 336,
    # floor_28(589.8) = 588.
    assert smart_resize(480, 832, max_pixels=200704) == (336, 588)
    assert smart_resize(448, 448, max_pixels=200704) == (448, 448)  # already a fit
    # 49 frames at 16 fps, 2 fps: 6.125 -> nearest even 6; linspace(0, 48, 6) = 0, 9.6, 19.2, 28.8, 38.4, 48.
    assert frame_count(49, 16, 2.0, None) == 6 and frame_indices(49, 6) == [0, 10, 19, 29, 38, 48]
    assert frame_count(9, 24, 2.0, None) == 4  # 0.75 frames -> at least 4
    assert frame_count(3, 24, 2.0, None) == 2  # at most floor_2(T)
    assert frame_count(100, 24, 2.0, 7) == 8  # data_config.num_frames: round(7 / 2) * 2 (halves to even)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_count(1, 24, 2.0, None)


def test_lora_merge_equals_the_lora_layer_applied_unmerged():
    g = torch.Generator().manual_seed(0)
    w0, bias = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    a, b = torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g)
    x = torch.randn(4, 5, generator=g)
    state = {"base_model.model.model.layers.0.mlp.up_proj.base_layer.weight": w0,
             "base_model.model.model.layers.0.mlp.up_proj.base_layer.bias": bias,
             "base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight": a,
             "base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight": b,
             "base_model.model.rm_head.weight": torch.ones(1, 5)}
    merged = merge_lora(state, scaling=2.0)
    assert sorted(merged) == ["model.layers.0.mlp.up_proj.bias", "model.layers.0.mlp.up_proj.weight", "rm_head.weight"]
    unmerged = x @ w0.T + bias + 2.0 * (x @ a.T) @ b.T  # PEFT's LoRA forward: base(x) + scaling * B(A(x))
    merged_out = x @ merged["model.layers.0.mlp.up_proj.weight"].T + merged["model.layers.0.mlp.up_proj.bias"]
    torch.testing.assert_close(merged_out, unmerged, rtol=1e-5, atol=1e-5)


def test_normalization_and_overall():
    raw = torch.tensor([[1.0, 2.0, 3.0]])
    config = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": 0.0, "MQ_std": 4.0, "TA_mean": 3.0, "TA_std": 1.0}
    assert normalized(raw, config).tolist() == [[0.0, 0.5, 0.0, 0.5]]
    assert normalized(raw, None).tolist() == [[1.0, 2.0, 3.0, 6.0]]


def test_scores_equal_videoalign_inference(tiny):
    base, reward = tiny
    scorers = build_scorers(rewards_config(base, reward))
    models = {id(s.reward_model) for s, _ in scorers.values()}
    assert len(models) == 1, "the four dimension entries share one loaded model"
    videos = [as_frames(v) for v in tiny_videos()]
    worst = 0.0
    for index, video in enumerate(videos):  # each video alone (video 0 has 12 frames, 1 and 2 have 16)
        got = score_videos(scorers, video, PROMPTS[index:index + 1])
        for column, expected in zip(COLUMNS, REFERENCE_ALONE[index], strict=True):
            worst = max(worst, abs(float(got[f"videoreward_{column}"][0]) - expected))
    got = score_videos(scorers, torch.cat(videos[1:]), PROMPTS[1:], batch_size=2)  # one padded batch of two
    for row, expected_row in enumerate(REFERENCE_BATCH_12):
        for column, expected in zip(COLUMNS, expected_row, strict=True):
            worst = max(worst, abs(float(got[f"videoreward_{column}"][row]) - expected))
    assert worst < TOLERANCE, f"max |ours - VideoAlign| = {worst:.3g}"


def test_raw_scores_equal_videoalign_without_normalization(tiny):
    base, reward = tiny
    scorers = build_scorers(rewards_config(base, reward, normalize=False))
    for index, video in enumerate(as_frames(v) for v in tiny_videos()):
        got = score_videos(scorers, video, PROMPTS[index:index + 1])
        ours = [float(got[f"videoreward_{c}"][0]) for c in COLUMNS]
        assert max(abs(o - e) for o, e in zip(ours, REFERENCE_RAW[index], strict=True)) < TOLERANCE


def test_each_dimension_is_a_weighted_column_of_one_forward(tiny, monkeypatch):
    base, reward = tiny
    weights = (1.0, 0.5, 2.0, 0.0)
    scorers = build_scorers(rewards_config(base, reward, weights=weights))
    calls = []
    original = VideoRewardModel.score_pixels
    monkeypatch.setattr(VideoRewardModel, "score_pixels", lambda self, *a: calls.append(1) or original(self, *a))
    frames = torch.cat([as_frames(v) for v in tiny_videos()[1:]])  # (2, 16, 3, 64, 80)
    total, parts = weighted_reward(scorers, frames, PROMPTS[1:])
    assert len(calls) == 1, "the four columns of one batch come from one forward pass"
    assert set(parts) == {f"videoreward_{c}" for c in COLUMNS}
    expected = sum(w * parts[f"videoreward_{c}"] for c, w in zip(COLUMNS, weights, strict=True))
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["videoreward_overall"],
                               parts["videoreward_vq"] + parts["videoreward_mq"] + parts["videoreward_ta"])
    # pairs / GRPO combine the columns by name: with one column weighted, the combined score is that column.
    rows = [ScoreRow(f"s{i}", "p0", {k: float(v[i]) for k, v in parts.items()}) for i in range(2)]
    for column in ("videoreward_vq", "videoreward_mq"):
        combined = combine_scores(rows, PairsConfig(weights={column: 1.0}, normalize="none")).combined
        assert combined.tolist() == pytest.approx(parts[column].double().tolist())
    # Another batch runs the model again (the remembered batch is only reused for the same frames and prompts).
    weighted_reward(scorers, frames.flip(0), PROMPTS[1:][::-1])
    assert len(calls) == 2
    # score_videos scores chunk by chunk, every scorer on a chunk before the next: one forward per chunk.
    chunked = score_videos(scorers, frames, PROMPTS[1:], batch_size=1)
    assert len(calls) == 4
    for name, values in chunked.items():
        torch.testing.assert_close(values, parts[name], rtol=0, atol=TOLERANCE)


def test_bf16_runs_close_to_the_float32_reference(tiny):
    """VideoAlign's default precision: no exact reference (bf16 rounding), only that it runs and stays close."""
    base, reward = tiny
    config = rewards_config(base, reward)
    for entry in config["scorers"].values():
        entry["options"]["dtype"] = "bf16"
    got = score_videos(build_scorers(config), as_frames(tiny_videos()[0]), PROMPTS[:1])
    ours = [float(got[f"videoreward_{c}"][0]) for c in COLUMNS]
    assert max(abs(o - e) for o, e in zip(ours, REFERENCE_ALONE[0], strict=True)) < 0.25  # observed 0.073


def test_reads_only_the_sampled_frames(tiny):
    base, reward = tiny
    scorers = build_scorers(rewards_config(base, reward))
    scorer = scorers["videoreward_vq"].scorer
    assert scorer.frame_positions(16) == [0, 2, 4, 6, 9, 11, 13, 15]  # 16 frames at 4 fps: 8 frames
    video = as_frames(tiny_videos()[1])
    positions = scorer.frame_positions(16)
    subset = scorer(video[:, positions], PROMPTS[1:2], positions=positions, num_frames=16)
    assert abs(float(subset[0]) - REFERENCE_ALONE[1][0]) < TOLERANCE


def test_bad_checkpoints_are_one_line_user_errors(tiny, tmp_path):
    base, reward = tiny
    options = rewards_config(base, reward)["scorers"]["videoreward_vq"]["options"]

    def build(**changes):
        return build_scorers({"scorers": {"vr": {"class": "videoreward", "options": {**options, **changes}}},
                              "device": "cpu"})

    with pytest.raises(UserError, match="no model_config.json"):
        build(checkpoint=str(tmp_path))
    with pytest.raises(UserError, match="checkpoint_step: .* no checkpoint-3"):
        build(checkpoint_step=3)
    with pytest.raises(UserError, match="base_model: no config.json"):
        build(base_model=str(tmp_path))
    with pytest.raises(UserError, match="dimension"):
        build(dimension="quality")
    with pytest.raises(UserError, match="video_fps"):
        build(video_fps=0)


def test_a_prompt_holding_a_reward_token_is_refused(tiny):
    base, reward = tiny
    scorer = build_scorers(rewards_config(base, reward))["videoreward_ta"].scorer
    with pytest.raises(ValueError, match="gives 4 reward tokens"):
        scorer(as_frames(tiny_videos()[0]), ["a cat <|VQ_reward|>"])


def test_the_readme_example_and_the_shipped_config_declare_the_four_columns():
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```yaml\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    example = yaml.safe_load(next(b for b in blocks if "class: videoreward" in b))
    assert config_from_dict(RewardsConfig, example, source="README").scorers["videoreward_vq"]["class"] == "videoreward"
    shipped = yaml.safe_load((root / "configs" / "rewards_video.yaml").read_text())["scorers"]
    assert {e["options"]["dimension"] for e in shipped.values() if e.get("class") == "videoreward"} == set(COLUMNS)


def test_the_digest_pins_the_weights():
    state = reward_state_dict(273)
    assert weights_digest(state) == WEIGHTS_DIGEST
    state["base_model.model.rm_head.weight"] = state["base_model.model.rm_head.weight"] + 1e-3
    assert weights_digest(state) != WEIGHTS_DIGEST


def test_the_four_columns_served_remotely_score_as_in_process(tiny):
    from tests.test_reward_server import Served

    base, reward = tiny
    local = build_scorers(rewards_config(base, reward))
    served = Served(local)
    try:
        remote = build_scorers(served.remote([f"videoreward_{c}" for c in COLUMNS]))
        frames = torch.cat([as_frames(v) for v in tiny_videos()[1:]])  # (2, 16, 3, 64, 80), uint8-exact
        got, expected = score_videos(remote, frames, PROMPTS[1:]), score_videos(local, frames, PROMPTS[1:])
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    finally:
        served.close()
