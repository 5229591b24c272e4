"""Toy alignment: does preference training raise a reward on prompts AND seeds it never saw?

On the tiny model with weight-free rewards, runs the real pipeline (the quickstart's stages and settings):
rollout (K samples per training prompt) -> score -> pairs -> train -> eval on held-out prompts and seeds.
From the eval's scores (base and tuned on the same prompts and seeds):
- R0: mean trained reward of the base model;
- R_bestK: best-of-K selection from the base (seeds grouped K at a time, the best of each group);
- R1: mean trained reward of the tuned model;
- gain fraction (R1 - R0) / (R_bestK - R0) (>= 1: the tuned policy alone matches best-of-K);
- win rate of tuned vs base on the same prompt and seed (ties apart);
- change of each held-out reward and its seed-to-seed noise (std over seeds of the base, averaged).
Prints one JSON object per trainer; `--record` appends it with the command to benchmarks/RESULTS.md.

    python benchmarks/toy_alignment.py [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import record  # noqa: E402
from rlhf.cli import main as cli  # noqa: E402


def summarize(eval_json: Path, group: int) -> dict:
    result = json.loads(eval_json.read_text())
    (candidate,) = result["candidates"]
    trained = [r for r, kind in result["rewards"].items() if kind == "trained" and r != "combined"]
    held_out = [r for r, kind in result["rewards"].items() if kind == "held_out"]
    weights = result["weights"]

    def combined(model: str) -> np.ndarray:  # (prompts, seeds)
        return sum(weights[r] * np.asarray(result["scores"][model][r]) for r in trained)

    base, tuned = combined("base"), combined(candidate)
    prompts, seeds = base.shape
    usable = seeds // group * group
    best_of_k = base[:, :usable].reshape(prompts, -1, group).max(axis=2)
    r0, r_best, r1 = float(base.mean()), float(best_of_k.mean()), float(tuned.mean())
    diff = (tuned - base).ravel()
    report = {
        "R0": r0,
        "R_bestK": r_best,
        "R1": r1,
        "K": group,
        "gain_fraction": (r1 - r0) / (r_best - r0) if r_best > r0 else None,
        "win_rate": float((diff > 0).mean()),
        "tie_rate": float((diff == 0).mean()),
        "held_out": {},
    }
    for name in held_out:
        b, t = np.asarray(result["scores"]["base"][name]), np.asarray(result["scores"][candidate][name])
        change, noise = float((t - b).mean()), float(b.std(axis=1).mean())
        report["held_out"][name] = {"change": change, "seed_noise": noise, "within_noise": change >= -noise}
    report["targets_met"] = {
        "win_rate>=0.8": report["win_rate"] >= 0.8,
        "gain_fraction>=1": (report["gain_fraction"] or 0) >= 1.0,
        "held_out_within_noise": all(v["within_noise"] for v in report["held_out"].values()),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the run here (default: a temporary directory)")
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from rlhf.commands import quickstart
    from rlhf.training import holds_run

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "toy"
        start = time.perf_counter()
        if cli(["quickstart", "--out", str(out), "--device", "cpu"]) != 0:
            raise SystemExit("quickstart failed")
        rows.append({"benchmark": "toy_alignment", "trainer": "dpo",
                     **summarize(out / "eval" / "eval.json", quickstart.SAMPLES_PER_PROMPT),
                     "seconds": round(time.perf_counter() - start, 1)})

        # The reward-gradient trainer on the same model, reward, prompts and evaluation.
        start = time.perf_counter()
        configs, common = out / "configs", ["--device", "cpu", "--dtype", "fp32"]
        trained = cli(["train", "--method", "reward_gradient", "--model", str(out / "tiny-model"),
                       "--prompts", str(configs / "train_prompts.txt"), "--rewards", str(configs / "rewards.yaml"),
                       "--output-dir", str(out / "train-rg"), *quickstart.SAMPLING[:-2], "--grad-steps", "1",
                       "--decode-frames", "first", "--max-steps", "60", "--batch-size", "4",
                       "--learning-rate", "5e-3", "--lora-rank", "8", "--lora-alpha", "8", "--mixed-precision",
                       "no", "--no-gradient-checkpointing", "--save-every", "0", "--report-to", "none", *common,
                       *(["--resume-from", "latest"] if holds_run(out / "train-rg") else [])])  # a kept --out
        evaluated = trained == 0 and cli([
            "eval", "--model", str(out / "tiny-model"), "--adapters", str(out / "train-rg" / "adapter"),
            "--prompts", str(configs / "eval_prompts.txt"), "--seeds", str(quickstart.EVAL_SEEDS),
            "--rewards", str(configs / "rewards.yaml"), "--held-out-rewards", str(configs / "held_out_rewards.yaml"),
            "--out", str(out / "eval-rg"), "--save-videos", "0", *quickstart.SAMPLING, *common]) == 0
        if not evaluated:
            raise SystemExit("reward-gradient training or its evaluation failed")
        rows.append({"benchmark": "toy_alignment", "trainer": "reward_gradient",
                     **summarize(out / "eval-rg" / "eval.json", quickstart.SAMPLES_PER_PROMPT),
                     "seconds": round(time.perf_counter() - start, 1)})
    for row in rows:
        print(json.dumps(row, indent=2))
    if args.record:
        record("toy_alignment", rows)

if __name__ == "__main__":
    main()
