"""`eval --vbench`: VBench's formulas (rlhf/vbench) against VBench's own code, and their place in eval and report.

REFERENCE holds what VBench's own functions returned on the frames and tiny random weights of
tests/vbench_fixtures.py: VBench commit 45e79ec14e69a2187202c675d2dbce1a71843d53 (and facebookresearch/dino
7c446df5b9f4 for the DINO class), run outside the project by tests/vbench_reference.py (its docstring has the
setup and the command), with this project's torch 2.14.1 / torchvision 0.29.1 on CPU. Largest differences seen
over the four videos (the project reading the original-layout RAFT file VBench read): temporal flickering 3.1e-9,
background consistency 1.1e-7, subject consistency 6.8e-8, aesthetic quality 0, RAFT pair scores 5.6e-6 (on
magnitudes near 70 px); the tests allow 1e-4, which an antialiased resize (3.9e-4 on DINO, 2.0e-4 on CLIP for the
large moving video) exceeds. RAFT runs here on the two small videos only (the large ones added about 35 s,
measured under load on 2 shared CPU cores; their reference numbers are kept).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests import vbench_fixtures as fx
from tests.conftest import call_cli, random_adapter

# Printed by tests/vbench_reference.py; videos in its order: static, moving (128 x 140), static, moving (LARGE).
VIDEOS = [(False, (fx.HEIGHT, fx.WIDTH)), (True, (fx.HEIGHT, fx.WIDTH)), (False, fx.LARGE), (True, fx.LARGE)]
REFERENCE = {
    "temporal_flickering": [0.9884033605164173, 0.9644831713508157, 0.9882705454732857, 0.9669416128420363],
    "background_consistency": [0.9993837135178703, 0.9911808669567108, 0.9991612604686192, 0.9948996646063668],
    "aesthetic_quality": [0.6381765604019165, 0.6346749663352966, 0.6226681470870972, 0.6205219626426697],
    "subject_consistency": [0.9990314160074506, 0.9839997972760882, 0.9983024256569999, 0.9957490520817893],
    "dynamic_degree": [1.0, 1.0, 1.0, 1.0],
}
REFERENCE_RAFT_PAIRS = [[69.20169830322266, 69.20169830322266, 69.20169830322266],
                        [72.70844268798828, 77.6972885131836, 72.88430786132812],
                        [76.97859954833984, 76.97859954833984, 76.97859954833984],
                        [78.44147491455078, 77.81749725341797, 78.17640686035156]]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vbench_weights")
    return {"vbench_clip": fx.write_tiny_clip(folder / "clip.pt"),
            "vbench_clip_large": fx.write_tiny_clip(folder / "clip.pt"),
            "vbench_aesthetic_head": fx.write_aesthetic_head(folder / "head.pth"),
            "vbench_dino": fx.write_tiny_dino(folder / "dino.pth"),
            "vbench_raft": fx.write_tiny_raft(folder / "raft.pth")}


def _frames(moving: bool, size: tuple[int, int]) -> torch.Tensor:
    return torch.tensor(fx.video(moving, size)).permute(0, 3, 1, 2).float()  # (T, 3, H, W) 0..255, as load_video


def test_every_dimension_equals_vbench_on_the_same_frames_and_weights(weights):
    from rlhf.vbench import DIMENSIONS, build_dimensions

    dimensions = build_dimensions(list(DIMENSIONS), fps=fx.FPS, **weights)
    for name, expected in REFERENCE.items():
        videos = VIDEOS[:2] if name == "dynamic_degree" else VIDEOS  # RAFT on the large ones: see the docstring
        got = [dimensions[name](_frames(*video)) for video in videos]
        assert got == pytest.approx(expected[:len(videos)], abs=TOLERANCE), name
    pairs = [dimensions["dynamic_degree"].pair_scores(_frames(*video)) for video in VIDEOS[:2]]
    for got, expected in zip(pairs, REFERENCE_RAFT_PAIRS[:2], strict=True):
        assert got == pytest.approx(expected, abs=TOLERANCE)
    # The fixture's videos differ by far more than the tolerance, so the comparison can tell them apart.
    assert REFERENCE["subject_consistency"][0] - REFERENCE["subject_consistency"][1] > 100 * TOLERANCE


def test_original_raft_names_map_onto_torchvision():
    """Names from the original RAFT's modules (core/extractor.py, update.py, raft.py) and torchvision's."""
    from torchvision.models.optical_flow import raft_large

    from rlhf.vbench.dynamic import original_to_torchvision

    original = {
        "module.fnet.conv1.weight": "feature_encoder.convnormrelu.0.weight",
        "fnet.layer2.0.downsample.0.weight": "feature_encoder.layer2.0.downsample.0.weight",
        "fnet.conv2.bias": "feature_encoder.conv.bias",
        "cnet.norm1.running_var": "context_encoder.convnormrelu.1.running_var",
        "cnet.layer1.0.norm2.bias": "context_encoder.layer1.0.convnormrelu2.1.bias",
        "cnet.layer3.1.conv1.weight": "context_encoder.layer3.1.convnormrelu1.0.weight",
        "update_block.encoder.convc1.weight": "update_block.motion_encoder.convcorr1.0.weight",
        "update_block.encoder.conv.bias": "update_block.motion_encoder.conv.0.bias",
        "update_block.gru.convq2.weight": "update_block.recurrent_block.convgru2.convq.weight",
        "update_block.flow_head.conv2.bias": "update_block.flow_head.conv2.bias",
        "update_block.mask.0.weight": "mask_predictor.convrelu.0.weight",
        "update_block.mask.2.bias": "mask_predictor.conv.bias",
    }
    renamed = original_to_torchvision({**{k: k for k in original}, "cnet.layer3.0.norm3.weight": "duplicate"})
    assert renamed == {v: k for k, v in original.items()}  # norm3 (the same module as downsample.1) dropped
    assert set(renamed) <= set(raft_large(weights=None).state_dict())


def test_formulas_on_hand_worked_values():
    from rlhf.vbench import formulas

    # |0 - 51| = 51 everywhere: (255 - 51) / 255 = 0.8.
    assert formulas.temporal_flickering(torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 51.0)])) == \
        pytest.approx(0.8)
    # e0 = x, e1 = y, e2 = (x + y) (normalised): frame 1 gives (0 + 0) / 2, frame 2 (cos 45 + cos 45) / 2.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    assert formulas.consistency(features) == pytest.approx(math.sqrt(0.5) / 2)
    assert formulas.consistency(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == 0.0  # negative cosines count as 0
    # 20 pixels: int(0.05 * 20) = 1, the largest magnitude (3-4-5).
    flow = torch.zeros(2, 4, 5)
    flow[:, 2, 3] = torch.tensor([3.0, 4.0])
    assert formulas.top_flow_magnitude(flow) == pytest.approx(5.0)
    assert [formulas.dynamic_sample_interval(f) for f in (24, 16, 20, 8, 4)] == [3, 2, 2, 1, 1]  # round(2.5) = 2
    # 256 px: threshold 6 px; 16 frames need round(4) = 4 pairs above it.
    assert not formulas.is_dynamic([7, 7, 7, 5] + [0] * 11, 256, 300, 16)
    assert formulas.is_dynamic([7, 7, 7, 7] + [0] * 11, 256, 300, 16)
    assert formulas.is_dynamic([0.0], 256, 256, 2)  # round(0.5) = 0 pairs needed, as VBench's loop
    assert not formulas.is_dynamic([], 256, 256, 1)


def test_frames_are_quantised_like_the_saved_videos():
    from rlhf.vbench import vbench_frames
    from rlhf.video import to_uint8_frames

    video = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)  # (B, 3, T, H, W)
    frames = vbench_frames(video)  # (B, T, 3, H, W)
    for row in range(2):
        expected = torch.from_numpy(to_uint8_frames(video[row])).permute(0, 3, 1, 2).float()
        assert torch.equal(frames[row], expected)


def test_hacking_guard_needs_a_rise_and_a_fall_beyond_the_cis():
    from rlhf.evaluation import hacking_warning

    def row(low, high):
        return {"ci_low": low, "ci_high": high}

    kinds = {"clip": "trained", "combined": "trained", "hps": "held_out", "dynamic_degree": "vbench",
             "subject_consistency": "vbench"}
    rows = {"combined": row(0.1, 0.2), "clip": row(0.1, 0.2), "hps": row(-0.1, 0.1),
            "dynamic_degree": row(-0.3, -0.1), "subject_consistency": row(-0.01, 0.02)}
    warning = hacking_warning(rows, kinds)
    assert warning == ("trained reward(s) clip rose while VBench dimension(s) dynamic_degree fell: possible "
                       "reward hacking")
    assert hacking_warning({**rows, "dynamic_degree": row(-0.3, 0.01)}, kinds) is None  # CI includes 0
    assert hacking_warning({**rows, "clip": row(-0.01, 0.2)}, kinds) is None  # the trained reward did not rise
    both = hacking_warning({**rows, "hps": row(-0.2, -0.1)}, kinds)
    assert "held-out reward(s) hps; VBench dimension(s) dynamic_degree fell" in both


def test_eval_table_prints_vbench_rows_and_the_warning_line():
    from rlhf.evaluation import format_table

    row = {"n": 4, "base_mean": 0.5, "candidate_mean": 0.4, "mean_diff": -0.1, "ci_low": -0.2, "ci_high": -0.05,
           "win_rate": 0.0, "tie_rate": 0.0, "loss_rate": 1.0}
    result = {"candidates": {"candidate0": "runs/a"}, "rewards": {"background_consistency": "vbench"},
              "comparisons": {"candidate0": {"background_consistency": row}}, "warnings": ["candidate0: boom"]}
    lines = format_table(result).splitlines()
    assert lines[2].split()[:2] == ["background_consistency", "vbench"] and lines[-1] == "WARNING: candidate0: boom"


def test_every_vbench_option_is_documented():
    from rlhf.config import help_problems
    from rlhf.evaluation import EvalConfig

    assert help_problems(EvalConfig) == []


def _eval_args(model, adapter, prompts, rewards, out, *extra):
    return ["eval", "--model", model, "--adapters", adapter, "--prompts", prompts, "--seeds", "2",
            "--rewards", rewards, "--out", out, "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
            "--dtype", "fp32", "--save-videos", "1", *extra]


def test_eval_refuses_bad_vbench_options_before_work(tiny_model_dir, tmp_path, capsys, weights):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\n")
    rewards = tmp_path / "r.yaml"
    rewards.write_text("scorers:\n  brightness: {weight: 1.0}\ndevice: cpu\n")
    base = _eval_args(tiny_model_dir, tiny_model_dir, prompts, rewards, tmp_path / "out")
    cases = [
        (["--vbench", "subject_consistancy"], ["field 'vbench'", "subject_consistancy", "subject_consistency",
                                               "dynamic_degree", "aesthetic_quality"]),
        (["--vbench", "motion_smoothness"], ["field 'vbench'", "not supported", "AMT"]),
        (["--vbench", "imaging_quality"], ["field 'vbench'", "not supported", "pyiqa"]),
        (["--vbench", "subject_consistency"], ["field 'vbench_dino'", "required"]),
        (["--vbench", "aesthetic_quality", "--vbench-clip-large", weights["vbench_clip_large"]],
         ["field 'vbench_aesthetic_head'", "required"]),
        (["--vbench", "dynamic_degree", "--vbench-raft", weights["vbench_raft"]], ["field 'vbench'", "128"]),
        (["--vbench", "background_consistency", "--vbench-clip", tmp_path / "missing.pt"],
         ["vbench_clip", "missing.pt", "ViT-B-32.pt"]),
        (["--vbench", "subject_consistency", "--vbench-dino", weights["vbench_clip"]], ["vbench_dino", "not a DINO"]),
    ]
    for extra, expected in cases:
        code, _, err = call_cli(capsys, *base, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        assert all(text in err for text in map(str, expected)), (extra, err)
    assert not (tmp_path / "out").exists()


def test_eval_reports_vbench_dimensions_with_paired_cis_and_in_the_report(tiny_model_dir, tmp_path, capsys,
                                                                          weights):
    from rlhf.report import build_report

    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", std=0.3)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\na blue lake\n")
    rewards = tmp_path / "r.yaml"
    rewards.write_text("scorers:\n  brightness: {weight: 1.0}\ndevice: cpu\n")
    dims = ["temporal_flickering", "background_consistency", "subject_consistency", "aesthetic_quality"]
    code, out, err = call_cli(capsys, *_eval_args(
        tiny_model_dir, adapter, prompts, rewards, tmp_path / "eval", "--vbench", ",".join(dims),
        "--vbench-clip", weights["vbench_clip"], "--vbench-clip-large", weights["vbench_clip_large"],
        "--vbench-aesthetic-head", weights["vbench_aesthetic_head"], "--vbench-dino", weights["vbench_dino"]))
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["vbench"]["dimensions"] == dims
    assert set(result["vbench"]["weights"]) == {"vbench_clip", "vbench_clip_large", "vbench_aesthetic_head",
                                                "vbench_dino"}
    for name in dims:
        assert result["rewards"][name] == "vbench" and name in out
        base = np.array(result["scores"]["base"][name])
        tuned = np.array(result["scores"]["candidate0"][name])
        assert base.shape == (2, 2) and np.all((base > 0) & (base <= 1.0 + 1e-9))
        row = result["comparisons"]["candidate0"][name]
        assert row["mean_diff"] == pytest.approx((tuned - base).mean(), abs=1e-12)
        assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]
    page = build_report(tmp_path / "eval")
    assert page.count("VBench dimension") >= len(dims)  # one verdict sentence each
    assert all(f"<td>{name}</td>" in page for name in dims)  # a row each in the evaluation table


def test_report_warns_when_a_vbench_dimension_falls_while_the_reward_rises():
    from rlhf.report import verdict_section

    def row(diff, low, high):
        return {"n": 8, "base_mean": 0.5, "candidate_mean": 0.5 + diff, "mean_diff": diff, "ci_low": low,
                "ci_high": high}

    result = {"rewards": {"clip": "trained", "dynamic_degree": "vbench"}, "candidates": {"candidate0": "a"},
              "scores": {}, "comparisons": {"candidate0": {"combined": row(0.1, 0.05, 0.15),
                                                           "clip": row(0.1, 0.05, 0.15),
                                                           "dynamic_degree": row(-0.4, -0.6, -0.2)}}}
    page = verdict_section(result)
    assert "possible reward hacking" in page and "<b>dynamic_degree</b>" in page.split("Warning")[1]
    result["comparisons"]["candidate0"]["dynamic_degree"] = row(-0.1, -0.3, 0.1)
    assert "possible reward hacking" not in verdict_section(result)
