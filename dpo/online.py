"""Online (iterative) Flow-DPO: R rounds of rollout -> score -> pairs -> train, each from the last adapter.

Round r lives in `OUT/round-<r>/{rollout,pairs,train}` and runs the real stage commands (the same code a user
runs by hand; their configs are the `rollout`, `pairs` and `train` sections, validated up front by the stages'
own config classes). Round r > 0 samples with round r-1's adapter, continues training from it, and uses as
reference either the base model or that previous policy (`reference: previous`). Everything resumes: finished
stages are skipped, an unfinished training resumes from its latest checkpoint. After each round a summary row
(mean rewards, pairs kept, implicit accuracy, steps, seconds per stage) is printed and saved to `OUT/rounds.json`.

With `max_seconds`, the whole run has one wall-time budget from the command's start: every round's rollout,
scoring and pairs count, each round's training gets what is left (its `max_seconds`), and a round starts only if
what is left covers the previous round's data and `min_train_share` of its training (a rollout cannot be cut, and
a round that could train only seconds would cost its data's time for almost nothing). The adapter of the last
round that ran is the run's result.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf.config import ConfigError, load_yaml, option
from rlhf.errors import UserError
from rlhf.io import output_path_problem
from rlhf.options import FAMILY_HELP, family_name_problem, optional_seconds

logger = logging.getLogger("contentv-rlhf")
SECTION_CONFIG_HELP = ("`config: FILE` starts the section from that stage's config YAML, less the keys this loop "
                       "sets, device and seed; the section's other keys override the file's.")
_STAGES = {"rollout": "rollout", "pairs": "pairs", "train": "train --method dpo"}
# Keys each section may not set: the online loop owns them.
_OWNED = {
    "rollout": {"model", "family", "prompts", "out", "adapter", "overwrite", "num_processes"},
    "pairs": {"store", "out", "overwrite"},
    "train": {"pairs", "store", "model", "output_dir", "init_adapter", "reference", "resume_from", "overwrite",
              "method"},
}


@dataclass
class OnlineConfig:
    """`online`: rounds of rollout -> score -> pairs -> Flow-DPO, each starting from the previous adapter."""

    model: str | None = option(None, "Base checkpoint directory.")
    family: str | None = option(None, FAMILY_HELP + " Passed to every round's rollout (train reads it from the "
                                "store).", check=family_name_problem)
    prompts: str | None = option(None, "Training prompt file (.txt/.jsonl/.csv/datasets folder).")
    rewards: str | None = option(None, "Rewards YAML used to score every round (as for `score`).")
    out: str | None = option(None, "Run directory; round r goes to OUT/round-<r>.")
    rounds: int = option(2, "Number of rounds R.")
    reference: Literal["base", "previous"] = option(
        "base", "DPO reference in round r > 0: the base model, or the previous round's policy."
    )
    device: str = option("auto", "Device for every stage (auto, cuda, npu, cpu).")
    seed: int = option(0, "Base seed; round r samples with seed + r and trains with seed + r (with "
                          "rollout.seed + r or train.seed + r where a section sets its own).")
    max_seconds: float | None = option(None, "Wall-time budget of the whole run from the command's start (every "
                                             "round's rollout, scoring, pairs and training count): each round's "
                                             "training stops when it is spent, and a round starts only if what is "
                                             "left covers the previous round's data and min_train_share of its "
                                             "training. None: no budget.")
    min_train_share: float = option(0.5, "With max_seconds: the share of the previous round's training time a new "
                                          "round must be able to train for, beyond its data's time, to start (0: "
                                          "start whenever its data fits). Rounds stopped by the budget after a "
                                          "few seconds' training cost their rollout for almost nothing.")
    rollout: dict[str, Any] = option({}, "Flags of `rollout` (e.g. samples_per_prompt, frames, steps). "
                                         + SECTION_CONFIG_HELP)
    pairs: dict[str, Any] = option({}, "Flags of `pairs` (e.g. policy, min_margin). " + SECTION_CONFIG_HELP)
    train: dict[str, Any] = option({}, "Flags of `train` (e.g. max_steps, learning_rate, beta, lora_rank). "
                                       + SECTION_CONFIG_HELP)

    def __post_init__(self) -> None:
        for name in ("model", "prompts", "rewards", "out"):
            if not getattr(self, name):
                raise ConfigError(name, "is required")
        if problem := output_path_problem(self.out, "dir"):
            raise ConfigError("out", problem)
        if self.rounds < 1:
            raise ConfigError("rounds", f"must be >= 1, got {self.rounds}")
        optional_seconds("max_seconds", self.max_seconds)
        if not 0.0 <= self.min_train_share <= 1.0:  # also refuses NaN
            raise ConfigError("min_train_share", f"must be in [0, 1], got {self.min_train_share}")
        for section, owned in _OWNED.items():
            clash = sorted(owned & set(getattr(self, section)))
            if clash:
                raise ConfigError(section, f"must not set {clash}: the online loop sets them for every round")
            setattr(self, section, _with_stage_config(section, getattr(self, section)))
        if self.max_seconds is not None and "max_seconds" in self.train:
            raise ConfigError("train", "must not set max_seconds (here or in its config file) when the run has its "
                              "own max_seconds: each round's training gets what is left of the run's budget")


def _with_stage_config(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A section with its `config: FILE` resolved: the stage config file's fields, less the ones the loop sets
    (`_OWNED`; `device`, since every stage runs on the run's; `seed`, since a file's seed is for a run of its own
    and the run's seed must advance every round), overridden by the section's own keys."""
    if "config" not in values:
        return values
    path = values["config"]
    field = f"{section}.config"
    if not isinstance(path, str) or not Path(path).is_file():
        raise ConfigError(field, f"must be the path of a `{_STAGES[section]}` config YAML file, got {path!r}")
    fields = load_yaml(path)  # the loader every --config file goes through: a mapping, strict YAML, or exit 2
    if section == "train" and fields.get("method", "dpo") != "dpo":
        raise ConfigError(field, f"{path} configures method {fields['method']!r}; online rounds train Flow-DPO "
                          "(method dpo)")
    kept = {key: value for key, value in fields.items() if key not in _OWNED[section] | {"device", "seed"}}
    return {**kept, **{key: value for key, value in values.items() if key != "config"}}


def _flags(values: dict[str, Any]) -> list[str]:
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def _validate_sections(config: OnlineConfig) -> None:
    """Build each stage's real config from its section, so a typo fails before round 0 starts."""
    from dpo.config import DPOConfig
    from rlhf.commands.pairs import PairsStageConfig
    from rlhf.config import config_from_dict
    from rollouts.config import RolloutConfig

    checks = [
        ("rollout", RolloutConfig, {"model": config.model, "family": config.family, "prompts": config.prompts,
                                    "out": "-"}),
        ("pairs", PairsStageConfig, {"store": "-", "out": "-"}),
        ("train", DPOConfig, {"pairs": "-", "output_dir": "-"}),
    ]
    for section, cls, fixed in checks:
        config_from_dict(cls, {**getattr(config, section), **fixed}, source=f"online.{section}")


def _round_summary(round_dir: Path, index: int) -> dict[str, Any]:
    from rewards.scoring import score_weights
    from rollouts.store import RolloutStore

    store = RolloutStore(round_dir / "rollout")
    means = {}
    for name in score_weights(store):
        values = [v for v in store.read_scores(name)["scores"].values() if v is not None]
        means[name] = sum(values) / len(values) if values else None
    pairs = json.loads((round_dir / "pairs" / "summary.json").read_text())
    train = json.loads((round_dir / "train" / "summary.json").read_text())
    last = train.get("last_10_steps_mean", {})
    return {"round": index, "mean_rewards": means, "pairs": pairs["counts"]["pairs"],
            "implicit_accuracy": last.get("implicit_accuracy"), "loss": last.get("loss"),
            "steps_done": train["steps_done"], "stopped_by_max_seconds": train["stopped_by_max_seconds"]}


def format_rounds(rows: list[dict[str, Any]]) -> str:
    rewards = sorted({name for row in rows for name in row["mean_rewards"]})
    header = f"{'round':>5}  " + "  ".join(f"{name:>12}" for name in rewards) + f"  {'pairs':>6}  {'impl.acc':>8}"
    lines = [header]
    for row in rows:
        values = "  ".join(f"{row['mean_rewards'].get(name, float('nan')):>12.4f}" for name in rewards)
        accuracy = row["implicit_accuracy"]
        lines.append(f"{row['round']:>5}  {values}  {row['pairs']:>6}  "
                     f"{accuracy if accuracy is None else format(accuracy, '>8.3f')}")
    return "\n".join(lines)


def run_online(config: OnlineConfig) -> list[dict[str, Any]]:
    from rlhf.cli import main as cli
    from rlhf.clock import seconds_since_command_start
    from rlhf.io import write_json
    from rlhf.outputs import ONLINE_RUN, check_output
    from rlhf.training import holds_run

    # Each stage below restarts the command clock (it is a command of its own): keep this command's origin.
    origin = time.perf_counter() - seconds_since_command_start()

    def seconds_left() -> float:
        return config.max_seconds - (time.perf_counter() - origin)

    _validate_sections(config)
    out = check_output(config.out, field="field 'out'", kind=ONLINE_RUN, overwrite=False, resumable=True,
                       inputs={"model": config.model, "prompts": config.prompts, "rewards": config.rewards})
    rows: list[dict[str, Any]] = []
    previous: Path | None = None
    data_seconds = train_seconds = 0.0  # what the last round's data and training took in this command
    for index in range(config.rounds):
        if config.max_seconds is not None and index > 0:
            left = seconds_left()
            needed = data_seconds + config.min_train_share * train_seconds
            if left <= needed:
                print(f"max_seconds: {max(left, 0.0):.0f} s left, round {index - 1}'s data took {data_seconds:.0f} s "
                      f"and min_train_share x its training is {config.min_train_share * train_seconds:.0f} s; "
                      f"the run stops after {index} of {config.rounds} rounds", flush=True)
                break
        round_dir = out / f"round-{index:02d}"
        store, pairs, train = round_dir / "rollout", round_dir / "pairs", round_dir / "train"
        adapter = train / "adapter"
        rollout_argv = ["rollout", "--model", config.model, "--prompts", config.prompts, "--out", store,
                        "--device", config.device,
                        *_flags({**config.rollout, "seed": config.rollout.get("seed", config.seed) + index})]
        if config.family is not None:
            rollout_argv += ["--family", config.family]
        train_seed = config.train.get("seed", config.seed) + index
        train_argv = ["train", "--pairs", pairs, "--output-dir", train, "--device", config.device,
                      *_flags({**config.train, "seed": train_seed})]
        if previous is not None:
            rollout_argv += ["--adapter", previous]
            train_argv += ["--init-adapter", previous, "--reference", "init" if config.reference == "previous"
                           else "base"]
        if holds_run(train):  # interrupted: continue it (from step 0 if it was killed before a checkpoint)
            train_argv += ["--resume-from", "latest"]
        stages = [
            ("rollout", store / "manifest.parquet", rollout_argv),
            ("score", None, ["score", "--store", store, "--config", config.rewards]),
            ("pairs", pairs / "summary.json", ["pairs", "--store", store, "--out", pairs, *_flags(config.pairs)]),
            ("train", adapter / "adapter_model.safetensors", train_argv),
        ]
        seconds: dict[str, float] = {}
        for title, done_marker, argv in stages:
            if title == "train" and config.max_seconds is not None:
                argv = [*argv, "--max-seconds", max(seconds_left(), 1.0)]
            argv = [str(a) for a in argv]
            print(f"[round {index}] {title}: contentv-rlhf {shlex.join(argv)}", flush=True)
            if done_marker is not None and done_marker.exists():
                print("    already done")
                continue
            start = time.perf_counter()
            if cli(argv) != 0:
                raise UserError(f"round {index}: stage {title} failed (see the message above)")
            seconds[title] = round(time.perf_counter() - start, 1)
        data_seconds = sum(seconds.get(title, 0.0) for title in ("rollout", "score", "pairs"))
        train_seconds = seconds.get("train", 0.0)
        rows.append({**_round_summary(round_dir, index), "seconds": seconds})
        write_json(out / "rounds.json", rows)
        print(format_rounds(rows), flush=True)
        previous = adapter
    return rows
