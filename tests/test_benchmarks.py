"""Benchmarks that must also run at reduced size on the CPU."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_full_size_step_runs_reduced_on_cpu():
    result = subprocess.run(
        [sys.executable, "benchmarks/full_size_step.py", "--device", "cpu", "--layers", "2", "--heads", "2",
         "--head-dim", "32", "--height", "32", "--width", "32", "--frames", "5", "--lora-rank", "4",
         "--dtype", "fp32", "--steps", "1", "--no-full-vae", "--rg-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    dpo = report["dpo"]
    assert dpo["frames"] == 5 and dpo["latent_shape"] == [16, 2, 4, 4]
    assert dpo["tokens"] == 2 * 2 * 2 + 333
    assert dpo["seconds_per_step"] > 0 and dpo["achieved_tflops_per_s"] > 0
    rg = report["reward_gradient"]
    assert rg["frames"] == 5 and rg["grad_steps"] == 1 and rg["decoded_frames"] == 1 and rg["seconds_per_step"] > 0
