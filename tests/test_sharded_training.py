"""The trainers under the shipped accelerate configs (DDP, FSDP2, DeepSpeed ZeRO-2), 2 processes on the CPU.

accelerate cannot launch FSDP or DeepSpeed on a CPU by itself; tests/sharded_cpu_launch.py lets it (see
there). The references are 2-process DDP runs (configs/accelerate/multi_gpu.yaml with use_cpu) of the same
trainer on the same pairs.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf.lora import module_keys
from tests.conftest import REPO, call_cli

pytest.importorskip("deepspeed", reason="DeepSpeed is part of the [test] extra")

COMMON = ["--dtype", "fp32", "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none",
          "--no-gradient-checkpointing", "--learning-rate", "1e-3", "--gradient-accumulation-steps", "2",
          "--max-steps", "4", "--save-every", "2", "--device", "cpu"]


def accelerate_config(tmp_path, name: str, mixed_precision: str):
    """The shipped configs/accelerate/NAME.yaml for 2 processes (DDP: on the CPUs, which accelerate supports)."""
    config = yaml.safe_load((REPO / "configs" / "accelerate" / f"{name}.yaml").read_text())
    config.update(num_processes=2, mixed_precision=mixed_precision)
    if config["distributed_type"] == "MULTI_GPU":
        config["use_cpu"] = True
    path = tmp_path / f"{name}-{mixed_precision}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(pairs, out, *extra, launch_config, env=None):
    """`accelerate launch --config_file LAUNCH_CONFIG contentv-rlhf train ...` (FSDP / DeepSpeed through the
    test launcher that lets accelerate run them on CPUs). With `pairs` None, `extra` names the inputs."""
    sharded = yaml.safe_load(launch_config.read_text())["distributed_type"] in ("FSDP", "DEEPSPEED")
    entry = ["tests/sharded_cpu_launch.py"] if sharded else ["-m", "rlhf.cli"]
    inputs = ["--pairs", str(pairs)] if pairs is not None else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config),
               "--main_process_port", str(free_port()), *entry,
               "train", *inputs, "--output-dir", str(out), *COMMON, *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def trained(pairs, out, *extra, launch_config, env=None):
    result = train(pairs, out, *extra, launch_config=launch_config, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def assert_skips_a_non_finite_step(pairs, out, launch_config):
    """A NaN loss in step 1's first micro-batch (3rd loss call; 2 micro-batches per step): skipped, counted.

    Run with the shipped defaults (bf16 weights, bf16 autocast, gradient checkpointing)."""
    result = trained(pairs, out, "--dtype", "bf16", "--mixed-precision", "bf16", "--gradient-checkpointing",
                     "--max-steps", "3", "--save-every", "0", launch_config=launch_config,
                     env={"CONTENTV_TEST_NAN_LOSS_CALL": "3"})
    assert "step 1: non-finite loss or gradient, step skipped" in result.stderr
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    log = metrics(out)
    assert "grad_norm" not in log[1] and "grad_norm" in log[2]
    assert all(torch.isfinite(v).all() for v in adapter(out / "adapter").values())


def run_beside_ddp(pairs, tmp_path, name: str, mixed_precision: str):
    """The same training under DDP and under configs/accelerate/NAME.yaml: (launch config, DDP run, run)."""
    launch_config = accelerate_config(tmp_path, name, mixed_precision)
    ddp_run, run = tmp_path / "ddp", tmp_path / name
    result = trained(pairs, ddp_run, "--mixed-precision", mixed_precision,
                     launch_config=accelerate_config(tmp_path, "multi_gpu", mixed_precision))
    assert "x 2 process(es), replicated" in result.stderr
    result = trained(pairs, run, "--mixed-precision", mixed_precision, launch_config=launch_config)
    layout = {"fsdp": "fsdp", "zero2": "deepspeed"}[name]
    assert f"x 2 process(es), {layout}" in result.stderr
    return launch_config, ddp_run, run


def held_fraction(run, reference, what: str) -> float:
    """Rank 0's bytes of `what` (parameter | optimizer) in `run` relative to `reference` (summary.json)."""
    def held(path):
        return json.loads((path / "summary.json").read_text())[f"rank0_{what}_bytes"]

    return held(run) / held(reference)


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_fsdp2_matches_ddp_resumes_exactly_skips_nan_and_its_checkpoints_load_anywhere(tiny_pairs, tmp_path, capsys):
    fsdp, ddp_run, fsdp_run = run_beside_ddp(tiny_pairs, tmp_path, "fsdp", "no")
    resumed = tmp_path / "fsdp-resumed"
    # Same pairs, noise and updates: FSDP only changes where the parameters live.
    assert_same(adapter(fsdp_run / "adapter"), adapter(ddp_run / "adapter"), atol=1e-6)
    assert max(abs(v).max() for v in adapter(fsdp_run / "adapter").values()) > 1e-3  # it did train
    # ... and they live sharded: each of the 2 ranks holds about half of the transformer and of the moments.
    assert 0.45 < held_fraction(fsdp_run, ddp_run, "parameter") < 0.55
    assert held_fraction(fsdp_run, ddp_run, "optimizer") == pytest.approx(0.5, abs=0.05)

    # Only the mid-run checkpoint: the last step's would leave nothing to resume.
    shutil.copytree(fsdp_run / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    trained(tiny_pairs, resumed, "--mixed-precision", "no", "--resume-from", "latest", launch_config=fsdp)
    assert_same(adapter(resumed / "adapter"), adapter(fsdp_run / "adapter"))
    # An FSDP checkpoint resumed under DDP continues the same run.
    ddp_resumed = tmp_path / "ddp-resumed"
    # Only the mid-run checkpoint: the last step's would leave nothing to resume.
    shutil.copytree(fsdp_run / "checkpoints" / "step-0000002", ddp_resumed / "checkpoints" / "step-0000002")
    trained(tiny_pairs, ddp_resumed, "--mixed-precision", "no", "--resume-from", "latest",
            launch_config=accelerate_config(tmp_path, "multi_gpu", "no"))
    assert_same(adapter(ddp_resumed / "adapter"), adapter(fsdp_run / "adapter"), atol=1e-6)
    fsdp_bf16 = accelerate_config(tmp_path, "fsdp", "bf16")
    assert_skips_a_non_finite_step(tiny_pairs, tmp_path / "fsdp-nan", fsdp_bf16)

    # The checkpoint holds full (gathered) state: one process reads it and holds the step-2 weights.
    checkpoint = fsdp_run / "checkpoints" / "step-0000002"
    single = tmp_path / "single"
    code, _, err = call_cli(capsys, "train", "--pairs", str(tiny_pairs), "--output-dir", str(single),
                            *COMMON[:-2], "--mixed-precision", "no", "--max-steps", "2",
                            "--resume-from", str(checkpoint))
    assert code == 0, err
    assert_same(adapter(single / "adapter"), adapter(checkpoint / "adapter"))
    # Optimiser state: full tensors (not one rank's shard) for every adapter weight, by parameter name.
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    weights = module_keys(adapter(checkpoint / "adapter"))
    assert set(saved["state"]) == set(weights)
    for name, state in saved["state"].items():
        assert state["exp_avg_sq"].shape == weights[name].shape, name
    assert sum(state["exp_avg_sq"].abs().sum() for state in saved["state"].values()) > 0


def test_deepspeed_zero2_trains_like_ddp_resumes_exactly_and_skips_nan(tiny_pairs, tmp_path, capsys):
    zero2, ddp_run, ds_run = run_beside_ddp(tiny_pairs, tmp_path, "zero2", "bf16")
    resumed = tmp_path / "zero2-resumed"
    # ZeRO-2 partitions the optimiser state over the 2 ranks (the parameters stay whole, cast to bf16).
    assert held_fraction(ds_run, ddp_run, "optimizer") == pytest.approx(0.5, abs=0.05)
    # At init (adapter zero) both see the same loss and gradient.
    ds_log, ddp_log = metrics(ds_run), metrics(ddp_run)
    assert ds_log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ds_log[0]["grad_norm"] == pytest.approx(ddp_log[0]["grad_norm"], rel=0.01)
    # Later, DeepSpeed computes with bf16 copies of the LoRA weights (DDP autocasts the fp32 ones): the
    # learned update is the same in direction and size, not bit for bit.
    ds, ddp = adapter(ds_run / "adapter"), adapter(ddp_run / "adapter")
    update_ds = torch.cat([v.flatten() for k, v in sorted(ds.items()) if "lora_B" in k])
    update_ddp = torch.cat([v.flatten() for k, v in sorted(ddp.items()) if "lora_B" in k])
    assert torch.nn.functional.cosine_similarity(update_ds, update_ddp, dim=0) > 0.95
    assert update_ds.norm() == pytest.approx(float(update_ddp.norm()), rel=0.1)
    assert ds[next(iter(ds))].dtype == torch.float32  # the fp32 masters, not the bf16 copies

    # Only the mid-run checkpoint: the last step's would leave nothing to resume.
    shutil.copytree(ds_run / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    trained(tiny_pairs, resumed, "--mixed-precision", "bf16", "--resume-from", "latest", launch_config=zero2)
    assert_same(adapter(resumed / "adapter"), adapter(ds_run / "adapter"))
    # DeepSpeed applies the step inside the last backward: it must detect and skip it itself.
    assert_skips_a_non_finite_step(tiny_pairs, tmp_path / "zero2-nan", zero2)

    # A DeepSpeed checkpoint holds partitioned optimiser state: a plain run refuses it with one line.
    code, _, err = call_cli(capsys, "train", "--pairs", str(tiny_pairs), "--output-dir", str(tmp_path / "plain"),
                            *COMMON, "--mixed-precision", "no", "--resume-from",
                            str(ds_run / "checkpoints" / "step-0000002"))
    assert code == 2
    assert "DeepSpeed checkpoints resume only under DeepSpeed" in err
    assert not (tmp_path / "plain").exists()


def test_deepspeed_without_mixed_precision_is_refused(tiny_pairs, tmp_path):
    zero2 = accelerate_config(tmp_path, "zero2", "no")
    result = train(tiny_pairs, tmp_path / "run", "--mixed-precision", "no", launch_config=zero2)
    # Each rank exits with code 2 and one line; the launcher itself reports the failure as 1.
    assert result.returncode != 0
    assert "failed (exitcode: 2)" in result.stderr
    assert "contentv-rlhf train: error: DeepSpeed launches need mixed_precision: bf16" in result.stderr
    assert not (tmp_path / "run").exists()


def test_reward_gradient_under_fsdp_equals_ddp_and_runs_under_zero2(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red ball\na blue lake\na green field\na yellow sun\n")
    (tmp_path / "rewards.yaml").write_text("scorers:\n  brightness: {weight: 1.0}\ndevice: cpu\n")
    inputs = ["--method", "reward_gradient", "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"),
              "--rewards", str(tmp_path / "rewards.yaml"), "--frames", "5", "--height", "32", "--width", "32",
              "--steps", "3", "--guidance", "2", "--max-steps", "3", "--learning-rate", "1e-2"]
    runs = {}
    for name, mixed_precision in (("multi_gpu", "no"), ("fsdp", "no"), ("zero2", "bf16")):
        runs[name] = tmp_path / name
        trained(None, runs[name], *inputs, "--mixed-precision", mixed_precision,
                launch_config=accelerate_config(tmp_path, name, mixed_precision))
    # Several sampler forwards per backward: FSDP reduces in its backward hooks, DDP by hand; same result.
    assert_same(adapter(runs["fsdp"] / "adapter"), adapter(runs["multi_gpu"] / "adapter"), atol=1e-6)
    assert max(abs(v).max() for v in adapter(runs["fsdp"] / "adapter").values()) > 1e-3
    # ZeRO-2 computes in bf16: the first gradient (zero adapter) agrees with DDP's to bf16 precision.
    first = {name: metrics(run)[0] for name, run in runs.items()}
    assert first["zero2"]["grad_norm"] == pytest.approx(first["multi_gpu"]["grad_norm"], rel=0.02)
    # The reward is in z-score units of the base's spread (near 0 at the first step): bound the difference, not
    # the ratio.
    assert first["zero2"]["reward_total"] == pytest.approx(first["multi_gpu"]["reward_total"], abs=0.02)
