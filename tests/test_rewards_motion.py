"""`motion` scorer and the optical-flow backends, on synthetic videos with known motion."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.analytic import FrameDiffMotionScorer
from rewards.flow import _box, lucas_kanade_flow, warp
from rewards.motion import MotionOptions, MotionScorer
from rlhf.errors import UserError


def smooth_pan(length: int, size: int, speed: float, seed: int = 0) -> torch.Tensor:
    """`(T, 3, size, size)` in [0, 1]: a sum of random plane waves translating `speed` px/frame to the right.

    Evaluated analytically at every frame, so the motion is an exact translation without wrap-around.
    """
    generator = torch.Generator().manual_seed(seed)
    waves = 12
    freq = torch.rand(waves, 2, generator=generator) * 0.3 - 0.15  # rad/px: smooth, no aliasing
    phase = torch.rand(waves, generator=generator) * 2 * math.pi
    color = torch.rand(waves, 3, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    x = xs - speed * torch.arange(length).float().view(length, 1, 1, 1)  # (T, 1, H, W)
    planes = torch.sin(freq[:, 0].view(1, -1, 1, 1) * x + freq[:, 1].view(1, -1, 1, 1) * ys + phase.view(1, -1, 1, 1))
    video = torch.einsum("tnhw,nc->tchw", planes, color)  # (T, 3, H, W)
    return (video - video.min()) / (video.max() - video.min())


def lk_scorer(**options) -> MotionScorer:
    return MotionScorer(MotionOptions(backend="lucas_kanade", stride=1, num_pairs=3, **options))


@pytest.mark.parametrize(("height", "width", "window"), [(9, 13, 5), (6, 4, 15), (20, 20, 1)])
def test_box_is_the_mean_over_the_window_inside_the_frame(height, width, window):
    # Written out: every pixel's window clipped to the frame, averaged in float64.
    image = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    r = window // 2
    expected = torch.empty(2, 3, height, width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            box = image[..., max(0, y - r): y + r + 1, max(0, x - r): x + r + 1].double()
            expected[..., y, x] = box.mean(dim=(-2, -1))
    assert torch.allclose(_box(image, window).double(), expected, atol=1e-6)


def test_lucas_kanade_recovers_a_translation():
    video = smooth_pan(2, 96, speed=2.5)
    flow = lucas_kanade_flow(video[:1], video[1:])  # (1, 2, H, W)
    inner = flow[0, :, 8:-8, 8:-8]
    assert inner[0].median().item() == pytest.approx(2.5, abs=0.05)
    assert inner[1].abs().median().item() < 0.05
    # The flow maps frame 2 back onto frame 1 (the warp error's premise).
    assert (warp(video[1:], flow) - video[:1])[..., 8:-8, 8:-8].abs().mean() < 2e-3


def test_static_video_scores_zero():
    static = smooth_pan(4, 128, speed=0).unsqueeze(0)
    stats = lk_scorer().measure(static)
    assert stats.score.item() == pytest.approx(0, abs=1e-4)
    assert stats.warp_error.item() == pytest.approx(0, abs=1e-4)


def test_motion_grows_with_speed_below_the_vbench_threshold():
    # 128 px frames: VBench's threshold is 6 * 128 / 256 = 3 px, so 1 and 2 px/frame are partial, 4 saturates.
    videos = torch.stack([smooth_pan(4, 128, speed) for speed in (1, 2, 4)])
    stats = lk_scorer().measure(videos)
    assert stats.top_flow.tolist() == pytest.approx([1, 2, 4], rel=0.1)
    assert stats.dynamic.tolist() == pytest.approx([1 / 3, 2 / 3, 1], rel=0.1)
    assert stats.score[0] < stats.score[1] < stats.score[2]
    assert (stats.warp_error < 2e-3).all()  # a smooth pan is explained by its flow


def test_noise_and_flicker_score_below_a_smooth_pan():
    pan = smooth_pan(4, 128, speed=2)
    noise = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    flicker = pan * torch.tensor([1.0, 0.6, 1.0, 0.6]).view(4, 1, 1, 1)
    videos = torch.stack([pan, noise, flicker])
    scores = lk_scorer()(videos, ["", "", ""])
    assert scores[0] > 0.5 and scores[1] < 0.05 and scores[2] < 0.05
    # Frame differences alone prefer the hacks; this is what the warp-error penalty fixes.
    frame_diff = FrameDiffMotionScorer()(videos, ["", "", ""])
    assert frame_diff[1] > frame_diff[0] and frame_diff[2] > frame_diff[0]


def test_pairs_stride_and_resizing():
    video = smooth_pan(9, 128, speed=1).unsqueeze(0)
    one = lk_scorer().measure(video)
    strided = MotionScorer(MotionOptions(backend="lucas_kanade", stride=2, num_pairs=3)).measure(video)
    assert strided.top_flow.item() == pytest.approx(2 * one.top_flow.item(), rel=0.1)
    # Flow at half resolution has half the pixels of motion and half the threshold: the same score.
    small = lk_scorer(max_size=64).measure(smooth_pan(4, 128, speed=2).unsqueeze(0))
    full = lk_scorer().measure(smooth_pan(4, 128, speed=2).unsqueeze(0))
    assert small.top_flow.item() == pytest.approx(1, rel=0.15)
    assert small.dynamic.item() == pytest.approx(full.dynamic.item(), rel=0.15)
    # A single frame has no motion; two frames use the one pair there is.
    assert lk_scorer().measure(video[:, :1]).score.tolist() == [0.0]
    assert MotionScorer(MotionOptions(backend="lucas_kanade", stride=3)).measure(video[:, :2]).top_flow.item() > 0.5


def test_motion_is_not_differentiable_and_returns_float32():
    scorer = lk_scorer()
    frames = smooth_pan(4, 64, speed=1).unsqueeze(0).double().requires_grad_()
    scores = scorer(frames, ["a pan"])
    assert not scorer.differentiable and scores.dtype == torch.float32 and not scores.requires_grad


@pytest.mark.parametrize("arch", ["raft_small", "raft_large"])
def test_raft_backend_loads_a_state_dict_file(arch, tmp_path):
    from torchvision.models import optical_flow

    torch.manual_seed(0)
    path = tmp_path / f"{arch}.pth"
    torch.save(getattr(optical_flow, arch)(weights=None).state_dict(), path)
    scorer = MotionScorer(MotionOptions(backend=arch, raft_weights=str(path), raft_updates=2, stride=1, num_pairs=2))
    assert all(not p.requires_grad for p in scorer.parameters())
    videos = torch.stack([smooth_pan(4, 64, speed=1), torch.rand(4, 3, 64, 64)])  # below RAFT's 128 px minimum
    flow = scorer.flow(videos[:, 0], videos[:, 1])
    assert flow.shape == (2, 2, 64, 64)
    scores = scorer(videos, ["", ""])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()


def test_raft_weight_errors(tmp_path):
    from torchvision.models import optical_flow

    path = tmp_path / "raft_large.pth"
    torch.save(optical_flow.raft_large(weights=None).state_dict(), path)
    with pytest.raises(UserError, match=r"raft_weights: .*raft_large\.pth is not a torchvision raft_small state dict"):
        MotionScorer(MotionOptions(backend="raft_small", raft_weights=str(path)))
    with pytest.raises(UserError, match=r"raft_weights: raft_small weights not found at .*missing\.pth; download "
                                        r"https://download\.pytorch\.org/models/raft_small_C_T_V2"):
        MotionScorer(MotionOptions(backend="raft_small", raft_weights=str(tmp_path / "missing.pth")))
