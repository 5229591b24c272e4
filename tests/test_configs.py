"""Every shipped YAML config loads strictly into its command's dataclass, every field is documented, and every
config runs as written on the tiny model (sizes and locations aside)."""

import json
from pathlib import Path

import pytest
import yaml

from dpo.config import DPOConfig
from dpo.grpo_config import GRPOConfig
from dpo.nft_config import NFTConfig
from dpo.online import OnlineConfig
from dpo.reward_gradient_config import RewardGradientConfig
from dpo.sft_config import SFTConfig
from rewards.config import RewardsConfig
from rlhf.commands.compare import CompareConfig
from rlhf.commands.generate import GenerateConfig
from rlhf.commands.pairs import PairsStageConfig
from rlhf.config import config_from_dict, help_problems, load_yaml
from rlhf.evaluation import EvalConfig
from rollouts.config import RolloutConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Config file -> the dataclass it must load into, plus fields a user must add on the command line.
SHIPPED = {
    "generate.yaml": (GenerateConfig, {"prompt": "a test prompt"}),
    "rollout.yaml": (RolloutConfig, {}),
    "dpo.yaml": (DPOConfig, {}),
    "rewards.yaml": (RewardsConfig, {}),
    "rewards_heldout.yaml": (RewardsConfig, {}),
    "rewards_weight_free.yaml": (RewardsConfig, {}),
    "rewards_video.yaml": (RewardsConfig, {}),
    "pairs.yaml": (PairsStageConfig, {"store": "s", "out": "o"}),
    "eval.yaml": (EvalConfig, {"adapters": ["a"]}),
    "online_dpo.yaml": (OnlineConfig, {}),
    "reward_gradient.yaml": (RewardGradientConfig, {}),
    "grpo.yaml": (GRPOConfig, {}),
    "nft.yaml": (NFTConfig, {}),
}


def test_every_config_file_is_listed():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads(name):
    cls, extra = SHIPPED[name]
    config = config_from_dict(cls, {**load_yaml(CONFIGS / name), **extra}, source=name)
    assert isinstance(config, cls)
    if cls is OnlineConfig:  # its stage sections are checked by the stages' own configs
        from dpo.online import _validate_sections

        _validate_sections(config)


@pytest.mark.parametrize(
    "cls", [GenerateConfig, RolloutConfig, DPOConfig, RewardsConfig, PairsStageConfig, EvalConfig, OnlineConfig,
            RewardGradientConfig, GRPOConfig, CompareConfig, SFTConfig, NFTConfig]
)
def test_every_field_has_help(cls):
    assert help_problems(cls) == []


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader
    assert config.num_processes >= 1 and config.mixed_precision == "bf16"


# ---- every shipped config runs as written ------------------------------------------------------------------
#
# On the tiny model, a test may change only where the model and the outputs are and how big the run is; the
# prompt files, rewards configs and every other setting are the shipped ones. A rewards config that needs
# downloaded weights is swapped for the shipped weight-free one, after checking its paths are documented
# placeholders.

REPO = CONFIGS.parent
CONFIGS_README = CONFIGS / "README.md"
WEIGHT_FREE_REWARDS = "configs/rewards_weight_free.yaml"
PLACEHOLDER_ROOT = "/models/"
LOCATION_KEYS = {"model", "out", "output_dir", "pairs", "store", "adapters", "prompt"}
SIZE_KEYS = {"frames", "height", "width", "steps", "seeds", "samples_per_prompt", "batch_size", "save_frames",
             "num_decode_frames", "max_steps", "gradient_accumulation_steps", "rounds", "rollout", "train",
             "group_size", "prompts_per_round"}
# Fields naming an input file that ships with the project (relative to the repository root).
SHIPPED_FILE_KEYS = ("prompts", "rewards", "held_out_rewards")
TINY_VIDEO = {"frames": 5, "height": 32, "width": 32, "steps": 2}


def placeholders(value) -> list[str]:
    """Every `/models/...` string inside a config value (mappings and lists searched)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in placeholders(v)]
    if isinstance(value, list):
        return [p for v in value for p in placeholders(v)]
    return [value] if isinstance(value, str) and value.startswith(PLACEHOLDER_ROOT) else []


def needs_weights(rewards_file: str) -> bool:
    return bool(placeholders(load_yaml(REPO / rewards_file)))


def as_run(name: str, tmp_path: Path, **overrides) -> Path:
    """The shipped config `name` with only location and size `overrides`, written to `tmp_path`.

    A `rewards` file that needs weights becomes the weight-free one; every other shipped input it names
    must exist as written.
    """
    data = load_yaml(CONFIGS / name)
    assert set(overrides) <= LOCATION_KEYS | SIZE_KEYS, set(overrides) - LOCATION_KEYS - SIZE_KEYS
    for key in ("rollout", "train"):  # online's stage sections: sizes only, merged into the shipped ones
        if key in overrides and key in data:
            assert set(overrides[key]) <= SIZE_KEYS | {"lora_rank", "lora_alpha"}, overrides[key]
            overrides[key] = {**data[key], **overrides[key]}
    data = {**data, **overrides}
    for key in SHIPPED_FILE_KEYS:
        if key in data and key not in overrides:
            assert (REPO / data[key]).is_file(), f"{name}: {key} {data[key]} is not shipped"
    if "rewards" in data and needs_weights(data["rewards"]):
        data["rewards"] = WEIGHT_FREE_REWARDS
    assert not placeholders(data), f"{name}: placeholders left after the overrides: {placeholders(data)}"
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def run(*argv) -> None:
    """`contentv-rlhf ARGV` from the repository root, where the configs' relative paths point."""
    from rlhf.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        assert main([str(a) for a in argv]) == 0, argv


def test_shipped_inputs_exist_and_placeholders_are_documented():
    readme = CONFIGS_README.read_text()
    found = set()
    for name in SHIPPED:
        data = load_yaml(CONFIGS / name)
        for key in SHIPPED_FILE_KEYS:
            if data.get(key):
                assert (REPO / data[key]).is_file(), f"{name}: {key}: {data[key]} does not exist"
        comments = "\n".join(line for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#"))
        for path in placeholders(data):
            found.add(path)
            assert f"`{path}`" in readme, f"{name}: placeholder {path} is not listed in configs/README.md"
            assert "configs/README.md" in comments, f"{name}: its comments do not point to configs/README.md"
    assert found  # the model and reward weights are placeholders: the check above did run
    for prompts in (CONFIGS / "prompts").glob("*.txt"):
        lines = [line for line in prompts.read_text().splitlines() if line.strip()]
        assert 8 <= len(lines) == len(set(lines)), prompts
    assert not needs_weights(WEIGHT_FREE_REWARDS)


def test_eval_config_vbench_example_loads_when_uncommented():
    """configs/eval.yaml's commented `vbench:` keys, uncommented, are a valid eval config with documented paths."""
    text = (CONFIGS / "eval.yaml").read_text()
    example = "\n".join(line.removeprefix("# ") for line in text.splitlines() if line.startswith("# vbench"))
    settings = yaml.safe_load(example)
    assert set(settings) == {"vbench", "vbench_dino", "vbench_clip", "vbench_clip_large", "vbench_aesthetic_head",
                             "vbench_raft"}
    config = config_from_dict(EvalConfig, {**load_yaml(CONFIGS / "eval.yaml"), **settings, "adapters": ["a"]},
                              source="eval.yaml")
    assert len(config.vbench) == 5
    readme = CONFIGS_README.read_text()
    for path in placeholders(settings):
        assert f"`{path}`" in readme, f"eval.yaml: placeholder {path} is not listed in configs/README.md"


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    """rollout -> score -> pairs -> train (dpo.yaml) -> eval, each from its shipped config."""
    tmp = tmp_path_factory.mktemp("shipped")
    paths = {stage: tmp / stage for stage in ("rollout", "pairs", "dpo", "eval")}
    run("rollout", "--config", as_run("rollout.yaml", tmp, model=str(tiny_model_dir), out=str(paths["rollout"]),
                                      samples_per_prompt=2, batch_size=2, save_frames=5, **TINY_VIDEO))
    run("score", "--store", paths["rollout"], "--config", CONFIGS / "rewards_weight_free.yaml")
    run("pairs", "--store", paths["rollout"], "--out", paths["pairs"], "--config", CONFIGS / "pairs.yaml")
    run("train", "--config", as_run("dpo.yaml", tmp, pairs=str(paths["pairs"]), output_dir=str(paths["dpo"]),
                                    max_steps=2))
    run("eval", "--config", as_run("eval.yaml", tmp, model=str(tiny_model_dir), out=str(paths["eval"]),
                                   adapters=[str(paths["dpo"] / "adapter")], seeds=1, **TINY_VIDEO))
    return paths


def test_rollout_dpo_and_eval_configs_run(pipeline):
    from rlhf.prompts import load_prompts

    store = json.loads((pipeline["rollout"] / "store.json").read_text())
    assert store["settings"]["samples_per_prompt"] == 2
    manifest = pipeline["rollout"] / "manifest.parquet"
    assert manifest.exists()
    train_prompts = load_prompts(REPO / "configs/prompts/train.txt").prompts
    assert [json.loads(line)["prompt"] for line in (pipeline["rollout"] / "prompts.jsonl").read_text().splitlines()
            ] == train_prompts
    assert sorted(p.stem for p in (pipeline["rollout"] / "scores").glob("*.json")) == ["brightness", "motion"]
    summary = json.loads((pipeline["dpo"] / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (pipeline["dpo"] / "adapter" / "adapter_model.safetensors").exists()
    result = json.loads((pipeline["eval"] / "eval.json").read_text())
    assert result["prompts"] == load_prompts(REPO / "configs/prompts/heldout.txt").prompts
    assert result["rewards"] == {"brightness": "trained", "motion": "trained", "colorfulness": "held_out",
                                 "contrast": "held_out", "frame_diff_motion": "held_out", "combined": "trained"}


def test_weights_rewards_config_names_its_placeholder(pipeline, capsys):
    """`score --config configs/rewards.yaml` without the weights: exit 2, one line naming a placeholder."""
    from tests.conftest import call_cli

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        code, out, err = call_cli(capsys, "score", "--store", pipeline["rollout"], "--config",
                                  "configs/rewards.yaml", "--rescore")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    named = [p for p in placeholders(load_yaml(CONFIGS / "rewards.yaml")) if p in err]
    assert named, err


def test_generate_config_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "video.mp4"
    run("generate", "--config", as_run("generate.yaml", tmp_path, model=str(tiny_model_dir), out=str(out),
                                       prompt="a red ball", **TINY_VIDEO))
    assert out.stat().st_size > 0


def test_reward_gradient_config_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run("train", "--config", as_run("reward_gradient.yaml", tmp_path, model=str(tiny_model_dir),
                                    output_dir=str(out), max_steps=1, gradient_accumulation_steps=1,
                                    num_decode_frames=2, **TINY_VIDEO))
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_grpo_config_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run("train", "--config", as_run("grpo.yaml", tmp_path, model=str(tiny_model_dir), output_dir=str(out),
                                    max_steps=2, group_size=2, prompts_per_round=1, **TINY_VIDEO))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_nft_config_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run("train", "--config", as_run("nft.yaml", tmp_path, model=str(tiny_model_dir), output_dir=str(out),
                                    max_steps=2, group_size=2, prompts_per_round=1, **TINY_VIDEO))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_online_config_runs(tiny_model_dir, tmp_path):
    out = tmp_path / "online"
    run("online", "--config", as_run("online_dpo.yaml", tmp_path, model=str(tiny_model_dir), out=str(out),
                                     rounds=1, rollout={"samples_per_prompt": 2, "batch_size": 2, "save_frames": 5,
                                                        **TINY_VIDEO},
                                     train={"max_steps": 2}))
    rounds = json.loads((out / "rounds.json").read_text())
    assert len(rounds) == 1
    assert (out / "round-00" / "train" / "adapter" / "adapter_model.safetensors").exists()
