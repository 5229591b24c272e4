"""Issue 22, resumes and meaningless numbers: no checkpoint file runs code on resume; a resume or rerun that would
change the result says so (changed training settings, a model's weights changed in place, a failed validation
leaving files behind); NaN, zero or negative margins and runs of skipped steps end with exit 2; every JSON written
is strict; one run directory trains one process at a time; a missing pairs folder is "not found"."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, call_cli
from tests.test_dpo_trainer import metrics, train_args
from tests.test_run_directories import fails_with, files_and_bytes

FAST_ROLLOUT = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "1",
                "--samples-per-prompt", "1", "--batch-size", "1", "--dtype", "fp32", "--device", "cpu"]


class WritesMarker:
    """A pickle that creates the file `path` when it is unpickled with arbitrary objects allowed."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_no_checkpoint_file_runs_code_on_resume(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "2", "--save-every", "0"))[0] == 0
    checkpoint = out / "checkpoints" / "step-0000002"
    pickles = sorted(p.name for p in checkpoint.iterdir() if p.suffix == ".pt")
    assert pickles == ["optimizer.pt", "rng_rank0.pt", "scheduler.pt"]  # the others are JSON and safetensors
    for name in pickles:
        original = (checkpoint / name).read_bytes()
        marker = tmp_path / f"ran-{name}"
        torch.save({"cpu": WritesMarker(marker), "state": WritesMarker(marker)}, checkpoint / name)
        err = fails_with(capsys, train_args(tiny_pairs, out, "--max-steps", "4", "--resume-from", "latest"),
                         f"{checkpoint}: corrupt checkpoint")
        assert not marker.exists(), f"unpickling {name} ran code"
        assert len(err) < 500, err
        (checkpoint / name).write_bytes(original)
    # Unchanged files resume.
    assert call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "4", "--resume-from", "latest"))[0] == 0


def test_deepspeed_checkpoint_files_are_read_without_running_code(tmp_path):
    """DeepSpeed unpickles its files with any object allowed: `check_deepspeed_files` reads them first with torch's
    weights_only unpickler, letting through the DeepSpeed classes of a real ZeRO-2 checkpoint only."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is part of the [test] extra")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from rlhf.training import check_deepspeed_files

    state = tmp_path / "deepspeed" / "state"
    state.mkdir(parents=True)
    # What ZeRO-2 writes (checked on a real checkpoint: these are its only classes outside torch's allowlist).
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                         "single_partition_of_fp32_groups": [torch.zeros(4)]},
                "ds_version": "0.19"}, state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 2}, state / "mp_rank_00_model_states.pt")
    check_deepspeed_files(tmp_path / "deepspeed")

    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": WritesMarker(marker)}, state / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError):
        check_deepspeed_files(tmp_path / "deepspeed")
    assert not marker.exists()


def rebuilt_pairs(pairs: Path, out: Path, margin) -> Path:
    """A copy of the pairs dataset (same store) with each margin replaced by `margin(index, old)`."""
    import datasets
    from datasets import load_from_disk

    datasets.disable_progress_bars()  # its bars go to the stderr the tests read the commands' one line from

    dataset = load_from_disk(str(pairs))
    dataset = dataset.map(lambda row, i: {"margin": margin(i, row["margin"])}, with_indices=True,
                          keep_in_memory=True)
    dataset.save_to_disk(str(out))
    shutil.copy(pairs / "summary.json", out / "summary.json")
    return out


def test_a_resume_that_changes_the_trajectory_is_refused_unless_allowed(tiny_pairs, tmp_path, capsys):
    pairs, out = tmp_path / "pairs", tmp_path / "run"
    shutil.copytree(tiny_pairs, pairs)
    assert call_cli(capsys, *train_args(pairs, out, "--max-steps", "2", "--save-every", "0"))[0] == 0
    checkpoint = out / "checkpoints" / "step-0000002"
    before = files_and_bytes(out)
    resume = ["--max-steps", "4", "--resume-from", "latest"]
    for changed, expected in (
        (["--learning-rate", "1e-3"], "learning_rate (checkpoint: 0.0001, now: 0.001)"),
        (["--beta", "100"], "beta (checkpoint: 500.0, now: 100.0)"),
        (["--seed", "3", "--sft-weight", "0.5"], "seed (checkpoint: 0, now: 3)"),
        (["--lr-scheduler", "cosine"], "lr_scheduler"),
    ):
        err = fails_with(capsys, train_args(pairs, out, *resume, *changed),
                         f"{checkpoint}: the checkpoint was trained with other settings", expected,
                         "--allow-changed-settings")
        assert "sft_weight" in err or "--seed" not in changed
    # Other pairs: another folder (the same rows), or the same folder rebuilt with other margins.
    fails_with(capsys, train_args(tiny_pairs, out, *resume), f"pairs (checkpoint: '{pairs}', now: '{tiny_pairs}')")
    aside = tmp_path / "aside"
    shutil.move(pairs, aside)
    rebuilt_pairs(aside, pairs, lambda i, m: m * 2)
    capsys.readouterr()  # the rebuild's own dataset progress bars are not the command's output
    err = fails_with(capsys, train_args(pairs, out, *resume), "other settings: pairs_sha256 (checkpoint: ")
    assert "pairs (" not in err
    shutil.rmtree(pairs)
    shutil.move(aside, pairs)
    assert files_and_bytes(out) == before

    # Settings that do not change a step's computation stay free (more steps under a constant schedule).
    code, _, err = call_cli(capsys, *train_args(pairs, out, *resume, "--log-every", "2", "--save-every", "1",
                                                "--keep-last", "5", "--no-log-utilisation"))
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["changed_settings"] == []

    # With the flag the change is recorded: summary.json, the resumed step's metrics, the next checkpoint.
    code, _, err = call_cli(capsys, *train_args(pairs, out, "--max-steps", "6", "--resume-from", "latest",
                                                "--learning-rate", "1e-3", "--allow-changed-settings"))
    assert code == 0, err
    change = {"step": 4, "settings": {"learning_rate": {"checkpoint": 1e-4, "now": 1e-3}}}
    assert json.loads((out / "summary.json").read_text())["changed_settings"] == [change]
    assert [r.get("changed_settings") for r in metrics(out) if r["step"] >= 4] == [change["settings"], None]
    state = json.loads((out / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["changed_settings"] == [change] and state["settings"]["learning_rate"] == 1e-3
    # ... and the new settings are the checkpoint's from then on; the change stays recorded.
    code, _, err = call_cli(capsys, *train_args(pairs, out, "--max-steps", "7", "--resume-from", "latest",
                                                "--learning-rate", "1e-3"))
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["changed_settings"] == [change]


def test_rollout_resume_sees_weights_changed_in_place(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    store = tmp_path / "store"
    args = ["rollout", "--model", model, "--prompts", prompts, "--out", store, *FAST_ROLLOUT]
    assert call_cli(capsys, *args)[0] == 0
    # Same file sizes, other weights: a tensor's values rewritten in the middle of the shard.
    shard = next((model / "transformer").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-128:-64] = bytes(255 - b for b in data[-128:-64])  # inside the last tensor's values
    shard.write_bytes(bytes(data))
    fails_with(capsys, args, f"{store / 'store.json'}: store was made with other settings", "model_fingerprint")


def test_a_rollout_that_fails_validation_leaves_nothing_behind(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    store = tmp_path / "store"
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_model_dir, incomplete, ignore=shutil.ignore_patterns("vae"))
    for bad, expected in ((tmp_path / "missing", "model directory not found"), (incomplete, "vae: missing")):
        fails_with(capsys, ["rollout", "--model", bad, "--prompts", prompts, "--out", store, *FAST_ROLLOUT,
                            "--save-frames", "1"], expected)
        assert not (store / "store.json").exists()
    # The corrected command runs without --overwrite.
    code, _, err = call_cli(capsys, "rollout", "--model", tiny_model_dir, "--prompts", prompts, "--out", store,
                            *FAST_ROLLOUT)
    assert code == 0, err


def test_bad_margins_and_skipped_runs_end_with_exit_2(tiny_pairs, tmp_path, capsys, monkeypatch):
    import dpo.trainer

    for name, margin in (("nan", lambda i, m: float("nan") if i == 1 else m), ("zero", lambda i, m: 0.0),
                         ("mixed", lambda i, m: -m if i % 2 else m)):
        pairs = rebuilt_pairs(tiny_pairs, tmp_path / f"pairs-{name}", margin)
        out = tmp_path / f"run-{name}"
        fails_with(capsys, train_args(pairs, out, "--pair-weighting", "margin", "--max-steps", "2"),
                   f"{pairs}: pair_weighting margin needs every margin finite and > 0", "(e.g. p0")
        assert not out.exists()  # refused before step 0

    real_loss = dpo.trainer.flow_dpo_loss
    calls = {"n": 0}

    def nan_loss(*args, nan_calls, **kwargs):
        calls["n"] += 1
        loss, values = real_loss(*args, **kwargs)
        if calls["n"] in nan_calls:
            return loss * torch.nan, {key: value * torch.nan for key, value in values.items()}
        return loss, values

    # Every step non-finite, fewer steps than max_nonfinite_steps: no adapter, exit 2.
    monkeypatch.setattr(dpo.trainer, "flow_dpo_loss", lambda *a, **k: nan_loss(*a, nan_calls=range(1, 99), **k))
    out = tmp_path / "all-nan"
    fails_with(capsys, train_args(tiny_pairs, out, "--max-steps", "3"),
               "training ended with 3 of 3 steps skipped as non-finite", "no adapter written")
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    # More than max_skipped_fraction skipped: 2 of 3 > 0.5.
    calls["n"] = 0
    monkeypatch.setattr(dpo.trainer, "flow_dpo_loss", lambda *a, **k: nan_loss(*a, nan_calls={1, 3}, **k))
    fails_with(capsys, train_args(tiny_pairs, tmp_path / "two-nan", "--max-steps", "3"), "2 of 3 steps skipped")

    # One skipped step of 4 trains; its NaN loss is written as null: strict JSON everywhere.
    calls["n"] = 0
    monkeypatch.setattr(dpo.trainer, "flow_dpo_loss", lambda *a, **k: nan_loss(*a, nan_calls={2}, **k))
    out = tmp_path / "one-nan"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "4"))
    assert code == 0, err
    records = [strict_json(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["loss"] is None and records[2]["loss"] is not None
    summary = strict_json((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["last_10_steps_mean"]["loss"] is not None
    for path in out.rglob("*.json"):
        strict_json(path.read_text())


def test_one_run_directory_trains_one_process_at_a_time(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    args = [str(a) for a in train_args(tiny_pairs, out, "--max-steps", "10000", "--save-every", "0")]
    first = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 600
        while not (out / "logs" / "metrics.jsonl").exists():  # a step done: past the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        fails_with(capsys, train_args(tiny_pairs, out, "--max-steps", "4", "--overwrite"),
                   f"{out}: another train process (PID {first.pid}) is training into this run directory")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The lock file a kill -9 left does not block the rerun, which removes it when done.
    assert (out / ".run.lock").exists()
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "3", "--overwrite"))
    assert code == 0, err
    assert not (out / ".run.lock").exists()


def test_pairs_folder_that_does_not_exist_is_not_found(tmp_path, capsys):
    missing = tmp_path / "no-such-pairs"
    fails_with(capsys, train_args(missing, tmp_path / "run"), f"{missing}: pairs dataset not found")


def test_grpo_resume_inside_a_round_is_refused_before_the_run_is_touched(tiny_model_dir, tmp_path, capsys):
    from tests.test_grpo import TINY, flags

    prompts, rewards = tmp_path / "prompts.txt", tmp_path / "rewards.yaml"
    prompts.write_text("a red ball\na blue lake\n")
    rewards.write_text("scorers:\n  brightness: {weight: 1.0}\ndevice: cpu\n")
    out = tmp_path / "run"
    common = flags(**{**TINY, "model": tiny_model_dir, "prompts": prompts, "rewards": rewards, "output_dir": out,
                      "max_steps": 4, "save_every": 2})
    assert call_cli(capsys, "train", "--method", "grpo", *common)[0] == 0
    before = files_and_bytes(out)
    # Step 2 is inside a round of 4 updates: refused, and the later step-4 checkpoint is still there.
    fails_with(capsys, ["train", "--method", "grpo", *common, "--updates-per-round", "4", "--save-every", "4",
                        "--allow-changed-settings", "--resume-from", out / "checkpoints" / "step-0000002"],
               "resume_from: the checkpoint is at step 2, inside a round of updates_per_round 4")
    assert files_and_bytes(out) == before
