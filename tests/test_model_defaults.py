"""Per-model sampling defaults (`MODEL_DIR/sampling_defaults.json`, rlhf/model_defaults.py): model file < config
YAML < flags for every command that samples; a folder without the file keeps ContentV-8B's defaults; a bad file
exits with status 2 and one line naming the file and the field; the shipped world file agrees with its configs."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rlhf.model_defaults import FILENAME, OPTION_FIELDS, read_model_defaults
from rlhf.options import DEFAULT_NEGATIVE_PROMPT
from tests.conftest import REPO, call_cli

# What the test model's file says; each test overrides some of it in a config and some with a flag.
FILE = {"frames": 5, "height": 48, "width": 48, "steps": 3, "guidance": 2.5, "negative_prompt": "file negative",
        "fps": 5.0, "shift": 3.0}
CONTENTV = {"frames": 125, "height": 432, "width": 768, "steps": 50, "guidance": 6.0,
            "negative_prompt": DEFAULT_NEGATIVE_PROMPT}


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model whose sampling_defaults.json is FILE."""
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (copy / FILENAME).write_text(json.dumps(FILE))
    return copy


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red ball\n")
    return path


def test_tiny_model_and_world_ship_a_file(tiny_model_dir):
    from rlhf.models.tiny import SCHEDULER_SHIFT

    path, values = read_model_defaults(tiny_model_dir)
    assert Path(path).name == FILENAME
    assert values == {"frames": 9, "height": 64, "width": 64, "steps": 8, "guidance": 4.0,
                      "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "fps": 8.0}
    assert json.loads(Path(path).read_text())["shift"] == SCHEDULER_SHIFT


def test_world_file_matches_the_world_configs():
    """The shipped world folder's file gives what configs/world/rollout.yaml samples with, and the scheduler's shift."""
    from rlhf.world import MODEL_DIR
    from rlhf.world.pretrain import SAMPLING_DEFAULTS, SCHEDULER_SHIFT

    _, values = read_model_defaults(MODEL_DIR)
    assert set(values) == set(OPTION_FIELDS)
    for name in ("rollout", "eval", "compare"):
        config = yaml.safe_load((REPO / "configs" / "world" / f"{name}.yaml").read_text())
        assert {k: values[k] for k in OPTION_FIELDS if k in config} == {k: config[k] for k in OPTION_FIELDS
                                                                         if k in config}, name
    raw = json.loads((MODEL_DIR / FILENAME).read_text())
    scheduler = json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert raw["shift"] == scheduler["shift"] == SCHEDULER_SHIFT
    assert values == SAMPLING_DEFAULTS  # what pretrain.write_components writes


def test_generate_world_model_samples_world_sizes_by_default():
    """The issue's command: with no sampling flag, generate on the world model takes 9 frames of 64x64, 20 steps."""
    from rlhf.cli import build_parser
    from rlhf.commands.generate import GenerateConfig
    from rlhf.config import config_from_args

    args = build_parser().parse_args(["generate", "--model", "rlhf/world/weights/model", "--prompt",
                                      "a small red circle moving left", "--out", "x.mp4"])
    config = config_from_args(GenerateConfig, args)
    assert (config.frames, config.height, config.width, config.steps, config.guidance, config.fps,
            config.negative_prompt) == (9, 64, 64, 20, 4.0, 8.0, "")


def test_generate_precedence_file_config_flag(model, tmp_path, capsys):
    """frames and fps from the model file, height from the config (over the file), width from the flag (over both)."""
    config = _config(tmp_path, {"height": 32, "width": 64, "steps": 1, "guidance": 1.0})
    out = tmp_path / "x.mp4"
    code, stdout, stderr = call_cli(capsys, "generate", "--config", config, "--model", model, "--prompt", "a cat",
                                    "--out", out, "--width", "16", "--device", "cpu", "--dtype", "fp32")
    assert code == 0, stderr
    assert f"wrote {out} (5 frames, 16x32, 5 fps, seed 0)" in stdout
    assert out.is_file()


def test_rollout_precedence_file_config_flag(model, tmp_path, capsys):
    """The store records the resolved settings: file < config < flag, field by field."""
    store = tmp_path / "store"
    config = _config(tmp_path, {"height": 32, "width": 64, "guidance": 1.0, "samples_per_prompt": 1,
                                "save_frames": 0, "save_frame_stride": 0})
    code, _, stderr = call_cli(capsys, "rollout", "--config", config, "--model", model, "--prompts",
                               _prompts(tmp_path), "--out", store, "--width", "16", "--steps", "1",
                               "--device", "cpu", "--dtype", "fp32")
    assert code == 0, stderr
    settings = json.loads((store / "store.json").read_text())["settings"]
    assert {k: settings[k] for k in ("frames", "height", "width", "steps", "guidance", "negative_prompt", "fps")} == {
        "frames": 5, "height": 32, "width": 16, "steps": 1, "guidance": 1.0, "negative_prompt": "file negative",
        "fps": 5.0}


def _world_config_without_sampling(name: str, tmp_path: Path) -> dict:
    """configs/world/<name>.yaml with its sampling fields removed, its paths absolute and its outputs in tmp_path.
    Reward-gradient's `grad_steps` (1..steps) goes with `steps`: the world's backprops through all 10 of its steps."""
    data = yaml.safe_load((REPO / "configs" / "world" / f"{name}.yaml").read_text())
    data = {k: v for k, v in data.items() if k not in (*OPTION_FIELDS, "grad_steps")}
    for key, value in data.items():
        if isinstance(value, str) and value.startswith("configs/"):
            data[key] = str(REPO / value)
    for key in ("out", "output_dir"):
        if key in data:
            data[key] = str(tmp_path / key)
    return data


@pytest.mark.parametrize("command, world_config", [
    ("rollout", "rollout"), ("eval", "eval"), ("compare", "compare"), ("train", "grpo"),
    ("train", "reward_gradient"),
])
def test_every_sampling_command_resolves_file_config_flag(command, world_config, model, tmp_path):
    """The config each command builds from its real parser: file < config < flag."""
    from rlhf.cli import build_parser
    from rlhf.config import config_from_args

    data = {**_world_config_without_sampling(world_config, tmp_path), "height": 32, "width": 64}
    if command in ("eval", "compare"):
        (tmp_path / "adapter").mkdir()
        data["adapters"] = [str(tmp_path / "adapter")]
    args = build_parser().parse_args([command, "--config", str(_config(tmp_path, data)), "--model", str(model),
                                      "--width", "16"])
    if command == "train":
        from rlhf.commands.train import read_method

        cls = read_method(args)[1]
    else:
        cls = {"rollout": "rollouts.config:RolloutConfig", "eval": "rlhf.evaluation:EvalConfig",
               "compare": "rlhf.commands.compare:CompareConfig"}[command]
        module, _, name = cls.partition(":")
        cls = getattr(__import__(module, fromlist=[name]), name)
    config = config_from_args(cls, args)
    assert (config.frames, config.height, config.width, config.steps, config.guidance, config.negative_prompt) == (
        5, 32, 16, 3, 2.5, "file negative")
    if hasattr(config, "fps"):
        assert config.fps == 5.0


def test_online_rounds_sample_with_the_model_file(model, tmp_path):
    """online's rollout section (config) and `--rollout` flag override the model file; the rest comes from it."""
    from dpo.online import _validate_sections
    from rlhf.cli import build_parser
    from rlhf.config import config_from_args, config_from_dict
    from rollouts.config import RolloutConfig

    config = _config(tmp_path, {"prompts": str(_prompts(tmp_path)), "rewards": str(REPO / "configs/world/rewards.yaml"),
                                "out": str(tmp_path / "online"), "rollout": {"height": 32, "width": 64}})
    args = build_parser().parse_args(["online", "--config", str(config), "--model", str(model),
                                      "--rollout", "{width: 16}"])
    from dpo.online import OnlineConfig

    online = config_from_args(OnlineConfig, args)
    _validate_sections(online)
    rollout = config_from_dict(RolloutConfig, {**online.rollout, "model": online.model, "prompts": online.prompts,
                                               "out": str(tmp_path / "r")})
    assert (rollout.frames, rollout.height, rollout.width, rollout.steps, rollout.fps) == (5, 32, 16, 3, 5.0)


def test_folder_without_the_file_keeps_contentv_defaults(model, tmp_path):
    from rlhf.cli import build_parser
    from rlhf.commands.generate import GenerateConfig
    from rlhf.config import config_from_args

    (model / FILENAME).unlink()
    assert read_model_defaults(model) is None
    args = build_parser().parse_args(["generate", "--model", str(model), "--prompt", "a cat", "--out",
                                      str(tmp_path / "x.mp4")])
    config = config_from_args(GenerateConfig, args)
    assert {k: getattr(config, k) for k in CONTENTV} == CONTENTV and config.fps == 24.0


@pytest.mark.parametrize("text, named", [
    ("{\"frames\": 5,", "not a readable JSON file"),
    ('{"framez": 5}', "'framez'"),
    ('{"height": "tall"}', "'height'"),
    ('{"guidance": NaN}', "'guidance'"),
    ('{"steps": Infinity}', "'steps'"),
    ('{"height": 50}', "'height'"),
    ('{"frames": 10}', "'frames'"),
    ('{"fps": 0}', "'fps'"),
    ('{"shift": 2.0}', "'shift'"),
    ('[9, 64]', "expected a mapping"),
])
def test_bad_file_exits_2_with_one_line(model, tmp_path, capsys, text, named):
    (model / FILENAME).write_text(text)
    out = tmp_path / "x.mp4"
    code, stdout, stderr = call_cli(capsys, "generate", "--model", model, "--prompt", "a cat", "--out", out,
                                    "--frames", "5")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(model / FILENAME) in lines[0] and named in lines[0], lines[0]
    assert not out.exists()
