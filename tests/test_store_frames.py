"""Scores from a rollout store's kept frames equal the full video's: the frames keep their video positions.

A store keeps a subset of each video's frames (`save_frames`, `save_frame_stride`). A temporal reward
(`motion`: pairs `stride` frames apart) read from 8 kept frames of 49 used to compare frames ~6 apart
and score a slow pan like a fast one; the score stage now hands each scorer the frames it reads on the
full video, at their true positions, or reads the mp4, or refuses.
"""

from __future__ import annotations

import pytest
import torch

from rewards.base import frame_pairs, segment_middles
from rewards.motion import MotionOptions, MotionScorer
from rewards.scoring import ScoreConfig, score_store
from rlhf.errors import UserError
from rlhf.video import to_uint8_frames, write_mp4
from rollouts.rollout import frame_indices
from rollouts.store import RolloutStore
from tests.test_rewards_motion import smooth_pan

FRAMES, SIZE = 49, 64  # VBench's threshold at 64 px: 6 * 64 / 256 = 1.5 px


def pan_video(speed: float) -> torch.Tensor:
    """`(1, 49, 3, 64, 64)` in [0, 1], on the uint8 grid a store keeps."""
    return (smooth_pan(FRAMES, SIZE, speed) * 255).round().div(255).unsqueeze(0)


def test_kept_frame_indices_hold_the_middles_and_the_motion_pairs():
    kept = frame_indices(49, 8, 3)
    middles = [(i * 49 // 8 + (i + 1) * 49 // 8 - 1) // 2 for i in range(8)]  # VBench "middle" sampling
    assert middles == segment_middles(49, 8) == [2, 8, 14, 20, 26, 32, 38, 45]
    pairs = [(2, 5), (8, 11), (14, 17), (20, 23), (26, 29), (32, 35), (38, 41), (45, 48)]
    assert frame_pairs(49, 8, 3) == pairs
    assert kept == sorted(set(middles) | {t for p in pairs for t in p})
    assert frame_indices(49, 8, 0) == middles and frame_indices(49, 0, 3) == []
    # Near the end a pair moves back; a short video keeps what it has.
    assert frame_pairs(9, 3, 3) == [(1, 4), (4, 7), (5, 8)]
    assert frame_indices(5, 4, 3) == [0, 1, 2, 3, 4] and frame_pairs(1, 8, 3) == []


def test_motion_from_kept_frames_equals_the_full_video():
    scorer = MotionScorer(MotionOptions(backend="lucas_kanade"))  # stride 3, num_pairs 8
    video = pan_video(0.25)  # 0.75 px per 3 frames: half VBench's threshold
    full = scorer(video, ["a pan"])
    kept = frame_indices(FRAMES, 8, 3)
    stored = scorer(video[:, kept], ["a pan"], positions=kept, num_frames=FRAMES)
    assert stored.item() == full.item()
    assert full.item() == pytest.approx(0.5, abs=0.05)  # dynamic = 0.75 / 1.5, warp error ~0
    # The old reading: the 8 kept middles as if they were the video compare frames ~18 apart (saturated).
    middles = segment_middles(FRAMES, 8)
    assert scorer(video[:, middles], ["a pan"]).item() > 0.85
    # Kept frames without the pairs are refused, not paired at another spacing.
    with pytest.raises(ValueError, match=r"missing \[5, 11"):
        scorer(video[:, middles], ["a pan"], positions=middles, num_frames=FRAMES)


def make_store(root, video: torch.Tensor, stride: int, mp4: bool) -> RolloutStore:
    store = RolloutStore(root)
    store.write_header({"frames": FRAMES, "fps": 24}, (16, 13, 8, 8), {"p00000": "a pan"})
    kept = frame_indices(FRAMES, 8, stride)
    pixels = to_uint8_frames(video[0].permute(1, 0, 2, 3) * 2 - 1)  # (T, H, W, 3)
    if mp4:
        write_mp4(store.video_path("p00000_s000"), pixels, fps=24)
    store.write_sample("p00000_s000", torch.zeros(16, 13, 8, 8), {
        "sample_id": "p00000_s000", "prompt_id": "p00000", "sample_index": 0, "seed": 1, "frame_indices": kept,
    }, frames=torch.from_numpy(pixels[kept]))
    store.write_manifest([{"sample_id": "p00000_s000", "prompt_id": "p00000", "prompt": "a pan", "sample_index": 0,
                           "seed": 1, "latents": "x", "video": "videos/p00000_s000.mp4" if mp4 else None}])
    return store


def score(store, **motion) -> float:
    config = ScoreConfig(store=str(store.root), device="cpu",
                         scorers={"motion": {"backend": "lucas_kanade", **motion}, "brightness": {"weight": 0.0}})
    score_store(config)
    return store.read_scores("motion")["scores"]["p00000_s000"]


def test_score_stage_on_a_store_equals_eval_on_the_full_video(tmp_path):
    video = pan_video(0.25)
    full = MotionScorer(MotionOptions(backend="lucas_kanade"))(video, ["a pan"]).item()
    # Default layout (save_frames 8, save_frame_stride 3): the kept frames suffice, exactly.
    assert score(make_store(tmp_path / "a", video, stride=3, mp4=False)) == pytest.approx(full, abs=1e-6)
    # Middles only and no mp4: the stage names what is missing instead of scoring other pairs.
    with pytest.raises(UserError, match=r"scorer 'motion' reads frames \[2, 5, 8, 11.*no mp4"):
        score(make_store(tmp_path / "b", video, stride=0, mp4=False))
    # Middles only with the mp4: every frame comes from the (H.264) video.
    assert score(make_store(tmp_path / "c", video, stride=0, mp4=True)) == pytest.approx(full, abs=0.06)
    # A scorer stride other than the store kept is not served by the kept frames either.
    with pytest.raises(UserError, match=r"scorer 'motion' reads frames \[2, 8, 14.*no mp4"):
        score(make_store(tmp_path / "d", video, stride=3, mp4=False), stride=6)
