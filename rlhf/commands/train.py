"""`contentv-rlhf train`: train a LoRA adapter with Flow-DPO (`method: dpo`), reward gradients
(`method: reward_gradient`), online GRPO (`method: grpo`), online DiffusionNFT (`method: nft`) or SFT on the
best-scored samples (`method: sft`).

Each method has its own strict config (`dpo.config.DPOConfig`, `dpo.reward_gradient_config.RewardGradientConfig`,
`dpo.grpo_config.GRPOConfig`, `dpo.nft_config.NFTConfig`, `dpo.sft_config.SFTConfig`). The command line accepts
the flags of all; the method is read first (`--method`, else the `--config` YAML's `method`, else dpo), then only
that method's config is built, and a flag of another method is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import typing
from pathlib import Path
from typing import Any, Literal

from rlhf.config import add_config_arguments, config_from_args, load_yaml, option
from rlhf.distributed import launched_rank
from rlhf.errors import UserError
from rlhf.outputs import TRAINING_RUN, check_output

HELP = ("Train a LoRA adapter on the transformer: method dpo (Flow-DPO from a pairs dataset), reward_gradient "
        "(DRaFT-K: back-propagate differentiable rewards through the last sampling steps), grpo (online Flow-GRPO "
        "with an SDE window), nft (online DiffusionNFT: the flow-matching loss towards reward-weighted implicit "
        "policies) or sft (rejection-sampling fine-tuning: the flow-matching loss on each prompt's "
        "best-scored samples of a rollout store).")
EXAMPLES = """\
  contentv-rlhf train --config configs/dpo.yaml
  contentv-rlhf train --config configs/dpo.yaml --learning-rate 5e-5 --max-steps 500 --output-dir runs/dpo2
  contentv-rlhf train --config configs/dpo.yaml --resume-from latest
  contentv-rlhf train --config configs/reward_gradient.yaml                    # method: reward_gradient
  contentv-rlhf train --config configs/reward_gradient.yaml --grad-steps 2 --decode-frames k_evenly_spaced \\
      --num-decode-frames 3
  contentv-rlhf train --config configs/grpo.yaml                               # method: grpo
  contentv-rlhf train --config configs/nft.yaml                                # method: nft
  contentv-rlhf train --method sft --store runs/rollout-r0 --weights '{clip: 1.0, aesthetic: 0.5}' --top-k 2 \\
      --output-dir runs/sft-r0                                                 # best 2 samples per prompt
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m rlhf.cli train --config configs/dpo.yaml
  torchrun --nproc_per_node 2 -m rlhf.cli train --config configs/dpo.yaml --device cpu    # 2 CPU processes
Flags marked [dpo], [reward_gradient], [grpo], [sft] or [nft] belong to those methods only; unmarked flags apply to all.
"""
DEFAULT_METHOD = "dpo"


def method_configs() -> dict[str, type]:
    """Method name -> its config dataclass (light imports: no torch)."""
    from dpo.config import DPOConfig
    from dpo.grpo_config import GRPOConfig
    from dpo.nft_config import NFTConfig
    from dpo.reward_gradient_config import RewardGradientConfig
    from dpo.sft_config import SFTConfig

    return {"dpo": DPOConfig, "reward_gradient": RewardGradientConfig, "grpo": GRPOConfig, "sft": SFTConfig,
            "nft": NFTConfig}


@functools.cache
def flags_class() -> type:
    """A dataclass with every field of every method's config, used only to declare the command-line flags.

    A field of one method has its help prefixed with `[method]`; a shared field whose help differs shows both.
    """
    configs = method_configs()
    merged: dict[str, dict] = {}  # name -> {"type": ..., "field": Field, "help": {method: help}}
    for method, cls in configs.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            entry = merged.setdefault(f.name, {"type": hints[f.name], "field": f, "help": {}})
            entry["help"][method] = f.metadata.get("help", "")
    fields = []
    for name, entry in merged.items():
        f, helps = entry["field"], entry["help"]
        if name == "method":
            tp = Literal[tuple(configs)]
            text = (f"Trainer: {' or '.join(configs)}; read from this flag, else the --config file, else "
                    f"{DEFAULT_METHOD}. Each method accepts only its own fields.")
        else:
            tp = entry["type"]
            if len(helps) < len(configs):
                text = " ".join(f"[{m}] {h}" for m, h in helps.items())
            elif len(set(helps.values())) == 1:
                text = next(iter(helps.values()))
            else:
                text = " | ".join(f"{m}: {h}" for m, h in helps.items())
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        fields.append((name, tp, option(default, text, metadata={k: v for k, v in f.metadata.items()
                                                                  if k != "help"})))
    return dataclasses.make_dataclass("TrainFlags", fields)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, flags_class())


def read_method(args: argparse.Namespace) -> tuple[str, type]:
    """The method picked by `--method`, else the `--config` YAML's `method`, else dpo; and its config class."""
    configs = method_configs()
    method, source = DEFAULT_METHOD, "default"
    if hasattr(args, "method"):
        method, source = args.method, "command line"
    elif getattr(args, "config", None) and "method" in (data := load_yaml(args.config)):
        method, source = data["method"], args.config
    if method not in configs:
        raise UserError(f"{source}: unknown method {method!r}; expected one of {', '.join(map(repr, configs))}")
    cls = configs[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    foreign = [f.name for f in dataclasses.fields(flags_class()) if hasattr(args, f.name) and f.name not in fields]
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        raise UserError(f"command line: {flag} is not an option of method {method}")
    return method, cls


def run(args: argparse.Namespace) -> int:
    method, cls = read_method(args)
    config = config_from_args(cls, args)
    check_output(config.output_dir, field="field 'output_dir'", kind=TRAINING_RUN, inputs=training_inputs(config),
                 overwrite=config.overwrite, resumable=True)
    from rlhf.training import release_run_locks

    try:
        adapter = train(method, config)
    finally:  # a run that fails releases its run directory too (a finished one has already)
        release_run_locks()
    if launched_rank() == 0:
        print(f"adapter written to {adapter}")
    return 0


def _recorded(path: Path, *keys: str) -> str | None:
    """A path another stage recorded in its JSON file (`keys` deep), or None where it is unreadable: the trainer
    reports a damaged file itself."""
    try:
        value = json.loads(path.read_text())
        for key in keys:
            value = value[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def training_inputs(config: Any) -> dict[str, Any]:
    """What a run reads, by name: the pairs and the store and model they were made from (given or recorded), the
    prompts, rewards and initial adapter. Its output_dir must be none of them (rlhf/outputs.py)."""
    inputs = {name: getattr(config, name, None) for name in ("pairs", "store", "model", "prompts", "rewards",
                                                             "init_adapter")}
    if inputs["pairs"] and not inputs["store"]:
        inputs["store"] = _recorded(Path(inputs["pairs"]) / "summary.json", "metadata", "store")
    if inputs["store"] and not inputs["model"]:
        inputs["model"] = _recorded(Path(inputs["store"]) / "store.json", "settings", "model")
    inputs["init adapter"] = inputs.pop("init_adapter")
    return inputs


def train(method: str, config: Any) -> Path:
    """Run the trainer of `method` on its `config`; returns the final adapter directory."""
    if method == "reward_gradient":
        from dpo.reward_gradient import train_reward_gradient

        return train_reward_gradient(config)
    if method == "grpo":
        from dpo.grpo import train_grpo

        return train_grpo(config)
    if method == "sft":
        from dpo.sft import train_sft

        return train_sft(config)
    if method == "nft":
        from dpo.nft import train_nft

        return train_nft(config)
    from dpo.trainer import train_dpo

    return train_dpo(config)
