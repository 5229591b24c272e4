"""What a report is built from: which kind of run a directory holds, and where its stages wrote their output.

`report --run DIR` accepts any directory the tool writes a run into:

- a **pipeline** run (the quickstart's): `run.json` naming each stage's output (`store`, `pairs`, `train`,
  `eval`; paths relative to DIR or absolute), at least `eval` or `train`;
- an **eval** directory (`eval --out DIR`): `eval.json`; each candidate adapter that sits in a training run
  (`RUN/adapter`) brings that run's curves, and its pairs when every candidate was trained on the same ones;
- a **train** run (`train --output-dir DIR`): `summary.json` with a `method`, or `logs/metrics.jsonl` (a run
  still going); a Flow-DPO run's `summary.json` names its pairs dataset and rollout store;
- an **online** run (`online --out DIR`): `rounds.json` and/or `round-NN/{rollout,pairs,train}`.

The first of these that matches decides the kind (a directory holding `run.json` is a pipeline run).

Prompt groups (`prompt_group`): the report shows one row of videos per group, and `eval` saves its videos
for prompts spread over the groups (`spread_prompts`). A shapes-world prompt's group is its colour-size
combination (its direction varies inside the group); any other prompt is a group of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import UserError, one_line

RUN_FILE = "run.json"
RUN_KIND = "contentv-rlhf.run"
STAGES = ("store", "pairs", "train", "eval")
EVAL_FILE = "eval.json"
ROUNDS_FILE = "rounds.json"
ROUND_GLOB = "round-[0-9]*"
METRICS_FILE = Path("logs") / "metrics.jsonl"
TRAIN_SUMMARY = "summary.json"


@dataclass
class RunSources:
    """Where each part of a report comes from; None / empty where the run has no such part."""

    kind: str  # "pipeline", "eval", "train" or "online"
    root: Path
    eval: Path | None = None
    trains: dict[str, Path] = field(default_factory=dict)  # label -> training run directory
    pairs: Path | None = None
    store: Path | None = None
    rounds: Path | None = None  # an online run's directory (its rounds.json and round-NN folders)


# ---- run.json ------------------------------------------------------------------------------------


def write_run_manifest(run_dir: str | os.PathLike, **stage_paths: str | os.PathLike | None) -> Path:
    """Write `run_dir/run.json` naming each stage's output (`store`, `pairs`, `train`, `eval`).

    A path inside `run_dir` is stored relative to it (the run directory can be moved), any other as an
    absolute path; a stage given as None is left out. Returns the path of run.json.
    """
    from rlhf.io import write_json

    unknown = sorted(set(stage_paths) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    root = Path(run_dir).resolve()
    stages = {}
    for name in STAGES:
        if stage_paths.get(name) is None:
            continue
        path = Path(stage_paths[name]).resolve()
        stages[name] = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return write_json(root / RUN_FILE, {"kind": RUN_KIND, "stages": stages})


def read_run_manifest(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Stage name -> resolved path, from `run_dir/run.json` (UserError if missing, corrupt, or naming neither
    an eval nor a train stage)."""
    root = Path(run_dir)
    path = root / RUN_FILE
    if not root.is_dir():
        raise UserError(f"{root}: run directory not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {root} is not a run directory (the quickstart writes one, or "
                        "call rlhf.report.write_run_manifest)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: corrupt run manifest ({one_line(err)})") from None
    if not isinstance(data, dict) or data.get("kind") != RUN_KIND:
        kind = data.get("kind") if isinstance(data, dict) else None
        raise UserError(f"{path}: not a contentv-rlhf run manifest (kind {kind!r}, expected {RUN_KIND!r})")
    stages = data.get("stages")
    if not isinstance(stages, dict) or not all(isinstance(v, str) and v for v in stages.values()):
        raise UserError(f"{path}: 'stages' must map stage names to paths")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"{path}: unknown stage(s) {unknown}; expected some of {list(STAGES)}")
    if "eval" not in stages and "train" not in stages:
        raise UserError(f"{path}: names neither an 'eval' nor a 'train' stage, so there is nothing to report")
    return {name: root / value for name, value in stages.items()}  # an absolute value replaces root


# ---- telling the kinds apart -----------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_train_run(path: Path) -> bool:
    summary = read_json_object(path / TRAIN_SUMMARY)
    return (summary is not None and "method" in summary) or (path / METRICS_FILE).is_file()


def train_inputs(train_dir: Path) -> tuple[Path | None, Path | None]:
    """(pairs dataset, rollout store) a Flow-DPO run's summary.json names; (None, None) for other runs."""
    summary = read_json_object(train_dir / TRAIN_SUMMARY) or {}
    pairs, store = summary.get("pairs"), summary.get("store")
    return (Path(pairs) if isinstance(pairs, str) and pairs else None,
            Path(store) if isinstance(store, str) and store else None)


def round_dirs(online_dir: Path) -> list[Path]:
    return sorted(p for p in online_dir.glob(ROUND_GLOB) if p.is_dir())


def find_run(run_dir: str | os.PathLike) -> RunSources:
    """The kind of run in `run_dir` and where its parts are (see the module docstring).

    Raises:
        UserError: `run_dir` is missing, or holds none of the runs above, or has a bad run.json.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"{root}: run directory not found")
    if (root / RUN_FILE).exists():
        stages = read_run_manifest(root)
        return RunSources("pipeline", root, eval=stages.get("eval"),
                          trains={"train": stages["train"]} if "train" in stages else {},
                          pairs=stages.get("pairs"), store=stages.get("store"))
    if (root / EVAL_FILE).exists():
        return _eval_sources(root)
    if (root / ROUNDS_FILE).exists() or round_dirs(root):
        return _online_sources(root)
    if is_train_run(root):
        pairs, store = train_inputs(root)
        return RunSources("train", root, trains={"train": root}, pairs=pairs, store=store)
    raise UserError(f"{root}: not a run directory: expected {RUN_FILE} (quickstart), {EVAL_FILE} (eval --out), "
                    f"{ROUNDS_FILE} (online --out), or {TRAIN_SUMMARY} / {METRICS_FILE} (train --output-dir)")


def _eval_sources(root: Path) -> RunSources:
    data = read_json_object(root / EVAL_FILE) or {}  # a corrupt eval.json is reported when it is loaded
    candidates = data.get("candidates") if isinstance(data.get("candidates"), dict) else {}
    trains = {}
    for name, adapter in candidates.items():
        if not isinstance(adapter, str) or not adapter:
            continue
        # eval records adapters as given: relative to where it ran, tried as is, then from the eval folder.
        run = next((p.parent for p in (Path(adapter), root / adapter) if is_train_run(p.parent)), None)
        if run is not None:
            trains[str(name)] = run
    inputs = {train_inputs(path) for path in trains.values()}
    pairs, store = inputs.pop() if len(inputs) == 1 else (None, None)
    return RunSources("eval", root, eval=root, trains=trains, pairs=pairs, store=store)


def _online_sources(root: Path) -> RunSources:
    rounds = round_dirs(root)
    trains = {f"round {r.name.removeprefix('round-')}": r / "train" for r in rounds if (r / "train").is_dir()}
    with_pairs = [r for r in rounds if (r / "pairs" / "summary.json").is_file()]
    last = with_pairs[-1] if with_pairs else None
    return RunSources("online", root, trains=trains, rounds=root,
                      pairs=last / "pairs" if last else None, store=last / "rollout" if last else None)


# ---- inputs --------------------------------------------------------------------------------------


def load_eval(path: Path) -> tuple[dict[str, Any], Path]:
    """(eval.json content, its folder); `path` is the eval folder or the eval.json file itself."""
    file = path if path.suffix == ".json" else path / EVAL_FILE
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: missing; run `contentv-rlhf eval --out {path}` first") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{file}: corrupt eval results ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: corrupt eval results (not a JSON object)")
    for key, kind in (("comparisons", dict), ("rewards", dict), ("candidates", dict)):
        if not isinstance(data.get(key), kind):
            raise UserError(f"{file}: corrupt eval results (no {key!r} mapping)")
    return data, file.parent


def read_metrics(path: Path) -> tuple[list[dict[str, float]], int]:
    """metrics.jsonl records by step (a step logged twice, after a resume, keeps its last record), and the
    number of unreadable lines (a line cut by a killed run)."""
    by_step: dict[int, dict[str, float]] = {}
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            bad += 1
    return [by_step[s] for s in sorted(by_step)], bad


# ---- prompt groups -------------------------------------------------------------------------------


def prompt_group(prompt: str) -> str:
    """The group whose row shows a prompt's videos: "large red" for a shapes-world prompt (its colour-size
    combination), the prompt itself for any other."""
    from rlhf.world.scene import parse_prompt

    parsed = parse_prompt(prompt)
    return f"{parsed[1]} {parsed[0]}" if parsed is not None else prompt


def groups_of(prompts: Sequence[str]) -> dict[str, list[int]]:
    """Group -> the indices of its prompts, groups in the order of their first prompt."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt_group(prompt), []).append(index)
    return groups


def spread_prompts(prompts: Sequence[str], count: int) -> list[int]:
    """The indices of `count` prompts spread evenly over the prompt groups, sorted.

    Fewer than one per group: groups evenly spaced in prompt order, the first prompt of each. Otherwise
    round-robin over the groups, each round taking the next prompt of every group that has one, group g
    starting at its prompt g (so the world's groups show different directions), until `count` are taken.
    """
    groups = list(groups_of(prompts).values())
    if count >= len(prompts):
        return list(range(len(prompts)))
    if count < len(groups):
        return sorted(groups[i * len(groups) // count][0] for i in range(count))
    picked: list[int] = []
    for turn in range(max(len(members) for members in groups)):
        for g, members in enumerate(groups):
            if turn < len(members) and len(picked) < count:
                picked.append(members[(g + turn) % len(members)])
    return sorted(picked)


def evenly(row: int, rows: int, count: int) -> int:
    """The index, out of `count`, that row `row` of `rows` shows: rows spread evenly over the `count`."""
    return row * count // rows if rows > 0 else 0
