"""Run directories: train is resumed or replaced, never mixed; kill -9 loses and duplicates nothing (checkpoints,
metrics.jsonl, tensorboard); every input is checked before step 0; merge cleans what a killed merge left; adapters
record the base model they were trained on and are refused on another."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhf.base_model import RECORD, identity
from tests.conftest import REPO, call_cli, random_adapter
from tests.test_dpo_trainer import adapter_weights, metrics, train_args

RUN_ENTRIES = ["adapter", "checkpoints", "logs", "summary.json"]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def files_and_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails_with(capsys, args, *expected: str) -> str:
    code, _, err = call_cli(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_a_run_directory_is_only_resumed_or_replaced(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "5", "--save-every", "2"))[0] == 0
    # The last step is checkpointed too, not only every save_every steps.
    assert checkpoint_names(out) == ["step-0000002", "step-0000004", "step-0000005"]
    before = files_and_bytes(out)

    # Training into it again without saying what to do with the old run is refused, and touches nothing.
    fails_with(capsys, train_args(tiny_pairs, out, "--max-steps", "2", "--lora-rank", "8"),
               f"{out}: already holds a training run (adapter, checkpoints, logs, summary.json)", "--resume-from",
               "--overwrite")
    fails_with(capsys, train_args(tiny_pairs, out, "--overwrite", "--resume-from", "latest"),
               "overwrite", "resume_from")
    assert files_and_bytes(out) == before

    # --overwrite replaces the whole run: no checkpoint, metric, adapter or set-aside copy of the old one survives
    # (nor what a killed earlier overwrite had set aside).
    killed_overwrite = out / ".replaced-run-k1ll3d00"
    (killed_overwrite / "checkpoints").mkdir(parents=True)
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "3", "--save-every", "0",
                                                "--lora-rank", "8", "--overwrite"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == RUN_ENTRIES
    assert checkpoint_names(out) == ["step-0000003"]
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]
    for adapter in (out / "adapter", out / "checkpoints" / "step-0000003" / "adapter"):
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_resume_names_the_setting_that_differs(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "2", "--save-every", "0"))[0] == 0
    checkpoint = out / "checkpoints" / "step-0000002"
    before = files_and_bytes(out)
    resume = ["--max-steps", "4", "--resume-from", "latest"]
    for changed, expected in (
        (["--lora-rank", "8"], "trained with lora_rank 4, this run has lora_rank 8"),
        (["--lora-alpha", "16"], "trained with lora_alpha 8, this run has lora_alpha 16"),
        (["--lora-targets", "attn.to_q,attn.to_k"], "this run has lora_targets attn.to_k,attn.to_q"),
    ):
        err = fails_with(capsys, train_args(tiny_pairs, out, *resume, *changed), f"{checkpoint}: ", expected)
        assert "corrupt" not in err
    assert files_and_bytes(out) == before
    # The same settings resume (alpha given as 8.0 is the same setting as 8).
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, *resume, "--lora-alpha", "8.0"))
    assert code == 0, err
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]


def test_store_files_of_the_pairs_are_checked_before_step_0(tiny_pairs, tiny_store, tmp_path, capsys):
    from datasets import load_from_disk

    rows = load_from_disk(str(tiny_pairs)).to_list()
    store = tmp_path / "store"
    shutil.copytree(tiny_store.root, store)
    copy = type(tiny_store)(store)
    # Files that only the last pairs use: a trainer reading lazily would meet them last.
    late_sample = copy.sample_path(rows[-1]["rejected_id"])
    late_prompt = next(r["prompt_id"] for r in reversed(rows) if r["prompt_id"] != rows[0]["prompt_id"])
    out = tmp_path / "run"
    args = train_args(tiny_pairs, out, "--store", store, "--max-steps", "2")

    original = late_sample.read_bytes()
    late_sample.write_bytes(original[: len(original) // 2])
    fails_with(capsys, args, f"{late_sample}: truncated or corrupt", "rerun the rollout")
    late_sample.unlink()
    fails_with(capsys, args, f"{late_sample}: missing from the rollout store")
    late_sample.write_bytes(original)
    copy.embeds_path(late_prompt).unlink()
    fails_with(capsys, args, f"{copy.embeds_path(late_prompt)}: missing from the rollout store")
    assert not out.exists()  # no logs/, nothing


TIMINGS = {"step_seconds", "command_seconds", "mfu", "hfu"}  # measured per step: differ between any two runs


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


def event_steps(logs: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logs / "contentv-rlhf"))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def test_a_resumed_run_logs_each_step_once(tiny_pairs, tmp_path, capsys):
    common = ["--max-steps", "6", "--save-every", "3", "--report-to", "tensorboard", "--learning-rate", "1e-3"]
    straight = tmp_path / "straight"
    assert call_cli(capsys, *train_args(tiny_pairs, straight, *common))[0] == 0
    assert event_steps(straight / "logs", "loss") == list(range(6))
    # As if killed after logging step 5 but before its checkpoint, in the middle of writing a metrics line.
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    for path in (killed / "checkpoints" / "step-0000006", killed / "adapter"):
        shutil.rmtree(path)
    (killed / "summary.json").unlink()
    with open(killed / "logs" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 0.69')
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, killed, *common, "--resume-from", "latest"))
    assert code == 0, err
    assert without_timing(metrics(killed)) == without_timing(metrics(straight))
    assert event_steps(killed / "logs", "loss") == list(range(6))
    summary = json.loads((killed / "summary.json").read_text())["last_10_steps_mean"]
    assert summary["loss"] == json.loads((straight / "summary.json").read_text())["last_10_steps_mean"]["loss"]

    # Resumed from an older checkpoint, the run drops the later ones (their steps are cut from the logs), so
    # that a later `--resume-from latest` cannot jump to them.
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, killed, *common, "--max-steps", "5", "--resume-from",
                                                killed / "checkpoints" / "step-0000003"))
    assert code == 0, err
    assert checkpoint_names(killed) == ["step-0000003", "step-0000005"]
    assert [r["step"] for r in metrics(killed)] == [0, 1, 2, 3, 4]
    assert event_steps(killed / "logs", "loss") == [0, 1, 2, 3, 4]


def start_training(args) -> tuple[subprocess.Popen, Path]:
    """`contentv-rlhf train` in a subprocess, single-threaded: every run of the test computes alike (a thread
    count changes float reductions) and a busy machine is not thrashed. Returns it and its log file."""
    log = Path(args[args.index("--output-dir") + 1]).with_suffix(".log")
    with open(log, "ab") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *map(str, args)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return process, log


def train_to_the_end(args, timeout: float = 1800) -> None:
    process, log = start_training(args)
    assert process.wait(timeout) == 0, log.read_text()[-3000:]


def train_until_killed(args, ready, timeout: float = 1800) -> None:
    """Run `contentv-rlhf train` in a subprocess and SIGKILL it as soon as `ready()` holds."""
    process, log = start_training(args)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"train ended before the kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the kill point was never reached"
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_kill_9_at_three_points_then_resume(tiny_pairs, tmp_path):
    common = ["--max-steps", "12", "--save-every", "4", "--learning-rate", "1e-3", "--lora-dropout", "0.1"]
    straight = tmp_path / "straight"
    train_to_the_end(train_args(tiny_pairs, straight, *common))

    out = tmp_path / "killed"
    checkpoints = out / "checkpoints"

    def logged() -> list[int]:
        try:
            return [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        except (OSError, ValueError):  # not there yet, or a line being written
            return []

    def checkpointing() -> bool:
        names = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
        return any(n.startswith(".step-") for n in names) or "step-0000008" in names

    # 1. after two steps, before the first checkpoint; 2. while a checkpoint is written (or just after the
    # second); 3. three steps before the end, after the last periodic checkpoint.
    train_until_killed(train_args(tiny_pairs, out, *common), lambda: len(logged()) >= 2)
    assert not list(checkpoints.glob("step-*"))  # `latest` has no checkpoint to resume: it starts at step 0
    train_until_killed(train_args(tiny_pairs, out, *common, "--resume-from", "latest"), checkpointing)
    train_until_killed(train_args(tiny_pairs, out, *common, "--resume-from", "latest"),
                       lambda: max(logged(), default=0) >= 9)
    train_to_the_end(train_args(tiny_pairs, out, *common, "--resume-from", "latest"))

    a, b = adapter_weights(straight), adapter_weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(out)] == list(range(12))
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(straight)]
    assert sorted(p.name for p in out.iterdir()) == RUN_ENTRIES  # no staging left behind
    assert checkpoint_names(out) == ["step-0000004", "step-0000008", "step-0000012"]


KILLED_MERGE = """
import os, signal, sys
import rlhf.merge

real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
rlhf.merge.os.replace = replace
rlhf.merge.merge_adapters(sys.argv[2], [sys.argv[3]], sys.argv[4], overwrite=True)
"""


def test_merge_removes_what_a_killed_merge_left(tiny_model_dir, tmp_path, capsys):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", std=0.1)
    parent = tmp_path / "models"
    out = parent / "merged"

    def killed_merge(at_rename: int) -> None:
        result = subprocess.run([sys.executable, "-c", KILLED_MERGE, str(at_rename), str(tiny_model_dir),
                                 str(adapter), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]

    def leftovers() -> list[str]:
        return sorted(p.name for p in parent.iterdir() if p.name != "merged")

    # Killed with the staged checkpoint complete, just before it is renamed into place.
    killed_merge(at_rename=1)
    assert not out.exists()
    staged = leftovers()
    assert [Path(n).suffix for n in staged] == [".partial", ".owner"]
    assert (parent / staged[0] / "transformer").is_dir()
    # Look-alikes that are not a dead merge's: a directory without an owner file, a merge still running.
    foreign = parent / ".merged.n0tours0.partial"
    (foreign / "data").mkdir(parents=True)
    running = parent / ".merged.running0.partial"
    running.mkdir()
    (parent / ".merged.running0.partial.owner").write_text(json.dumps({"pid": os.getpid(),
                                                                         "host": socket.gethostname()}))
    code, _, err = call_cli(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out)
    assert code == 0, err
    assert leftovers() == [foreign.name, running.name, running.name + ".owner"]
    merged = files_and_bytes(out)
    shutil.rmtree(foreign)
    shutil.rmtree(running)
    (parent / ".merged.running0.partial.owner").unlink()

    # Killed while replacing an existing output: the old one set aside, the new one not yet renamed.
    killed_merge(at_rename=2)
    assert sorted(Path(n).suffix for n in leftovers()) == [".old", ".owner", ".owner", ".partial"]
    code, _, err = call_cli(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out,
                            "--overwrite")
    assert code == 0, err
    assert leftovers() == []
    assert {p.relative_to(out): b for p, b in files_and_bytes(out).items()} == {
        p.relative_to(out): b for p, b in merged.items()}


def test_adapters_record_their_base_model_and_are_refused_on_another(tiny_model_dir, tiny_pairs, tmp_path, capsys,
                                                                      caplog):
    from rlhf.models.tiny import build_tiny_model

    run = tmp_path / "run"
    assert call_cli(capsys, *train_args(tiny_pairs, run, "--max-steps", "1", "--save-every", "0"))[0] == 0
    adapter = run / "adapter"
    record = json.loads((adapter / RECORD).read_text())
    assert record == identity(tiny_model_dir)
    assert (run / "checkpoints" / "step-0000001" / "adapter" / RECORD).read_text() == (adapter / RECORD).read_text()

    # The identity is the model's content, not its path; a base of the same shapes with other weights differs.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir, moved)
    other = build_tiny_model(tmp_path / "other", seed=1)
    mine = identity(tiny_model_dir)
    assert {k: v for k, v in identity(moved).items() if k != "model"} == {k: v for k, v in mine.items() if k != "model"}
    assert identity(other)["transformer_config_sha256"] == mine["transformer_config_sha256"]
    assert identity(other)["weights_sample_sha256"] != mine["weights_sample_sha256"]

    refused = f"{adapter / RECORD}: the adapter was trained on another base model"
    fails_with(capsys, ["merge", "--model", other, "--adapter", adapter, "--out", tmp_path / "merged"], refused,
               "transformer weights differ")
    fails_with(capsys, ["generate", "--model", other, "--adapter", adapter, "--prompt", "a cat", "--out",
                        tmp_path / "cat.mp4", "--frames", "5", "--height", "32", "--width", "32", "--steps", "1",
                        "--dtype", "fp32", "--device", "cpu"], refused)
    prompts, rewards = tmp_path / "prompts.txt", tmp_path / "rewards.yaml"
    prompts.write_text("a cat\n")
    rewards.write_text("scorers:\n  brightness:\n    weight: 1.0\n")
    fails_with(capsys, ["eval", "--model", other, "--adapters", adapter, "--prompts", prompts, "--rewards", rewards,
                        "--out", tmp_path / "eval", "--frames", "5", "--height", "32", "--width", "32", "--steps", "1",
                        "--seeds", "1", "--dtype", "fp32", "--device", "cpu"], refused)
    fails_with(capsys, train_args(tiny_pairs, tmp_path / "round1", "--model", other, "--init-adapter", adapter),
               refused)
    fails_with(capsys, train_args(tiny_pairs, run, "--model", other, "--max-steps", "2", "--resume-from", "latest"),
               f"{run / 'checkpoints' / 'step-0000001' / 'adapter' / RECORD}: the adapter was trained on another")
    assert not any((tmp_path / name).exists() for name in ("merged", "cat.mp4", "eval", "round1"))

    # On its own base, under any path, it is accepted; an adapter without a record only draws a warning.
    code, _, err = call_cli(capsys, "merge", "--model", moved, "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    legacy = random_adapter(tiny_model_dir, tmp_path / "legacy", std=0.1)
    caplog.clear()
    code, _, err = call_cli(capsys, "merge", "--model", other, "--adapter", legacy, "--out", tmp_path / "merged2")
    assert code == 0, err
    assert f"{legacy}: the adapter has no {RECORD}" in caplog.text


def test_max_seconds_stops_at_a_step_checkpoints_it_and_writes_the_adapter(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "1000", "--save-every", "0",
                                                "--max-seconds", "1e-9"))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    # Every step ends past a 1 ns budget: the first one is the last, and it is checkpointed.
    assert summary["steps_done"] == 1 and summary["stopped_by_max_seconds"] is True
    assert checkpoint_names(out) == ["step-0000001"] and (out / "adapter").is_dir()
    assert [row["step"] for row in metrics(out)] == [0]
    # The run continues from there when resumed (a resumed run counts its budget afresh).
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "3", "--save-every", "0",
                                                "--resume-from", "latest"))
    assert code == 0, err
    assert [row["step"] for row in metrics(out)] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["stopped_by_max_seconds"] is False


def test_max_seconds_counts_from_the_command_start(tiny_pairs, tmp_path, capsys, monkeypatch):
    """The budget pays for what the command does before its first step (loading, calibration): a command that
    started 100 s ago has spent a 50 s budget by its first step, which is then its last."""
    import time

    from rlhf import clock

    monkeypatch.setattr(clock, "mark_command_start", lambda: setattr(clock, "_started", time.perf_counter() - 100))
    out = tmp_path / "run"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "5", "--save-every", "0",
                                                "--max-seconds", "50"))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 1 and summary["stopped_by_max_seconds"] is True


def test_max_seconds_must_be_a_positive_finite_number(tiny_pairs, tmp_path, capsys):
    for value in ("0", "-5", "nan", "inf"):
        code, _, err = call_cli(capsys, *train_args(tiny_pairs, tmp_path / value, "--max-seconds", value))
        assert code == 2 and "max_seconds" in err and len(err.strip().splitlines()) == 1, (value, err)
