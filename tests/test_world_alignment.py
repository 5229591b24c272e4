"""benchmarks/world_alignment.py's read-outs: the shape confusion and the VAE-reconstruction ceiling."""

import numpy as np
import pytest

from benchmarks.world_alignment import ASKED, READ, WorldEvaluator, oracle_arrays, shape_confusion
from rlhf.world.oracle import Reading


def reading(colour: str, shape: str | None, direction: str) -> Reading:
    return Reading(colour=colour, shape=shape, direction=direction, cleanliness=0.5)


def test_shape_confusion_counts_what_was_read_per_shape_asked():
    prompts = ["a red circle moving left", "a red circle moving up", "a blue square moving left",
               "a blue square moving down"]
    readings = [reading("red", "circle", "left"), reading("red", "square", "up"),
                reading("blue", "circle", "left"), reading("blue", None, "down")]
    arrays = oracle_arrays(readings, prompts, groups=2)  # two prompts' worth of rows, two videos each
    assert arrays["shape"].tolist() == [[1, 0], [0, 0]] and arrays[f"{ASKED}square"].sum() == 2
    confusion = shape_confusion(arrays)
    # Written out: circle asked twice, read circle once and square once; square asked twice, read circle, none.
    assert confusion == {"circle": {"circle": 0.5, "square": 0.5, "triangle": 0.0, "none": 0.0},
                         "square": {"circle": 0.5, "square": 0.0, "triangle": 0.0, "none": 0.5}}
    assert all(not name.startswith((ASKED, READ)) for name in ("colour", "cleanliness"))


@pytest.mark.slow
def test_vae_ceiling_reads_renders_through_the_world_vae():
    evaluator = WorldEvaluator({}, "cpu")
    prompts = ["a red triangle moving left", "a cyan square moving up"]
    ceiling = evaluator.vae_ceiling(prompts, [0, 1])
    assert ceiling["colour"].shape == (2, 2)
    # The world VAE keeps colour and motion (what it loses is the corners: squares read as circles).
    assert ceiling["colour"].mean() == 1.0 and ceiling["direction"].mean() == 1.0
    again = evaluator.vae_ceiling(prompts, [0, 1])  # renders are seeded by (seed, prompt): the same clips
    assert all(np.array_equal(ceiling[name], again[name]) for name in ceiling)


def test_pair_contrast_counts_pairs_by_what_the_oracle_read_of_winner_and_loser(tmp_path):
    import json

    from datasets import Dataset

    from benchmarks.world_preference_ceiling import pair_contrast

    (tmp_path / "store" / "scores").mkdir(parents=True)
    hits = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}  # the oracle's colour+shape hit per sample
    (tmp_path / "store" / "scores" / "oracle_colour_shape.json").write_text(json.dumps({"scores": hits}))
    Dataset.from_dict({"chosen_id": ["a", "b", "a", "d", "c"],
                       "rejected_id": ["b", "c", "c", "b", "d"]}).save_to_disk(str(tmp_path / "pairs"))
    # Written out: a>b right, b>c wrong, a>c same, d>b same, c>d right.
    assert pair_contrast(tmp_path / "pairs", tmp_path / "store") == {"pairs": 5, "teach_right": 2,
                                                                     "teach_wrong": 1, "same": 2}
