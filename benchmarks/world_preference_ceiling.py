"""Is the reward or the trainer the limit? Flow-DPO on one rollout, pairs ranked by the rewards vs the oracle.

`world_alignment.py` measures what each trainer does with the world's learned rewards. When Flow-DPO gains
little, two causes are possible: the rewards rank the samples badly (the pairs teach the wrong thing), or
preference training on the generator's own samples cannot move it (whatever the pairs say). This benchmark
separates them. On ONE rollout of the training prompts (`configs/world/rollout.yaml`) it builds two pair sets
with the shipped `configs/world/pairs.yaml` policy:

- `dpo`: ranked by the learned rewards (`configs/world/rewards.yaml`, the shipped weights), as everywhere else;
- `dpo_oracle_pairs`: ranked by the ground truth itself (`configs/world/ground_truth.yaml` scored into the same
  store: colour+shape hit, weight 1, plus cleanliness, weight 0.5), the best preferences any reward could give.

Each trains with the shipped `configs/world/dpo.yaml`, unchanged and without a time budget. A diagnostic,
never a shipped model: no reward or trainer elsewhere sees the oracle. Per pair set it reports how many pairs
contrast the asked colour+shape (winner right and loser wrong, or the reverse: teaching the wrong shape);
per method and split (held-out and training combinations, seeds never used in training) the same row as
`world_alignment.py`. If the oracle's pairs do not raise held-out accuracy either, the trainer (on this
generator and this much data) is the limit, not the reward.

    python benchmarks/world_preference_ceiling.py [--out DIR] [--record]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402
from benchmarks.world_alignment import (  # noqa: E402
    CONFIGS,
    WorldEvaluator,
    evaluation_splits,
    run_stage,
    summarise,
)

ORACLE_WEIGHTS = {"oracle_colour_shape": 1.0, "oracle_cleanliness": 0.5}


def pair_contrast(pairs_dir: Path, store_dir: Path) -> dict:
    """How many pairs have a winner with the asked colour+shape and a loser without (`teach_right`), the
    reverse (`teach_wrong`), or both the same (`same`), by the oracle's reading of the rollout."""
    from datasets import load_from_disk

    from rollouts.store import RolloutStore

    hits = RolloutStore(store_dir).read_scores("oracle_colour_shape")["scores"]
    rows = load_from_disk(str(pairs_dir))
    counts = {"pairs": len(rows), "teach_right": 0, "teach_wrong": 0, "same": 0}
    for chosen, rejected in zip(rows["chosen_id"], rows["rejected_id"], strict=True):
        difference = hits[chosen] - hits[rejected]
        counts["teach_right" if difference > 0 else "teach_wrong" if difference < 0 else "same"] += 1
    return counts


def build_pairs(out: Path, device: str) -> dict[str, dict]:
    """The rollout, both scorings and both pair sets; returns per pair set its directory, contrast and the
    seconds its data cost."""
    store = out / "rollout"
    rollout_s = run_stage(["rollout", "--config", CONFIGS / "rollout.yaml", "--out", store, "--device", device])
    score_s = run_stage(["score", "--store", store, "--config", CONFIGS / "rewards.yaml"])
    oracle_s = run_stage(["score", "--store", store, "--config", CONFIGS / "ground_truth.yaml"])
    shipped = yaml.safe_load((CONFIGS / "pairs.yaml").read_text())
    oracle_config = out / "pairs_oracle.yaml"
    oracle_config.write_text(yaml.safe_dump({**shipped, "weights": ORACLE_WEIGHTS}))
    sets = {}
    for name, config, scoring_s in (("dpo", CONFIGS / "pairs.yaml", score_s),
                                    ("dpo_oracle_pairs", oracle_config, oracle_s)):
        pairs_s = run_stage(["pairs", "--store", store, "--out", out / f"pairs_{name}", "--config", config])
        sets[name] = {"pairs": out / f"pairs_{name}", "contrast": pair_contrast(out / f"pairs_{name}", store),
                      "seconds": {"rollout": rollout_s, "score": scoring_s, "pairs": pairs_s}}
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--device", default="cpu", help="device of every stage (default: cpu)")
    parser.add_argument("--seeds", type=int, default=12, help="evaluation seeds per held-out prompt (default: 12)")
    parser.add_argument("--training-seeds", type=int, default=4,
                        help="evaluation seeds per training-combination prompt (default: 4)")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        sets = build_pairs(out, args.device)
        for name, pair_set in sets.items():
            train_s = run_stage(["train", "--config", CONFIGS / "dpo.yaml", "--pairs", pair_set["pairs"],
                                 "--output-dir", out / name, "--overwrite", "--device", args.device])
            pair_set["seconds"]["train"] = train_s
        evaluator = WorldEvaluator({name: out / name / "adapter" for name in sets}, args.device)
        rows = []
        for split, (prompts, seeds) in evaluation_splits(args.seeds, args.training_seeds).items():
            evaluator.use(None)
            base = evaluator.sample(prompts, seeds)
            rows.append({**summarise("base", split, base, base, {}), "benchmark": "world_preference_ceiling"})
            for name, pair_set in sets.items():
                evaluator.use(name)
                row = summarise(name, split, evaluator.sample(prompts, seeds), base, pair_set["seconds"])
                rows.append({**row, "benchmark": "world_preference_ceiling", "pair_contrast": pair_set["contrast"]})
    emit_rows("world_preference_ceiling", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
