"""Every shipped YAML config loads strictly into its command's dataclass; every field is documented."""

from pathlib import Path

import pytest

from dpo.config import DPOConfig
from dpo.online import OnlineConfig
from dpo.reward_gradient_config import RewardGradientConfig
from rewards.config import RewardsConfig
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
    "pairs.yaml": (PairsStageConfig, {"store": "s", "out": "o"}),
    "eval.yaml": (EvalConfig, {"adapters": ["a"]}),
    "online_dpo.yaml": (OnlineConfig, {}),
    "reward_gradient.yaml": (RewardGradientConfig, {}),
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
            RewardGradientConfig]
)
def test_every_field_has_help(cls):
    assert help_problems(cls) == []


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader
    assert config.num_processes >= 1 and config.mixed_precision == "bf16"
