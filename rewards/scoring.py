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
    from rlhf.io import output_path_problem
    from rlhf.outputs import remove_stale_temporaries_of
    from rlhf.progress import Progress
    from rollouts.store import RolloutStore

    store = RolloutStore(config.store)
    rows = store.manifest()
    if problem := output_path_problem(store.scores_dir, "dir"):  # where the scores go, before any scorer loads
        raise UserError(f"store {config.store}: the scores folder {problem}")
    prompts = {r["sample_id"]: r["prompt"] for r in rows}
    scorers = build_scorers(config)
    for name in scorers:  # what a killed score left
        remove_stale_temporaries_of(store.score_path(name))

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
    num_frames = int(store.settings["frames"])
    with Progress(total=total, initial=done, desc="score", unit="score") as progress:
        for start in range(0, len(todo), config.batch_size):
            chunk = todo[start : start + config.batch_size]
            inputs = _ScoringFrames(store, chunk, num_frames)
            for name, (scorer, weight) in scorers.items():
                ids = [sid for sid in chunk if sid in pending[name]]
                if not ids:
                    continue
                frames, positions = inputs.for_scorer(name, scorer, ids)
                with torch.no_grad():
                    values = scorer(frames.to(scorer.device or "cpu"), [prompts[s] for s in ids],
                                    positions=positions, num_frames=num_frames)
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


class _ScoringFrames:
    """The frames of a chunk of samples, as each scorer needs them.

    A scorer gets the store's kept frames (at their video positions) when they hold every frame it reads
    (`Scorer.covers`), else every frame of the samples' mp4s, else a UserError naming what is missing: a
    store's score must be the score of the full video, never one over frames at another spacing.
    """

    def __init__(self, store, chunk: list[str], num_frames: int):
        self.store, self.num_frames = store, num_frames
        self.saved = {sid: store.saved_frames(sid) for sid in chunk}
        self.videos: dict = {}

    def for_scorer(self, name: str, scorer, ids: list[str]):
        """`(frames (B, F, 3, H, W), video positions of the F frames)` for samples `ids`."""
        import torch

        kept = [self.saved[sid] for sid in ids]
        positions = kept[0][1]
        if all(f is not None and p == positions and f.shape == kept[0][0].shape for f, p in kept):
            frames = torch.stack([f for f, _ in kept])
            if positions is not None and scorer.covers(positions, self.num_frames):
                return frames, positions
            if scorer.frame_positions(self.num_frames) is None:  # a per-frame average: any kept frames do
                return frames, None
        for sid in ids:
            if sid not in self.videos:
                self.videos[sid] = self.store.load_video(sid)
        if all(self.videos[sid] is not None for sid in ids):
            video = torch.stack([self.videos[sid] for sid in ids])
            return video, list(range(video.shape[1]))
        needed = scorer.frame_positions(self.num_frames)
        has = "no frames" if kept[0][0] is None else f"frames {kept[0][1] or '(positions unrecorded)'}"
        raise UserError(f"{self.store.sample_path(ids[0])}: scorer {name!r} reads frames "
                        f"{sorted(set(needed)) if needed else 'all'} of each {self.num_frames}-frame video; the "
                        f"store kept {has} and no mp4. Rerun the rollout with save_videos: true, or with "
                        "save_frames / save_frame_stride matching the scorer (num_frames, num_pairs, stride)")


def score_weights(store) -> dict[str, float]:
    """The weight each scored dimension had in the rewards config that scored it."""
    return {name: float(store.read_scores(name).get("weight", 1.0)) for name in store.scored_dimensions()}


def score_table(store) -> list[dict[str, Any]]:
    """The store's scores as pair-builder rows: `{sample_id, prompt_id, scores: {dimension: value}}`."""
    store.read_meta()  # a missing folder or a non-store is named as such, not as a store without scores
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
