"""The strict config system: defaults <- YAML <- flags, with errors that name source, field and expectation."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from rlhf.config import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    help_problems,
    load_yaml,
    option,
    save_config,
)
from rlhf.errors import UserError


@dataclass
class TrainSection:
    """Optimiser settings."""

    lr: float = option(1e-4, "Learning rate.")
    betas: tuple[float, ...] = option((0.9, 0.999), "Adam betas.")
    grad_clip: float | None = option(1.0, "Clip gradients to this norm; none disables clipping.")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")


@dataclass
class ExampleConfig:
    """A config with one field of every supported kind."""

    steps: int = option(10, "Optimiser steps.")
    num_frames: int = option(16, "Frames per video.", flag="frames")
    beta: float = option(0.1, "DPO temperature.")
    mode: Literal["dpo", "sft"] = option("dpo", "Training objective.")
    precision: str = option("bf16", "Compute dtype.", choices=("bf16", "fp16", "fp32"))
    seed: int | None = option(None, "Random seed; none picks one.")
    output: Path = option(Path("runs/example"), "Output folder.")
    prompts: list[str] = option(["a cat"], "Prompts to sample.")
    sizes: list[int] = option([256, 256], "Height and width.")
    weights: dict[str, float] = option({"clip": 1.0}, "Reward weights by scorer name.")
    use_ema: bool = option(False, "Keep an EMA copy of the weights.")
    train: TrainSection = option(TrainSection(), "Optimiser settings.")

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")
        if self.use_ema and self.mode == "sft":
            raise ConfigError("use_ema", "cannot be combined with mode 'sft'")


@dataclass
class Undocumented:
    inner: TrainSection = option(TrainSection(), "")
    ok: int = option(1, "Fine.")
    blank: int = option(2, "   ")
    bare: int = dataclasses.field(default=3)


@dataclass
class Required:
    name: str = option(dataclasses.MISSING, "Run name.")


def make_parser(cls=ExampleConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_config_arguments(parser, cls)
    return parser


def parse(argv: list[str], cls=ExampleConfig):
    return config_from_args(cls, make_parser(cls).parse_args(argv))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def error(argv: list[str], cls=ExampleConfig) -> str:
    with pytest.raises(UserError) as info:
        parse(argv, cls)
    return str(info.value)


# --- layering ---------------------------------------------------------------------------------------


def test_defaults():
    assert parse([]) == ExampleConfig()
    a, b = ExampleConfig(), ExampleConfig()
    assert a.prompts == ["a cat"] and a.prompts is not b.prompts and a.train is not b.train


def test_yaml_overrides_defaults(tmp_path):
    path = write(tmp_path, "steps: 5\nbeta: 1e-4\nprompts: [a dog, a fish]\nuse_ema: yes\n")
    cfg = parse(["--config", str(path)])
    assert (cfg.steps, cfg.beta, cfg.prompts, cfg.use_ema) == (5, 1e-4, ["a dog", "a fish"], True)
    assert cfg.num_frames == 16


def test_flags_override_yaml(tmp_path):
    path = write(tmp_path, "steps: 5\nnum_frames: 8\nuse_ema: true\nbeta: 0.5\n")
    cfg = parse(["--config", str(path), "--steps", "7", "--frames", "24", "--no-use-ema"])
    assert (cfg.steps, cfg.num_frames, cfg.use_ema, cfg.beta) == (7, 24, False, 0.5)
    assert parse(["--num_frames", "4"]).num_frames == parse(["--num-frames", "4"]).num_frames == 4


def test_empty_yaml_means_defaults(tmp_path):
    assert parse(["--config", str(write(tmp_path, "# nothing\n"))]) == ExampleConfig()


# --- unknown keys -----------------------------------------------------------------------------------


def test_unknown_yaml_key_suggests_nearest_and_names_file(tmp_path):
    path = write(tmp_path, "stpes: 3\n")
    assert error(["--config", str(path)]) == (
        f"{path}: unknown field 'stpes' for ExampleConfig; did you mean 'steps'?")


def test_unknown_key_without_near_match_lists_fields():
    with pytest.raises(UserError, match=r"^cfg.yaml: unknown field 'zzz' for ExampleConfig; "
                                        r"valid fields: steps, num_frames, beta, .*train$"):
        config_from_dict(ExampleConfig, {"zzz": 1}, source="cfg.yaml")


def test_unknown_nested_key_uses_dotted_path(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    assert error(["--config", str(path)]) == (
        f"{path}: unknown field 'train.lrr' for TrainSection; did you mean 'train.lr'?")


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["--stpes", "3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --stpes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["--step", "3"])  # no silent prefix matching of --steps
    assert info.value.code == 2


# --- types --------------------------------------------------------------------------------------------


def test_wrong_type_from_yaml(tmp_path):
    path = write(tmp_path, "steps: ten\n")
    assert error(["--config", str(path)]) == f"{path}: field 'steps' expects an integer, got 'ten'"


def test_wrong_type_from_command_line_names_command_line(tmp_path):
    path = write(tmp_path, "steps: 5\n")
    assert error(["--config", str(path), "--beta", "abc"]) == (
        "command line: field 'beta' expects a number, got 'abc'")
    assert error(["--steps", "2.5"]) == "command line: field 'steps' expects an integer, got '2.5'"


@pytest.mark.parametrize("value", [2.5, True, [1], None])
def test_int_field_rejects_non_integers(value):
    with pytest.raises(UserError, match="field 'steps' expects an integer"):
        config_from_dict(ExampleConfig, {"steps": value})


def test_numbers_from_strings_and_ints():
    cfg = config_from_dict(ExampleConfig, {"steps": "3", "beta": 1, "output": "out/run"})
    assert (cfg.steps, cfg.beta, cfg.output) == (3, 1.0, Path("out/run"))
    assert isinstance(cfg.beta, float)


def test_literal_choice_error():
    assert error(["--mode", "ppo"]) == "command line: field 'mode' expects one of 'dpo', 'sft', got 'ppo'"
    assert parse(["--mode", "sft"]).mode == "sft"


def test_option_choices_enforced(tmp_path):
    path = write(tmp_path, "precision: int8\n")
    assert error(["--config", str(path)]) == (
        f"{path}: field 'precision' expects one of 'bf16', 'fp16', 'fp32', got 'int8'")


def test_device_fields_take_indexed_accelerators(tmp_path):
    from dpo.config import DPOConfig
    from rlhf.options import ModelOptions

    assert config_from_dict(ModelOptions, {"model": "m", "device": "cuda:1"}).device == "cuda:1"
    assert config_from_dict(DPOConfig, {"pairs": "p", "output_dir": "o", "device": "npu:0"}).device == "npu:0"
    for bad in ("gpu", "cuda:x", "auto:1"):
        with pytest.raises(UserError) as info:
            config_from_dict(ModelOptions, {"model": "m", "device": bad}, source="generate.yaml")
        assert str(info.value) == ("generate.yaml: field 'device' expects one of auto, cuda, npu, cpu or an "
                                   f"indexed device such as cuda:1, got {bad!r}")


def test_optional_none(tmp_path):
    assert parse(["--seed", "none"]).seed is None
    assert parse(["--seed", "NULL"]).seed is None
    assert parse(["--seed", "7"]).seed == 7
    assert parse(["--config", str(write(tmp_path, "seed: null\n"))]).seed is None
    assert parse(["--train.grad_clip", "none"]).train.grad_clip is None
    assert error(["--seed", "soon"]) == "command line: field 'seed' expects an integer or none, got 'soon'"


def test_list_parsing():
    assert parse(["--prompts", "a dog, a fish"]).prompts == ["a dog", "a fish"]
    assert parse(["--prompts", '["a dog, running", a fish]']).prompts == ["a dog, running", "a fish"]
    assert parse(["--sizes", "[128, 64]"]).sizes == [128, 64]
    assert parse(["--sizes", "128,64"]).sizes == [128, 64]
    assert parse(["--prompts", ""]).prompts == []
    assert parse(["--train.betas", "0.5,0.9"]).train.betas == (0.5, 0.9)
    assert error(["--sizes", "128,x"]) == "command line: field 'sizes[1]' expects an integer, got 'x'"


def test_dict_parsing(tmp_path):
    assert parse(["--weights", "{clip: 2, aesthetic: 0.5}"]).weights == {"clip": 2.0, "aesthetic": 0.5}
    path = write(tmp_path, "weights:\n  clip: high\n")
    assert error(["--config", str(path)]) == f"{path}: field 'weights.clip' expects a number, got 'high'"


def test_mapping_flag_merges_into_the_yaml_mapping_key_by_key(tmp_path):
    path = write(tmp_path, "weights: {clip: 1, aesthetic: 0.5}\n")
    assert parse(["--config", str(path), "--weights", "{clip: 3, motion: 2}"]).weights == {
        "clip": 3.0, "aesthetic": 0.5, "motion": 2.0}
    assert parse(["--config", str(path), "--weights", "{}"]).weights == {"clip": 1.0, "aesthetic": 0.5}
    assert error(["--config", str(path), "--weights", "{clip: fast}"]) == (
        "command line: field 'weights.clip' expects a number, got 'fast'")
    path = write(tmp_path, "weights: {clip: 1, aesthetic: high}\n")  # the bad value is the file's
    assert error(["--config", str(path), "--weights", "{clip: 3}"]) == (
        f"{path}: field 'weights.aesthetic' expects a number, got 'high'")


@dataclass
class Nested:
    """A free-form mapping field, as `online` passes whole stage sections."""

    stage: dict[str, Any] = option({}, "Flags of a stage.")
    limit: int | None = option(None, "A bound; none for no bound.")


def test_nested_mapping_flags_merge_recursively(tmp_path):
    path = write(tmp_path, "stage:\n  samples: 8\n  lr: 5.0e-5\n  rewards: {clip: {weight: 1, frames: 8}}\n")
    cfg = parse(["--config", str(path), "--stage", "{samples: 4, rewards: {clip: {weight: 2}}}"], Nested)
    assert cfg.stage == {"samples": 4, "lr": 5e-5, "rewards": {"clip": {"weight": 2, "frames": 8}}}


def test_online_stage_flags_merge_into_the_yaml_stage_sections(tmp_path):
    from dpo.online import OnlineConfig
    from rlhf.cli import build_parser

    path = write(tmp_path, "model: m\nprompts: p.txt\nrewards: r.yaml\nout: runs/online\n"
                 "rollout: {samples_per_prompt: 8, frames: 17}\ntrain: {learning_rate: 5.0e-5, max_steps: 40}\n")
    args = build_parser().parse_args(["online", "--config", str(path), "--rollout", "{frames: 9}",
                                      "--train", "{max_steps: 10}"])
    cfg = config_from_args(OnlineConfig, args)
    assert cfg.rollout == {"samples_per_prompt": 8, "frames": 9}
    assert cfg.train == {"learning_rate": 5e-5, "max_steps": 10}


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e400", "-1e999"])
def test_every_float_field_rejects_non_finite_values(tmp_path, text):
    assert error([f"--beta={text}"]) == f"command line: field 'beta' expects a finite number, got {text!r}"
    assert error([f"--train.lr={text}"]) == f"command line: field 'train.lr' expects a finite number, got {text!r}"
    assert error([f"--train.grad-clip={text}"]) == (
        f"command line: field 'train.grad_clip' expects a finite number, got {text!r}")
    assert error([f"--weights={{clip: {text}}}"]).startswith(
        "command line: field 'weights.clip' expects a finite number, got ")
    assert error([f"--train.betas=0.9,{text}"]) == (
        f"command line: field 'train.betas[1]' expects a finite number, got {text!r}")


@pytest.mark.parametrize("text", [".nan", ".inf", "-.Inf", "1e400"])
def test_non_finite_yaml_values_are_rejected_like_flags(tmp_path, text):
    path = write(tmp_path, f"beta: {text}\n")
    assert error(["--config", str(path)]).startswith(f"{path}: field 'beta' expects a finite number, got ")
    path = write(tmp_path, f"train: {{lr: {text}}}\n")
    assert error(["--config", str(path)]).startswith(f"{path}: field 'train.lr' expects a finite number, got ")
    with pytest.raises(UserError, match="field 'beta' expects a finite number"):
        config_from_dict(ExampleConfig, {"beta": float(text.replace(".", "").replace("In", "in"))})


def test_int_fields_hold_what_torch_int64_holds():
    assert parse(["--steps", str(2**63 - 1)]).steps == 2**63 - 1
    for text in (str(2**63), "99999999999999999999", str(-(2**63) - 1)):
        assert error([f"--seed={text}"]) == (
            f"command line: field 'seed' expects an integer in [-2**63, 2**63 - 1] (torch's int64), got {text!r}")
    assert error(["--sizes", f"1,{2**64}"]).startswith("command line: field 'sizes[1]' expects an integer in")
    assert error(["--limit", "1" + "0" * 30], Nested).startswith("command line: field 'limit' expects an integer in")
    assert parse(["--limit", "none"], Nested).limit is None


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("Yes", True), ("1", True), ("on", True),
                                                ("false", False), ("no", False), ("0", False)])
def test_bool_strings(text, expected):
    assert config_from_dict(ExampleConfig, {"use_ema": text}).use_ema is expected


@pytest.mark.parametrize("value", [3, "maybe", 0.5, None])
def test_bool_rejects_other_values(value):
    with pytest.raises(UserError, match=r"field 'use_ema' expects true or false, got "):
        config_from_dict(ExampleConfig, {"use_ema": value})


def test_bool_flags():
    assert parse(["--use-ema"]).use_ema is True
    assert parse(["--use_ema"]).use_ema is True
    assert parse(["--use-ema", "--no-use-ema"]).use_ema is False


# --- nested sections --------------------------------------------------------------------------------


def test_nested_section_via_yaml(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.5\n  betas: [0.8, 0.9]\n")
    cfg = parse(["--config", str(path)])
    assert cfg.train == TrainSection(lr=0.5, betas=(0.8, 0.9))


def test_nested_section_via_flags_merges_with_yaml(tmp_path):
    path = write(tmp_path, "train:\n  betas: [0.8, 0.9]\n")
    cfg = parse(["--config", str(path), "--train.lr", "0.01"])
    assert cfg.train == TrainSection(lr=0.01, betas=(0.8, 0.9))
    assert parse(["--train.lr", "2"]).train.lr == 2.0


def test_nested_errors_name_dotted_path(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n")
    assert error(["--config", str(path)]) == f"{path}: field 'train.lr' expects a number, got 'fast'"
    path = write(tmp_path, "train: 3\n")
    assert error(["--config", str(path)]) == (
        f"{path}: field 'train' expects a mapping of TrainSection fields, got 3")


# --- __post_init__ validation -----------------------------------------------------------------------


def test_config_error_becomes_user_error_naming_field(tmp_path):
    assert error(["--steps", "0"]) == "command line: field 'steps' must be >= 1, got 0"
    path = write(tmp_path, "steps: -1\n")
    assert error(["--config", str(path)]) == f"{path}: field 'steps' must be >= 1, got -1"
    assert error(["--train.lr", "0"]) == "command line: field 'train.lr' must be > 0, got 0.0"
    assert error(["--mode", "sft", "--use-ema"]) == (
        "command line: field 'use_ema' cannot be combined with mode 'sft'")


def test_required_field():
    with pytest.raises(UserError, match=r"^command line: field 'name' is required \(a string\)$"):
        parse([], Required)
    assert parse(["--name", "x"], Required).name == "x"


# --- YAML files ----------------------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert error(["--config", str(path)]) == f"{path}: config file not found"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "steps: 3\nprompts: [a, b\nbeta: 0.1\n")
    with pytest.raises(UserError, match=rf"^{path}: invalid YAML at line \d+, column \d+: "):
        load_yaml(path)


def test_top_level_list_rejected(tmp_path):
    path = write(tmp_path, "- steps: 3\n")
    with pytest.raises(UserError, match=rf"^{path}: expected a mapping of field names at the top level, got list"):
        load_yaml(path)


def test_duplicate_yaml_key_rejected(tmp_path):
    path = write(tmp_path, "steps: 3\nbeta: 0.1\nsteps: 4\n")
    with pytest.raises(UserError, match=rf"^{path}: invalid YAML at line 3, column 1: duplicate key 'steps'"):
        load_yaml(path)


def test_round_trip_through_yaml(tmp_path):
    cfg = parse(["--steps", "3", "--seed", "1", "--output", "x/y", "--prompts", "p,q", "--use-ema",
                 "--weights", "{clip: 0.5}", "--train.lr", "1e-6", "--train.grad_clip", "none"])
    plain = config_to_dict(cfg)
    assert plain["output"] == "x/y" and plain["train"]["betas"] == [0.9, 0.999]
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]  # no temporary file left
    assert config_from_dict(ExampleConfig, load_yaml(path), source=str(path)) == cfg
    assert parse(["--config", str(path)]) == cfg


# --- help ------------------------------------------------------------------------------------------------


def test_help_problems():
    assert help_problems(ExampleConfig) == []
    assert help_problems(Undocumented) == ["inner", "blank", "bare"]


def test_help_text_shows_flags_defaults_and_choices():
    text = make_parser().format_help()
    for piece in ["--config FILE", "command-line flags override it", "--num-frames INT, --num_frames INT",
                  "--frames INT", "--use-ema, --no-use-ema", "--train.lr FLOAT", "--seed INT", "default: 16",
                  "choices: dpo, sft", "choices: bf16, fp16, fp32", "default: false", "default: none",
                  "train (TrainSection)"]:
        assert piece in " ".join(text.split()), piece


def test_module_imports_no_heavy_libraries():
    code = "import sys, rlhf.config; heavy = {'torch', 'numpy', 'diffusers'} & set(sys.modules); print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"
