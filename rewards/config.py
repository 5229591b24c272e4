"""The `rewards` config section: which scorers to build, their options and weights, where to run them.

YAML shape (each scorer entry: `weight` plus that scorer's options, checked strictly):

    scorers:
      clip: {weight: 1.0, checkpoint: /models/clip/ViT-L-14.pt, num_frames: 8}
      aesthetic: {weight: 0.5, head: /models/sac+logos+ava1-l14-linearMSE.pth,
                  clip_checkpoint: /models/clip/ViT-L-14.pt}
      motion: {weight: 0.5, backend: raft_small, raft_weights: /models/raft_small_C_T_V2-01064c6d.pth}
      brightness: {weight: 0.0}          # weight 0: scored and logged, not trained on (held out)
      my_scorer: {class: "my_pkg.rewards:MyScorer", weight: 1.0, options: {any: thing}}
      judge: {remote: "http://127.0.0.1:8765", weight: 0.5}   # served by `contentv-rlhf reward-server`
    device: auto
    batch_size: 8

An entry's name is a registry name (`rewards.registry.SCORERS`) unless it sets `class`, either a
registry name (to use one scorer twice with different options) or `package.module:ClassName`; such
entries take their options under `options:` so they cannot clash with `weight` / `class`. An entry with
`remote: http://host:port` is scored by a reward server's scorer of the same name (or `scorer: NAME`), with
`rewards.remote.RemoteOptions` (timeout_s, retries, backoff_s) beside `weight`.
Validating imports the scorer modules (torch) but loads no weights: files are checked when built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from rewards.registry import SCORERS, scorer_class
from rlhf.config import ConfigError, config_from_dict, load_yaml, option
from rlhf.errors import UserError, quote
from rlhf.options import MAX_MICRO_BATCH, DeviceName, device_name_problem, in_range

SOURCE = "rewards.scorers"
REMOTE_CLASS = "rewards.remote:RemoteScorer"


class ScorerSpec(NamedTuple):
    """One validated scorer entry: what to build and how much its score counts."""

    name: str
    cls: type
    options: Any
    weight: float


@dataclass
class RewardsConfig:
    """Reward scorers to build (name -> weight and options), their device and batch size."""

    scorers: dict[str, dict[str, Any] | None] = option(
        {}, "Scorer name -> {weight, options...}; names: " + ", ".join(SCORERS) +
        ", or any name with class: 'package.module:ClassName' and options: {...}, or remote: "
        "http://host:port (a `contentv-rlhf reward-server`'s scorer of that name)."
    )
    device: DeviceName = option("auto", "Device for the scorers: auto picks npu, then cuda, then cpu; "
                                        "cuda:1 picks a GPU.", check=device_name_problem)
    batch_size: int = option(8, "Videos per scorer call when scoring a rollout (lower it if memory runs out).")

    def __post_init__(self) -> None:
        if not self.scorers:
            raise ConfigError("scorers", "needs at least one scorer, e.g. {clip: {checkpoint: FILE}}; "
                              f"known scorers: {', '.join(SCORERS)}")
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
        scorer_specs(self)  # fail now, not after an hour of sampling


def scorer_specs(config: RewardsConfig) -> list[ScorerSpec]:
    """Each entry of `config.scorers` resolved to its class, validated options and weight."""
    return [parse_entry(name, entry) for name, entry in config.scorers.items()]


def parse_entry(name: str, entry: dict[str, Any] | None) -> ScorerSpec:
    """Validate one `scorers` entry; errors name `rewards.scorers.<name>`."""
    source = f"{SOURCE}.{name}"
    entry = dict(entry or {})
    weight = _weight(entry.pop("weight", 1.0), source)
    if "remote" in entry:  # served by `contentv-rlhf reward-server` (rewards.remote)
        if "class" in entry:
            raise UserError(f"{source}: an entry takes remote (a reward server's URL) or class, not both")
        cls = scorer_class(REMOTE_CLASS, source)
        raw = {"scorer": name, **entry}
    elif "class" in entry:
        cls = scorer_class(str(entry.pop("class")), source)
        raw = entry.pop("options", None) or {}
        if entry:
            raise UserError(f"{source}: an entry with class takes only class, weight and options, got "
                            f"{', '.join(map(repr, entry))}; put the scorer's options under options:")
    else:
        cls = scorer_class(name, source)
        raw = entry
    return ScorerSpec(name, cls, config_from_dict(cls.Options, raw, source=source), weight)


def _weight(value: Any, source: str) -> float:
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise UserError(f"{source}: weight expects a finite number, got {quote(value)}")
    return weight


def load_rewards_config(path: str | Path, field: str = "rewards") -> RewardsConfig:
    """A rewards YAML file (the `score` command's format), strictly checked; `field` names the option."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{field}: {path}: rewards config not found")
    return config_from_dict(RewardsConfig, load_yaml(path), source=str(path))
