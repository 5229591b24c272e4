"""The score stage: every configured scorer over every sample of a rollout store, resumably.

Scores go to `STORE/scores/<scorer>.json` (`{"info": what produced them, "scores": {sample_id: value}}`),
rewritten atomically after each batch, so an interrupted run resumes where it stopped. A non-finite score is
stored as null and reported with its sample id; the pair builder excludes such samples. Re-scoring with
different scorer options is refused unless `rescore` is set, so one score file never mixes two models.
Module-level imports are light: `--help` builds `ScoreConfig` without torch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from rewards.config import RewardsConfig
from rlhf.config import ConfigError, option
from rlhf.errors import UserError

logger = logging.getLogger("contentv-rlhf")


@dataclass
class ScoreConfig(RewardsConfig):
    """`score`: the rewards section plus the store to score."""

    store: str | None = option(None, "Rollout store to score (written by `contentv-rlhf rollout`).")
    rescore: bool = option(False, "Recompute scores already in the store (needed after changing a scorer's options).")

    def __post_init__(self) -> None:
        RewardsConfig.__post_init__(self)
        if not self.store:
            raise ConfigError("store", "is required: the rollout store directory")


def _plain(info: dict[str, Any]) -> dict[str, Any]:
    """`info` as it reads back from JSON (paths and tuples become strings and lists)."""
    return json.loads(json.dumps(info, default=str))


def score_store(config: ScoreConfig) -> dict[str, dict[str, Any]]:
    """Score the pending samples of `config.store`; returns per-scorer counts, mean and non-finite ids."""
    import torch

    from rewards.build import build_scorers
    from rlhf.progress import Progress
    from rollouts.store import RolloutStore

    store = RolloutStore(config.store)
    rows = store.manifest()
    prompts = {r["sample_id"]: r["prompt"] for r in rows}
    scorers = build_scorers(config)

    existing, pending = {}, {}
    for name, (scorer, _) in scorers.items():
        info = _plain(scorer.info())
        saved = store.read_scores(name)
        if saved and saved.get("info") != info and not config.rescore:
            raise UserError(f"{store.score_path(name)}: scores were made with other scorer options "
                            f"({saved.get('info')} vs {info}); pass --rescore to replace them")
        existing[name] = {} if config.rescore else dict(saved.get("scores", {}))
        pending[name] = {r["sample_id"] for r in rows if r["sample_id"] not in existing[name]}

    todo = [r["sample_id"] for r in rows if any(r["sample_id"] in ids for ids in pending.values())]
    total = len(rows) * len(scorers)
    done = total - sum(len(ids) for ids in pending.values())
    logger.info("score: %d samples x %d scorer(s) in %s (%d scores already there)", len(rows), len(scorers),
                store.root, done)
    with Progress(total=total, initial=done, desc="score", unit="score") as progress:
        for start in range(0, len(todo), config.batch_size):
            chunk = todo[start : start + config.batch_size]
            frames = torch.stack([store.load_frames(sid) for sid in chunk])  # (B, F, 3, H, W)
            for name, (scorer, weight) in scorers.items():
                wanted = [i for i, sid in enumerate(chunk) if sid in pending[name]]
                if not wanted:
                    continue
                ids = [chunk[i] for i in wanted]
                with torch.no_grad():
                    values = scorer(frames[wanted].to(scorer.device or "cpu"), [prompts[s] for s in ids])
                for sid, value in zip(ids, values.float().cpu().tolist(), strict=True):
                    existing[name][sid] = value if math.isfinite(value) else None
                store.write_scores(name, _plain(scorer.info()), weight, existing[name])
                progress.update(len(ids))

    summary = {}
    for name in scorers:
        values = [v for v in existing[name].values() if v is not None]
        bad = sorted(sid for sid, v in existing[name].items() if v is None)
        summary[name] = {
            "scored": len(existing[name]),
            "mean": sum(values) / len(values) if values else None,
            "non_finite": bad,
        }
        if bad:
            logger.warning("%s: %d non-finite score(s), excluded from pairs: %s", name, len(bad),
                           ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else ""))
    return summary


def score_weights(store) -> dict[str, float]:
    """The weight each scored dimension had in the rewards config that scored it."""
    return {name: float(store.read_scores(name).get("weight", 1.0)) for name in store.scored_dimensions()}


def score_table(store) -> list[dict[str, Any]]:
    """The store's scores as pair-builder rows: `{sample_id, prompt_id, scores: {dimension: value}}`."""
    dimensions = store.scored_dimensions()
    if not dimensions:
        raise UserError(f"{store.root}: the store has no scores; run `contentv-rlhf score --store {store.root} "
                        "--config configs/rewards.yaml` first")
    scores = {name: store.read_scores(name)["scores"] for name in dimensions}
    return [
        {"sample_id": r["sample_id"], "prompt_id": r["prompt_id"],
         "scores": {name: scores[name].get(r["sample_id"]) for name in dimensions}}
        for r in store.manifest()
    ]
