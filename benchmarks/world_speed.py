"""Time to target: how much wall time each trainer needs to raise the shapes world's truth by +10 and +20 points.

On the shipped world model and the shipped `configs/world/` files (the same ones `world_alignment.py` uses), for
each method and training seed (`--training-seeds`, >= 2), this trains within `--budget-seconds`, the clock started
at the method's first command (an offline method's rollout, scoring and pairs are charged at the time they took),
with a checkpoint at least every `--checkpoint-seconds` (`save_every_seconds`; at a round's end for the online
trainers). Every checkpoint's adapter is evaluated on the **test** split (combinations never used for training or
for any choice; seeds of the world's "test" namespace): the oracle's taught accuracy (colour and size both right),
paired with the base on the same prompts and seeds. A checkpoint's time is the wall time from the method's start
to the end of its step (`command_seconds` in metrics.jsonl, plus the charged data time).

Per method: each seed's curve (time, gain in points), the mean curve over seeds on a common grid (each seed's
gain carried forward from its latest checkpoint; before the first, 0), and the minutes each needs to reach +10
and +20 points: on the mean curve, and per seed (None: not within the budget). Draws the mean curves into a PNG
(`--png`, default docs/world_speed.png). Prints one JSON row per method; `--record` appends them to RESULTS.md.

    python benchmarks/world_speed.py [--out DIR] [--record] [--methods dpo,sft,reward_gradient,grpo,nft]
    python benchmarks/world_speed.py --methods grpo --variant grpo_10_steps=grpo:steps=10

`--variant NAME=METHOD:FIELD=VALUE[,FIELD=VALUE...]` adds a curve for METHOD trained with its shipped config with
those fields changed (e.g. fewer rollout steps), under the same budget, seeds and evaluation, in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402
from benchmarks.world_alignment import (  # noqa: E402
    CONFIGS,
    OFFLINE,
    ONLINE,
    WorldEvaluator,
    evaluation_splits,
    train_methods,
)

TARGETS = (10.0, 20.0)  # points of taught accuracy over the base
DEFAULT_METHODS = ("dpo", "sft", "reward_gradient", "grpo", "nft")
COLOURS = {"dpo": (31, 119, 180), "sft": (255, 127, 14), "reward_gradient": (44, 160, 44), "grpo": (214, 39, 40),
           "nft": (148, 103, 189), "dpo_oracle": (140, 86, 75)}
VARIANT_COLOURS = ((0, 0, 0), (23, 190, 207), (188, 189, 34), (227, 119, 194))  # --variant curves


def checkpoint_times(run_dir: Path, charged: float) -> list[tuple[float, Path]]:
    """(seconds from the method's start, adapter) of every checkpoint a run kept, in order."""
    ends = {}
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        ends[record["step"] + 1] = record["command_seconds"]
    found = []
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        steps = int(folder.name.removeprefix("step-"))
        found.append((charged + ends[steps], folder / "adapter"))
    return found


def variant_config(out: Path, name: str, method: str, changes: dict) -> Path:
    """The shipped config of `method` with `changes`, written as `out/NAME.yaml`."""
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**yaml.safe_load((CONFIGS / f"{method}.yaml").read_text()), **changes}))
    return path


def curve_grid(checkpoints: dict[str, list[list[tuple[float, Path]]]], budget: float, step: float) -> np.ndarray:
    """Times at which the mean curves are read: every `step` seconds up to the budget, and on to the last
    checkpoint of any run (a run's final step ends a little past the budget: its checkpoint must be on the curve,
    or a curve would end at a gain the run no longer had)."""
    end = max([budget, *(seconds for runs in checkpoints.values() for run in runs for seconds, _ in run)])
    grid = np.arange(0.0, budget + 1e-9, step)
    return grid if end <= grid[-1] else np.append(grid, end)


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time at which `curve` (time, gain) reaches `target`; None if it never does."""
    return next((t for t, gain in curve if gain >= target), None)


def mean_curve(curves: list[list[tuple[float, float]]], grid: np.ndarray) -> list[tuple[float, float]]:
    """The mean over seeds at each grid time of each seed's gain at its latest checkpoint by then (0 before its
    first: the base)."""
    values = []
    for t in grid:
        values.append(float(np.mean([next((g for s, g in reversed(curve) if s <= t), 0.0) for curve in curves])))
    return [(float(t), v) for t, v in zip(grid, values, strict=True)]


def draw_png(curves: dict[str, list[tuple[float, float]]], path: Path, budget: float) -> None:
    """A line plot of each method's mean gain (points) against wall time (minutes), with the +10 and +20 lines."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 820, 480, 60, 190, 20, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    gains = [g for curve in curves.values() for _, g in curve] + [0.0, *TARGETS]
    low, high = min(gains) - 2, max(gains) + 2

    def x(t: float) -> float:
        return left + (width - left - right) * t / budget

    def y(g: float) -> float:
        return top + (height - top - bottom) * (high - g) / (high - low)

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for target in (0.0, *TARGETS):
        draw.line([x(0), y(target), x(budget), y(target)], fill=(170, 170, 170), width=1)
        draw.text((5, y(target) - 6), f"{target:+.0f}", fill=(0, 0, 0))
    for minute in range(int(budget // 60) + 1):
        draw.text((x(minute * 60) - 3, height - bottom + 5), str(minute), fill=(0, 0, 0))
    draw.text((left + (width - left - right) // 2 - 80, height - 22), "minutes from the method's start",
              fill=(0, 0, 0))
    draw.text((5, 2), "taught-accuracy gain over base, points (test split)", fill=(0, 0, 0))
    for row, (method, curve) in enumerate(curves.items()):
        colour = COLOURS.get(method, VARIANT_COLOURS[row % len(VARIANT_COLOURS)])
        points = [(x(t), y(g)) for t, g in curve]
        draw.line(points, fill=colour, width=2)
        draw.line([width - right + 10, top + 12 + 18 * row, width - right + 30, top + 12 + 18 * row], fill=colour,
                  width=3)
        draw.text((width - right + 35, top + 6 + 18 * row), method, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", help="device of every stage (default: cpu)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="methods (comma-separated)")
    parser.add_argument("--training-seeds", type=int, default=2, help="training runs per method (default: 2)")
    parser.add_argument("--budget-seconds", type=float, default=240.0,
                        help="wall-time budget of every method from its first command (default: 240 s)")
    parser.add_argument("--checkpoint-seconds", type=float, default=30.0,
                        help="a checkpoint at least this often (default: 30 s)")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per test prompt (default: 4)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:FIELD=VALUE[,...]",
                        help="also train METHOD with its shipped config's FIELDs set to VALUEs (YAML), reported as "
                             "NAME (repeatable)")
    parser.add_argument("--png", default=str(ROOT / "docs" / "world_speed.png"), help="where to draw the curves")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in (*OFFLINE, *ONLINE)]
    if unknown or not methods:
        parser.error(f"--methods: expected some of {', '.join((*OFFLINE, *ONLINE))}, got {args.methods!r}")
    if args.training_seeds < 2:
        parser.error("--training-seeds: at least 2 (one run per method is not a measurement)")
    variants: dict[str, tuple[str, dict]] = {}
    for item in args.variant:
        name, _, rest = item.partition("=")
        method, _, assignments = rest.partition(":")
        try:
            changes = {key.strip(): yaml.safe_load(value) for key, _, value in
                       (pair.partition("=") for pair in assignments.split(","))}
        except yaml.YAMLError:
            changes = {}
        fields = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text()) if method in ONLINE else {}
        if not name or name in (*methods, *variants) or not changes or not set(changes) <= set(fields):
            parser.error(f"--variant {item}: expected NAME=METHOD:FIELD=VALUE[,...] with a new NAME, METHOD one of "
                         f"{', '.join(ONLINE)} and FIELDs of its shipped config")
        variants[name] = (method, changes)

    started = time.perf_counter()
    extra = ("--save-every-seconds", args.checkpoint_seconds, "--keep-last", 1000)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        names = [*methods, *variants]
        checkpoints: dict[str, list[list[tuple[float, Path]]]] = {name: [] for name in names}
        costs: dict[str, list[dict]] = {name: [] for name in names}
        configs = {name: f"configs/world/{'dpo' if name == 'dpo_oracle' else name}.yaml" for name in methods}
        for index in range(args.training_seeds):
            # name -> (its runs' folder, the methods trained there, their configs)
            jobs = {None: (out / f"seed{index}", methods, {}),
                    **{name: (out / f"seed{index}" / name, [method], {method: variant_config(out, name, method, changes)})
                       for name, (method, changes) in variants.items()}}
            for name, (folder, job_methods, job_configs) in jobs.items():
                trained = train_methods(folder, index, args.device, args.budget_seconds, job_methods, job_configs,
                                        extra=extra)
                for method, run in trained.items():
                    key = name or method
                    charged = sum(v for k, v in run["seconds"].items() if k != "train")
                    checkpoints[key].append(checkpoint_times(folder / method, charged))
                    costs[key].append({k: run[k] for k in ("seconds", "steps_done", "max_steps",
                                                           "stopped_by_budget")})
                    if name:
                        changes = variants[name][1]
                        configs[key] = f"configs/world/{method}.yaml with " + ", ".join(
                            f"{k}: {v}" for k, v in changes.items())
        adapters = {f"{m}@{i}@{j}": adapter for m, runs in checkpoints.items() for i, run in enumerate(runs)
                    for j, (_, adapter) in enumerate(run)}
        evaluator = WorldEvaluator(adapters, args.device)
        prompts, seeds = evaluation_splits("test", args.seeds, 1)["test"]
        evaluator.use(None)
        base = evaluator.sample(prompts, seeds)["taught"]
        grid = curve_grid(checkpoints, args.budget_seconds, args.checkpoint_seconds / 2)
        rows, means = [], {}
        for method, runs in checkpoints.items():
            curves = []
            for i, run in enumerate(runs):
                curve = []
                for j, (seconds, _) in enumerate(run):
                    evaluator.use(f"{method}@{i}@{j}")
                    taught = evaluator.sample(prompts, seeds)["taught"]
                    curve.append((round(seconds, 1), 100.0 * float((taught - base).mean())))
                curves.append(curve)
            means[method] = mean_curve(curves, grid)
            rows.append({
                "benchmark": "world_speed", "method": method, "config": configs[method], "split": "test", "n_per_checkpoint": int(base.size),
                "base_taught": float(base.mean()), "budget_seconds": args.budget_seconds,
                "minutes_to": {f"+{t:.0f}": (None if (s := time_to(means[method], t)) is None else round(s / 60, 2))
                               for t in TARGETS},
                "minutes_to_per_seed": {f"+{t:.0f}": [None if (s := time_to(c, t)) is None else round(s / 60, 2)
                                                      for c in curves] for t in TARGETS},
                "final_gain_per_seed": [c[-1][1] if c else None for c in curves],
                "curves": curves, "cost": costs[method]})
        draw_png(means, Path(args.png), float(grid[-1]))
    emit_rows("world_speed", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
