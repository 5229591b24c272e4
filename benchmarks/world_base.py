"""The world's base model as built: capable (draws every value cleanly) and misaligned (follows each taught word
about half the time), measured at the sampling settings rollout and evaluation use.

Per split (train, validation, test; every direction) and per attribute, from base samples with seeds of the
world's "validation" namespace (choosing nothing on the test split's seeds):

- `following`: the share of videos whose attribute the oracle reads as the prompt's word;
- `partner`: the share read as the word's confusion partner (`scene.CONFUSION`): the systematic mistake the
  construction plants; `other`: any other value; `unreadable`: none;
- `per_word`: `following` and `partner` per taught word (a split's mean can hide words the base almost never
  follows, e.g. one colour word drawn as its partner nearly always);
- `drawable`: the share of videos whose every attribute reads as some value (whatever it is);
- cleanliness of the videos whose taught attributes are right vs wrong (a wrong output should be as clean a
  single value as a right one, not a blend);
- `vae_ceiling`: the same prompts and seeds rendered and passed through the world VAE;
- `clip_reads`: what the trained `clip` reward can see on the split: on clean renders of its prompts and seeds,
  how often it ranks the right caption first among the 18 colour-size captions in the same direction and
  phrasing, and how often that first caption has the right colour, or the right size (a reward that reads size
  only on the training pairings cannot teach it on new ones).

`--guidance G [G ...]` measures how following depends on the classifier-free guidance scale instead: the same
rows (without the ceiling and the CLIP's reads, which do not depend on it), one per scale and split, each
recording its `guidance`. The construction's rates are set against the guidance rollout and evaluation use; this
shows where each word would sit at another.

    python benchmarks/world_base.py [--seeds 8] [--guidance G [G ...]] [--record]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402
from benchmarks.world_alignment import WorldEvaluator, renders  # noqa: E402

SEED_INDEX = 500_000  # within the validation namespace, apart from the seeds config choices are made on


def read_outs(evaluator: WorldEvaluator, prompts: list[str], seeds: list[int]) -> list[tuple]:
    """(prompt's (colour, size, direction), the oracle's Reading) per video."""
    from rlhf.video import to_uint8_frames
    from rlhf.world import scene
    from rlhf.world.oracle import read_clip

    out = []
    for chunk_prompts, videos in evaluator.videos(prompts, seeds):
        out.extend((scene.parse_prompt(text), read_clip(to_uint8_frames(video)))
                   for text, video in zip(chunk_prompts, videos, strict=True))
    return out


def summarise(split: str, readings: list[tuple]) -> dict:
    from rlhf.world import scene

    row: dict = {"benchmark": "world_base", "split": split, "n": len(readings)}
    for position, attribute in enumerate(scene.ATTRIBUTES):
        asked = [a[position] for a, _ in readings]
        read = [getattr(r, attribute) for _, r in readings]
        partner = [scene.CONFUSION[attribute][w] if attribute in scene.CONFUSION else None for w in asked]
        row[attribute] = {
            "following": float(np.mean([r == w for r, w in zip(read, asked, strict=True)])),
            "partner": float(np.mean([r is not None and r == p for r, p in zip(read, partner, strict=True)])),
            "other": float(np.mean([r is not None and r not in (w, p)
                                    for r, w, p in zip(read, asked, partner, strict=True)])),
            "unreadable": float(np.mean([r is None for r in read])),
        }
    row["per_word"] = per_word(readings)
    hits = [r.matches(*a) for a, r in readings]
    row["taught"] = float(np.mean([h["taught"] for h in hits]))
    row["all"] = float(np.mean([h["all"] for h in hits]))
    row["drawable"] = float(np.mean([all(getattr(r, a) is not None for a in scene.ATTRIBUTES) for _, r in readings]))
    clean = {"right": [r.cleanliness for h, (_, r) in zip(hits, readings, strict=True) if h["taught"]],
             "wrong": [r.cleanliness for h, (_, r) in zip(hits, readings, strict=True) if not h["taught"]]}
    row["cleanliness"] = {k: float(np.mean(v)) if v else None for k, v in clean.items()}
    return row


def per_word(readings: list[tuple]) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per taught attribute and word asked: n, the share drawn as the word, and the share drawn as its partner."""
    from rlhf.world import scene

    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for position, attribute in enumerate(scene.TAUGHT):
        for word, partner in scene.CONFUSION[attribute].items():
            read = [getattr(r, attribute) for asked, r in readings if asked[position] == word]
            if read:
                out.setdefault(attribute, {})[word] = {
                    "n": len(read), "following": float(np.mean([v == word for v in read])),
                    "partner": float(np.mean([v == partner for v in read]))}
    return out


def clip_reads(evaluator: WorldEvaluator, prompts: list[str], seeds: list[int]) -> dict[str, float]:
    """The trained `clip` reward's caption ranking on clean renders (see the module docstring)."""
    import torch

    from rlhf.video import to_scorer_frames
    from rlhf.world import scene

    captions = list(scene.COMBOS)
    scorer = evaluator.scorers["clip"].scorer
    hits = {"right": [], "colour": [], "size": []}
    for index, text in enumerate(prompts):
        colour, size, direction = scene.parse_prompt(text)
        phrasing = next(p for p in range(len(scene.PHRASINGS)) if scene.prompt(colour, size, direction, p) == text)
        # the way every generated video reaches the scorers: model range, then scorer frames (B, T, 3, H, W)
        frames = to_scorer_frames(torch.stack([scene.to_model_range(clip) for clip in renders(text, index, seeds)]))
        with torch.no_grad():
            scores = torch.stack([scorer.score(frames, [scene.prompt(c, s, direction, phrasing)] * len(seeds))
                                  for c, s in captions], dim=1)  # (B, 18)
        for first in scores.argmax(dim=1).tolist():
            hits["right"].append(captions[first] == (colour, size))
            hits["colour"].append(captions[first][0] == colour)
            hits["size"].append(captions[first][1] == size)
    return {name: float(np.mean(values)) for name, values in hits.items()}


def split_rows(evaluator: WorldEvaluator, seeds: list[int]) -> list[tuple[list[str], dict]]:
    """Per split (train, validation, test): its prompts and `summarise`'s row of base samples, drawn at the
    evaluator's sampling settings (the row records their guidance)."""
    from rlhf.world import scene

    out = []
    for split in ("train", "validation", "test"):
        prompts = scene.prompts_for(scene.SPLITS[split])
        row = summarise(split, read_outs(evaluator, prompts, seeds))
        out.append((prompts, {**row, "guidance": evaluator.sampling.guidance}))
    return out


def guidance_rows(evaluator: WorldEvaluator, seeds: list[int], guidances: list[float]) -> list[dict]:
    """Per guidance scale and split, `summarise`'s row of base samples drawn at that scale."""
    shipped, rows = evaluator.sampling, []
    try:
        for guidance in guidances:
            evaluator.sampling = dataclasses.replace(shipped, guidance=guidance)
            rows.extend(row for _, row in split_rows(evaluator, seeds))
    finally:
        evaluator.sampling = shipped
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default: 8)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None, metavar="G",
                        help="sample at these guidance scales instead of the rollout config's, following only "
                             "(default: the rollout config's, with the VAE ceiling and the CLIP's reads)")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.guidance is not None and not all(g > 0 and np.isfinite(g) for g in args.guidance):
        parser.error("--guidance: expected positive finite scales")
    from rlhf.world import scene

    started = time.perf_counter()
    evaluator = WorldEvaluator({}, args.device)
    seeds = [scene.seed("validation", SEED_INDEX + i) for i in range(args.seeds)]
    if args.guidance is not None:
        emit_rows("world_base", guidance_rows(evaluator, seeds, args.guidance), time.perf_counter() - started,
                  args.record)
        return
    rows = []
    for prompts, row in split_rows(evaluator, seeds):
        ceiling = evaluator.vae_ceiling(prompts, seeds)
        row["vae_ceiling"] = {name: float(ceiling[name].mean()) for name in ("colour", "size", "direction",
                                                                              "taught", "all")}
        row["clip_reads"] = clip_reads(evaluator, prompts, seeds)
        rows.append(row)
    emit_rows("world_base", rows, time.perf_counter() - started, args.record)


if __name__ == "__main__":
    main()
