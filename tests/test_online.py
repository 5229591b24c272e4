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


def test_online_budget_covers_every_round_and_stops_before_a_round_it_cannot_train(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """With max_seconds, each round's training gets what is left of the run's budget, and a round starts only if
    what is left covers the previous round's data and min_train_share of its training. Stages are faked on a fake
    clock (no timing)."""
    import rlhf.cli
    from dpo import online
    from rlhf.config import config_from_dict

    clock = {"now": 1000.0}
    monkeypatch.setattr(online.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr("rlhf.clock.seconds_since_command_start", lambda: 5.0)  # 5 s spent before the loop
    calls = []

    def fake_stage(argv):
        calls.append(argv)
        if argv[0] == "train":
            clock["now"] += min(float(argv[argv.index("--max-seconds") + 1]), 30.0)  # 30 s, or the budget left
        else:
            clock["now"] += {"rollout": 40.0, "score": 10.0, "pairs": 1.0}[argv[0]]
        return 0

    monkeypatch.setattr(rlhf.cli, "main", fake_stage)
    monkeypatch.setattr(online, "_round_summary", lambda round_dir, index: {
        "round": index, "mean_rewards": {}, "pairs": 1, "implicit_accuracy": None, "steps_done": 1,
        "stopped_by_max_seconds": False})
    config = yaml.safe_load(online_config(tmp_path, tiny_model_dir, tmp_path / "run").read_text())
    config.update(rounds=6, max_seconds=150.0, seed=100, min_train_share=0.0)
    config["train"]["seed"] = 7
    rows = online.run_online(config_from_dict(online.OnlineConfig, config))
    # Written out: round 0's data ends at 5 + 51 = 56 s, its training may use 150 - 56 = 94 s and takes 30;
    # round 1 starts with 64 s left (> 51 + 0 x 30), its training gets 150 - 137 = 13 s; then 0 s are left: stop.
    trains = [argv for argv in calls if argv[0] == "train"]
    assert [float(argv[argv.index("--max-seconds") + 1]) for argv in trains] == [94.0, 13.0]
    assert len(rows) == 2 and [row["seconds"]["train"] for row in rows] == [30.0, 13.0]
    # Round r samples with seed + r and trains with train.seed + r.
    assert [argv[argv.index("--seed") + 1] for argv in calls if argv[0] == "rollout"] == ["100", "101"]
    assert [argv[argv.index("--seed") + 1] for argv in trains] == ["7", "8"]

    # min_train_share 0.5 (the default): round 1 would need 51 + 0.5 x 30 = 66 s and 64 s are left: round 0's
    # adapter is the result, 64 s unspent rather than a round that trains 13 s.
    calls.clear()
    clock["now"] = 1000.0
    config.update(min_train_share=0.5, out=str(tmp_path / "run2"))
    rows = online.run_online(config_from_dict(online.OnlineConfig, config))
    assert len(rows) == 1 and [argv[0] for argv in calls] == ["rollout", "score", "pairs", "train"]
    # With a 160 s budget round 1 starts (74 s left > 66) and trains 23 s.
    calls.clear()
    clock["now"] = 1000.0
    config.update(max_seconds=160.0, out=str(tmp_path / "run3"))
    rows = online.run_online(config_from_dict(online.OnlineConfig, config))
    assert [row["seconds"]["train"] for row in rows] == [30.0, 23.0]


def test_online_rejects_a_train_budget_beside_the_run_budget(tiny_model_dir, tmp_path, capsys):
    config = online_config(tmp_path, tiny_model_dir, tmp_path / "run")
    data = yaml.safe_load(config.read_text())
    data["max_seconds"] = 60
    data["train"]["max_seconds"] = 30
    config.write_text(yaml.safe_dump(data))
    code, _, err = call_cli(capsys, "online", "--config", config)
    assert code == 2 and "field 'train' must not set max_seconds" in err
    data["train"].pop("max_seconds")
    data["min_train_share"] = 1.5
    config.write_text(yaml.safe_dump(data))
    code, _, err = call_cli(capsys, "online", "--config", config)
    assert code == 2 and "field 'min_train_share' must be in [0, 1], got 1.5" in err
    data.pop("min_train_share")
    data["max_seconds"] = float("nan")
    config.write_text(yaml.safe_dump(data))
    code, _, err = call_cli(capsys, "online", "--config", config)
    assert code == 2 and "max_seconds" in err and "finite" in err
    assert not (tmp_path / "run").exists()


def test_online_sections_start_from_stage_config_files(tiny_model_dir, tmp_path, monkeypatch):
    """`config: FILE` in a section: the stage file's fields, less what the loop sets (paths, method, device, seed),
    overridden by the section's own keys; the run's seeds still advance every round. Stages are faked."""
    import rlhf.cli
    from dpo import online
    from rlhf.config import config_from_dict

    dpo_file, rollout_file = tmp_path / "dpo.yaml", tmp_path / "rollout.yaml"
    dpo_file.write_text(yaml.safe_dump({
        "method": "dpo", "pairs": "elsewhere", "output_dir": "elsewhere", "device": "cuda", "seed": 99,
        "beta": 250.0, "lora_rank": 8, "lora_alpha": 8, "max_steps": 700, "dtype": "fp32", "mixed_precision": "no",
        "report_to": "none", "gradient_checkpointing": False}))
    rollout_file.write_text(yaml.safe_dump({"model": "elsewhere", "out": "elsewhere", "seed": 99, "steps": 2,
                                            "samples_per_prompt": 8, "batch_size": 8, "frames": 1, "height": 32,
                                            "width": 32, "save_frames": 1, "dtype": "fp32"}))
    config = yaml.safe_load(online_config(tmp_path, tiny_model_dir, tmp_path / "run").read_text())
    config.update(seed=100, rollout={"config": str(rollout_file), "samples_per_prompt": 4, "batch_size": 4},
                  train={"config": str(dpo_file), "max_steps": 6})
    resolved = config_from_dict(online.OnlineConfig, config)
    assert resolved.train == {"beta": 250.0, "lora_rank": 8, "lora_alpha": 8, "max_steps": 6, "dtype": "fp32",
                              "mixed_precision": "no", "report_to": "none", "gradient_checkpointing": False}
    assert resolved.rollout == {"steps": 2, "samples_per_prompt": 4, "batch_size": 4, "frames": 1, "height": 32,
                                "width": 32, "save_frames": 1, "dtype": "fp32"}

    calls = []
    monkeypatch.setattr(rlhf.cli, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(online, "_round_summary", lambda round_dir, index: {
        "round": index, "mean_rewards": {}, "pairs": 1, "implicit_accuracy": None, "steps_done": 6,
        "stopped_by_max_seconds": False})
    online.run_online(resolved)
    rollouts = [argv for argv in calls if argv[0] == "rollout"]
    trains = [argv for argv in calls if argv[0] == "train"]
    assert [argv[argv.index("--seed") + 1] for argv in rollouts] == ["100", "101"]  # not the file's 99
    assert [argv[argv.index("--seed") + 1] for argv in trains] == ["100", "101"]
    assert all(argv[argv.index("--device") + 1] == "cpu" and argv.count("--device") == 1 for argv in trains)
    assert trains[0][trains[0].index("--beta") + 1] == "250.0" and "--max-steps" in trains[0]
    assert trains[0][trains[0].index("--output-dir") + 1] == str(tmp_path / "run" / "round-00" / "train")


def test_online_refuses_section_config_files_it_cannot_use(tiny_model_dir, tmp_path, capsys):
    config = online_config(tmp_path, tiny_model_dir, tmp_path / "run")
    data = yaml.safe_load(config.read_text())
    stage = tmp_path / "stage.yaml"
    cases = [
        (None, {"config": str(tmp_path / "missing.yaml")},
         "field 'train.config' must be the path of a `train --method dpo` config YAML file"),
        ({"method": "grpo", "group_size": 4}, {"config": str(stage)}, "configures method 'grpo'; online rounds train "
                                                                      "Flow-DPO"),
        (["not", "a", "mapping"], {"config": str(stage)}, "expected a mapping of field names at the top level"),
        ({"max_seconds": 30}, {"config": str(stage)}, "field 'train' must not set max_seconds (here or in its config "
                                                      "file)"),
    ]
    for content, section, expected in cases:
        if content is not None:
            stage.write_text(yaml.safe_dump(content))
        config.write_text(yaml.safe_dump({**data, "max_seconds": 60, "train": section}))
        code, _, err = call_cli(capsys, "online", "--config", config)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
