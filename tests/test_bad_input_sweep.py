"""Every bad number and wrong-kind output path of issue 12, through the real `contentv-rlhf` entry point.

Each case must exit 2 with exactly one stderr line naming the field or path, print no traceback, and leave
the files under the test's folder exactly as they were: bad input is found before any model is loaded or
any output is written, so the whole sweep takes seconds.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from rlhf.io import output_path_problem
from tests.conftest import call_cli, run_cli

# (command line with {placeholders}, text the one error line must contain)
BAD_NUMBERS = [
    ("generate --model {model} --prompt x --out {new}.mp4 --guidance nan", "field 'guidance'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --guidance=-inf", "field 'guidance'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --guidance 1e9", "field 'guidance' must be <= 100"),
    ("generate --model {model} --prompt x --out {new}.mp4 --frames 99999999999999999999", "field 'frames'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --frames 1000000", "field 'frames' must be <= 10001"),
    ("generate --model {model} --prompt x --out {new}.mp4 --width 99999999999999999999", "field 'width'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --height 1048576", "field 'height' must be <= 8192"),
    ("generate --model {model} --prompt x --out {new}.mp4 --steps 99999999999999999999", "field 'steps'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --fps nan", "field 'fps'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --fps 1e300", "field 'fps' must be <= 1000"),
    ("generate --model {model} --prompt x --out {new}.mp4 --adapter-scale inf", "field 'adapter_scale'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --adapter-scale 1e30", "field 'adapter_scale' must be <="),
    ("generate --model {model} --prompt x --out {new}.mp4 --seed 99999999999999999999", "field 'seed'"),
    ("generate --model {model} --prompt x --out {new}.mp4 --max-sequence-length 99999999", "max_sequence_length"),
    ("rollout --config {config} --model {model} --prompts {prompts} --out {new}", "field 'guidance'",
     "guidance: .nan"),
    ("rollout --config {config} --model {model} --prompts {prompts} --out {new}", "field 'fps'", "fps: .inf"),
    ("rollout --model {model} --prompts {prompts} --out {new} --frames 99999999999999999999", "field 'frames'"),
    ("rollout --model {model} --prompts {prompts} --out {new} --samples-per-prompt 99999999999999999999",
     "field 'samples_per_prompt'"),
    ("rollout --model {model} --prompts {prompts} --out {new} --num-processes 100000", "field 'num_processes'"),
    ("train --pairs {pairs} --output-dir {new} --beta nan", "field 'beta'"),
    ("train --pairs {pairs} --output-dir {new} --lora-alpha nan", "field 'lora_alpha'"),
    ("train --config {config} --pairs {pairs} --output-dir {new}", "field 'lora_alpha'", "lora_alpha: .nan"),
    ("train --pairs {pairs} --output-dir {new} --learning-rate 1e300", "field 'learning_rate' must be <= 1"),
    ("train --pairs {pairs} --output-dir {new} --learning-rate 1e400", "field 'learning_rate'"),
    ("train --pairs {pairs} --output-dir {new} --adam-epsilon nan", "field 'adam_epsilon'"),
    ("train --pairs {pairs} --output-dir {new} --adam-beta2 1", "field 'adam_beta2' must be in [0, 1)"),
    ("train --pairs {pairs} --output-dir {new} --weight-decay=-0.1", "field 'weight_decay'"),
    ("train --pairs {pairs} --output-dir {new} --lora-rank 99999999999", "field 'lora_rank'"),
    ("train --pairs {pairs} --output-dir {new} --logit-std inf", "field 'logit_std'"),
    ("train --pairs {pairs} --output-dir {new} --batch-size 99999999999", "field 'batch_size' must be <= 4096"),
    ("train --method reward_gradient --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--batch-size 99999999999", "field 'batch_size' must be <= 4096"),
    ("train --method reward_gradient --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--reward-scale inf", "field 'reward_scale'"),
    ("train --method reward_gradient --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--guidance nan", "field 'guidance'"),
    ("train --method grpo --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--noise-level nan", "field 'noise_level'"),
    ("train --method grpo --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--clip-range inf", "field 'clip_range'"),
    ("train --method grpo --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--group-size 99999999999", "field 'group_size' must be <= 4096"),
    ("train --method nft --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--beta inf", "field 'beta'"),
    ("train --method nft --model {model} --prompts {prompts} --rewards {rewards} --output-dir {new} "
     "--old-decay-rate nan", "field 'old_decay_rate'"),
    ("eval --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} --out {new} "
     "--bootstrap-resamples 0", "field 'bootstrap_resamples' must be >= 1"),
    ("eval --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} --out {new} "
     "--tie-tolerance nan", "field 'tie_tolerance'"),
    ("eval --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} --out {new} "
     "--seeds 99999999999999999999", "field 'seeds'"),
    ("eval --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} --out {new} "
     "--seed-offset=-1", "field 'seed_offset'"),
    ("pairs --store {store} --out {new} --min-margin nan", "field 'min_margin'"),
    ("pairs --config {config} --store {store} --out {new}", "field 'weights.clip'", "weights: {clip: .nan}"),
    ("score --store {store} --config {rewards} --batch-size 99999999999", "field 'batch_size' must be <= 4096"),
    ("score --store {store} --config {config}", "brightness: weight", "scorers: {brightness: {weight: .nan}}"),
    ("online --model {model} --prompts {prompts} --rewards {rewards} --out {new} --rollout '{{guidance: .nan}}'",
     "field 'guidance'"),
    ("online --model {model} --prompts {prompts} --rewards {rewards} --out {new} --train '{{beta: nan}}'",
     "field 'beta'"),
    ("merge --model {model} --adapter {adapter} --weight nan --out {new}", "--weight"),
    ("merge --model {model} --adapter {adapter} --weight=-1e30 --out {new}", "--weight must be in -100..100"),
    ("tiny-model {new} --seed 99999999999999999999", "--seed"),
    ("quickstart --out {new} --seed=-1", "--seed"),
    ("quickstart --out {new} --train-steps 0", "--train-steps"),
    ("quickstart --out {new} --reward-gradient-steps 0", "--reward-gradient-steps"),
    ("quickstart --out {new} --device tpu", "--device"),
]
# An output path of the wrong kind: {file} is an existing file, {dir} (and {dir}.mp4) an existing folder.
WRONG_OUTPUT_PATHS = [
    ("rollout --model {model} --prompts {prompts} --out {file}", "field 'out' must be a directory"),
    ("rollout --model {model} --prompts {prompts} --out {file}/store", "field 'out' cannot be created"),
    ("train --pairs {pairs} --output-dir {file}", "field 'output_dir' must be a directory"),
    ("train --method reward_gradient --model {model} --prompts {prompts} --rewards {rewards} --output-dir {file}",
     "field 'output_dir' must be a directory"),
    ("train --method grpo --model {model} --prompts {prompts} --rewards {rewards} --output-dir {file}",
     "field 'output_dir' must be a directory"),
    ("eval --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} --out {file}",
     "field 'out' must be a directory"),
    ("generate --model {model} --prompt x --out {dir}.mp4", "field 'out' must be a file"),
    ("generate --model {model} --prompt x --out {file}/a.mp4", "field 'out' cannot be created"),
    ("report --run {dir} --out {dir}", "--out must be a file"),
    ("report --run {dir}.mp4", "--out must be a file"),  # the default DIR/report.html is a folder here
    ("pairs --store {store} --out {file}", "field 'out' must be a directory"),
    ("online --model {model} --prompts {prompts} --rewards {rewards} --out {file}", "field 'out' must be a directory"),
    ("merge --model {model} --adapter {adapter} --out {file}", "--out must be a directory"),
    ("tiny-model {file}", "OUT_DIR must be a directory"),
    ("quickstart --out {file}", "--out must be a directory"),
]
# Options a command lists but does not take.
NOT_OPTIONS = [
    ("eval --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} --out {new} "
     "--adapter {adapter}", "unknown flag --adapter (did you mean --adapters?)"),
    ("eval --config {config} --model {model} --adapters {adapter} --prompts {prompts} --rewards {rewards} "
     "--out {new}", "unknown field 'adapter_scale'", "adapter_scale: 0.5"),
]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` -> its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.fixture
def inputs(tiny_model_dir, tmp_path) -> dict[str, str]:
    """Well-formed inputs beside the bad one, so that the error can only come from the bad one."""
    work = tmp_path / "work"
    (work / "store").mkdir(parents=True)
    (work / "pairs").mkdir()
    (work / "adapter").mkdir()
    (work / "dir").mkdir()
    (work / "dir.mp4" / "report.html").mkdir(parents=True)
    (work / "file").write_text("keep me\n")
    (work / "prompts.txt").write_text("a cat\n")
    (work / "rewards.yaml").write_text("scorers: {brightness: {weight: 1.0}}\n")
    return {"model": str(tiny_model_dir), "new": str(work / "new"), "file": str(work / "file"),
            "dir": str(work / "dir"), "store": str(work / "store"), "pairs": str(work / "pairs"),
            "adapter": str(work / "adapter"), "prompts": str(work / "prompts.txt"),
            "rewards": str(work / "rewards.yaml")}


def command_line(template: str, inputs: dict[str, str], folder: Path, config: str | None = None) -> list[str]:
    """The argv of `template` (shell words): `{name}` from `inputs`; `{config}` a YAML file holding `config`."""
    if config is not None:
        path = folder / "config.yaml"
        path.write_text(config + "\n")
        inputs = {**inputs, "config": str(path)}
    return [word.format(**inputs) for word in shlex.split(template)]


CASES = [(*case, None)[:3] for case in BAD_NUMBERS + WRONG_OUTPUT_PATHS + NOT_OPTIONS]


@pytest.mark.parametrize(("template", "expected", "config"), CASES, ids=[" ".join(t.split()[:1] + t.split()[-2:])
                                                                          for t, _, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(inputs, tmp_path, capsys, template, expected, config):
    argv = command_line(template, inputs, tmp_path, config)
    before = tree(tmp_path / "work")
    code, stdout, stderr = call_cli(capsys, *argv)
    assert code == 2, (argv, stderr)
    assert expected in stderr, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stdout == ""
    assert tree(tmp_path / "work") == before  # nothing written: no output, no half-made folder


def test_bad_inputs_fail_the_same_way_in_a_fresh_process(inputs, tmp_path):
    """The real console entry point (a subprocess: its own logging, no test capture) for one case per class."""
    for template, expected, *_ in (BAD_NUMBERS[0], WRONG_OUTPUT_PATHS[0], NOT_OPTIONS[0]):
        before = tree(tmp_path / "work")
        result = run_cli(*command_line(template, inputs, tmp_path), timeout=120)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert tree(tmp_path / "work") == before


def test_output_path_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert output_path_problem(tmp_path / "new" / "deeper", "dir") is None
    assert output_path_problem(tmp_path / "dir", "dir") is None
    assert output_path_problem(tmp_path / "file", "file") is None  # an existing file is replaced atomically
    assert output_path_problem(tmp_path / "new" / "a.mp4", "file") is None
    assert output_path_problem(tmp_path / "file", "dir") == f"must be a directory, but {tmp_path / 'file'} is a file"
    assert output_path_problem(tmp_path / "dir", "file") == (
        f"must be a file, but {tmp_path / 'dir'} is a directory")
    for kind in ("file", "dir"):
        assert output_path_problem(tmp_path / "file" / "x" / "y", kind) == (
            f"cannot be created: {tmp_path / 'file'} is a file, not a directory")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "locked").mkdir(mode=0o500)
        assert "is not writable" in output_path_problem(tmp_path / "locked" / "out", "dir")
