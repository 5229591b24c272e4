"""Benchmarks that must also run at reduced size on the CPU."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_full_size_step_runs_reduced_on_cpu():
    result = subprocess.run(
        [sys.executable, "benchmarks/full_size_step.py", "--device", "cpu", "--layers", "2", "--heads", "2",
         "--head-dim", "32", "--height", "32", "--width", "32", "--frames", "5", "--lora-rank", "4",
         "--dtype", "fp32", "--steps", "1", "--no-full-vae", "--rg-steps", "2", "--checkpoint-policy", "full"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report, _ = json.JSONDecoder().raw_decode(result.stdout)  # the JSON, then the table
    steps = report["steps"]
    assert report["checkpoint_policy"] == "full"
    assert list(steps) == ["dpo", "reward_gradient", "rollout_step", "vae_decode"]
    dpo = steps["dpo"]
    assert dpo["frames"] == 5 and dpo["latent_shape"] == [16, 2, 4, 4]
    for entry in steps.values():
        assert entry["eager"]["seconds"] > 0 and 0 < entry["model_tflop"] <= entry["hardware_tflop"]
        assert entry["eager"]["mfu"] > 0 and entry["eager"]["hfu"] >= entry["eager"]["mfu"]
    # Checkpointing recomputes the policy's blocks: hardware > model FLOPs in the training steps only.
    assert dpo["hardware_tflop"] > dpo["model_tflop"]
    assert steps["rollout_step"]["hardware_tflop"] == steps["rollout_step"]["model_tflop"]
    assert report["model_flops_check"]["relative_difference"] < 0.02
    assert report["peak"]["transformer"]["source"].startswith("measured")


def test_full_size_step_auto_checkpointing_drops_the_recompute_where_memory_allows():
    """The trainers' default: the tiny model's activations fit in this machine's memory many times over."""
    result = subprocess.run(
        [sys.executable, "benchmarks/full_size_step.py", "--device", "cpu", "--layers", "2", "--heads", "2",
         "--head-dim", "32", "--height", "32", "--width", "32", "--frames", "5", "--lora-rank", "4",
         "--dtype", "fp32", "--steps", "1", "--no-full-vae", "--only", "dpo"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report, _ = json.JSONDecoder().raw_decode(result.stdout)
    assert report["checkpoint_policy"] == "auto -> none"
    assert 0 < report["activation_estimate_gb"]["none"] < 1
    dpo = report["steps"]["dpo"]
    assert dpo["hardware_tflop"] == dpo["model_tflop"] > 0 and "model_flops_check" not in report
    assert "| dpo | 5 | eager |" in result.stdout


def test_profile_step_runs_reduced_on_cpu():
    result = subprocess.run(
        [sys.executable, "benchmarks/profile_step.py", "--layers", "2", "--heads", "2", "--head-dim", "32",
         "--height", "32", "--width", "32", "--frames", "5", "--lora-rank", "4", "--steps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for category in ("base matmuls", "LoRA matmuls", "attention", "norms / modulation / activations"):
        assert f"| {category} |" in result.stdout


def test_scorer_costs_measures_at_minimal_size_and_prints_the_memory_arithmetic(tmp_path):
    from benchmarks.scorer_costs import CASES, full_size_memory, measure
    from rewards.registry import SCORERS

    assert {scorer for scorer, _ in CASES.values()} == set(SCORERS)  # every registered scorer is timed
    rows = measure(["brightness", "motion_lucas_kanade"], tmp_path, videos=1, repeats=1, frames=5, size=32)
    assert [row["scorer"] for row in rows] == ["brightness", "motion_lucas_kanade"]
    assert all(row["seconds_per_video"] > 0 and row["frames"] == [5, 32, 32] for row in rows)
    assert rows[1]["options"] == {"backend": "lucas_kanade"}
    memory = {row["scorer"]: row for row in full_size_memory()}
    assert memory["clip"]["weights_gb"] == 1.71  # 428M parameters x 4 bytes
    assert memory["videoreward"]["weights_gb"] == 4.4 and memory["videoreward"]["vision_patches"] == 5040
    assert all(row["total_gb"] >= row["weights_gb"] for row in memory.values())


def test_world_cleanliness_correlates_pooled_and_within_prompt():
    import numpy as np

    from benchmarks.world_cleanliness import correlations

    # Written out: the reward tracks the factor inside every prompt, while the prompts' means run the other way.
    within = np.array([0.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    offset = np.array([10.0, 10.0, 10.0, 0.0, 0.0, 0.0])
    rows = {"area_steady": within + offset, "consistency": within - offset, "flat": np.ones(6)}
    groups = np.array(["a", "a", "a", "b", "b", "b"])
    result = correlations(rows, ["area_steady"], ["consistency", "flat"], groups)
    assert result["within_prompt"]["area_steady"]["consistency"] == 1.0
    expected = np.corrcoef(rows["area_steady"], rows["consistency"])[0, 1]
    assert result["pooled"]["area_steady"]["consistency"] == round(expected, 3) < 0
    assert np.isnan(result["pooled"]["area_steady"]["flat"])  # a constant has no correlation
