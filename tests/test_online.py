"""Online DPO: rounds chain adapters, and an interrupted run resumes at the right round and step."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, TRAIN_PROMPTS, call_cli


def online_config(tmp_path, model, out):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text(yaml.safe_dump({"scorers": {"brightness": {"weight": 1.0}}, "device": "cpu"}))
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "prompts": str(prompts), "rewards": str(rewards), "out": str(out), "rounds": 2,
        "reference": "previous", "device": "cpu",
        "rollout": {"samples_per_prompt": 4, "batch_size": 4, "frames": 1, "height": 32, "width": 32,
                    "steps": 2, "guidance": 3.0, "save_frames": 1, "dtype": "fp32"},
        "pairs": {"min_margin": 0.0},
        "train": {"max_steps": 6, "save_every": 2, "learning_rate": 1e-3, "dtype": "fp32",
                  "mixed_precision": "no", "lora_rank": 4, "lora_alpha": 4, "report_to": "none",
                  "gradient_checkpointing": False},
    }))
    return config


def test_online_resumes_at_the_right_round_and_step(tiny_model_dir, tmp_path, capsys, caplog):
    straight = tmp_path / "straight"
    code, out, err = call_cli(capsys, "online", "--config", online_config(tmp_path, tiny_model_dir, straight))
    assert code == 0, err
    rows = json.loads((straight / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1] and all(r["pairs"] == 6 for r in rows)
    assert "impl.acc" in out
    store_settings = json.loads((straight / "round-01" / "rollout" / "store.json").read_text())["settings"]
    assert store_settings["adapter"] == str((straight / "round-00" / "train" / "adapter").resolve())

    # Interrupt a second run during round 1's training (after its first checkpoint), then rerun.
    resumed = tmp_path / "resumed"
    config = online_config(tmp_path, tiny_model_dir, resumed)
    process = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "online", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = resumed / "round-01" / "train" / "checkpoints"
    deadline = time.time() + 240
    while not list(checkpoints.glob("step-*")) and time.time() < deadline:
        assert process.poll() is None, "the online run finished before it could be interrupted"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (resumed / "round-01" / "train" / "adapter").exists()

    caplog.clear()
    caplog.set_level(logging.INFO, logger="contentv-rlhf")
    code, out, err = call_cli(capsys, "online", "--config", config)
    assert code == 0, err
    assert out.count("already done") == 5  # round 0: rollout, pairs, train; round 1: rollout, pairs
    assert "resumed from" in caplog.text and "round-01/train/checkpoints/step-" in caplog.text
    a = load_file(str(straight / "round-01" / "train" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "round-01" / "train" / "adapter" / "adapter_model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_online_rejects_owned_and_unknown_section_keys(tiny_model_dir, tmp_path, capsys):
    config = online_config(tmp_path, tiny_model_dir, tmp_path / "run")
    data = yaml.safe_load(config.read_text())
    data["train"]["output_dir"] = "x"
    config.write_text(yaml.safe_dump(data))
    code, _, err = call_cli(capsys, "online", "--config", config)
    assert code == 2 and "field 'train' must not set ['output_dir']" in err
    del data["train"]["output_dir"]
    data["rollout"]["stpes"] = 3
    config.write_text(yaml.safe_dump(data))
    code, _, err = call_cli(capsys, "online", "--config", config)
    assert code == 2 and "online.rollout: unknown field 'stpes'" in err and "did you mean 'steps'" in err
    assert not (tmp_path / "run").exists()
