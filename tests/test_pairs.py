"""Preference pairs from reward scores: normalisation formulas, policies, filters, exclusions, saving."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rewards.pairs import (
    BASE_COLUMNS,
    PairsConfig,
    ScoreRow,
    build_pairs,
    normalize_scores,
    pair_columns,
    save_pairs,
)
from rlhf.config import config_from_dict, help_problems
from rlhf.errors import UserError

POLICIES = ("best_vs_worst", "all_above_margin", "pareto")
MODES = ("prompt", "store", "none")


def row(sample_id: str, prompt_id: str, **scores) -> dict:
    return {"sample_id": sample_id, "prompt_id": prompt_id, "scores": scores}


def random_table(rng: np.random.Generator, dims=("clip", "aesthetic", "motion"), bad_rate=0.05,
                 ties=False) -> list[dict]:
    """Random prompts with 1..12 samples each; some NaN / inf / missing scores; optionally many ties."""
    table = []
    for p in range(int(rng.integers(1, 7))):
        for s in range(int(rng.integers(1, 13))):
            scores = {d: float(rng.normal(loc=rng.normal(), scale=rng.uniform(0.1, 3))) for d in dims}
            if ties:
                scores = {d: float(np.round(v)) for d, v in scores.items()}
            if rng.random() < bad_rate:
                scores[str(rng.choice(dims))] = [math.nan, math.inf, -math.inf, None][int(rng.integers(4))]
            table.append(row(f"p{p}_s{s}", f"p{p}", **scores))
    return table


def random_config(rng: np.random.Generator, policy: str, dims=("clip", "aesthetic", "motion")) -> PairsConfig:
    weights = {} if rng.random() < 0.3 else {d: float(rng.choice([-1.0, 0.0, 0.5, 1.0, 2.0])) for d in dims}
    if weights and not any(weights.values()):
        weights[dims[0]] = 1.0
    return PairsConfig(
        weights=weights,
        normalize=str(rng.choice(MODES)),
        pool_scale_below=int(rng.integers(0, 10)),
        policy=policy,
        min_margin=float(rng.choice([0.0, 0.0, 0.3, 1.0])),
        max_dimension_regression=None if rng.random() < 0.5 else float(rng.uniform(0, 2)),
        max_pairs_per_prompt=None if rng.random() < 0.5 else int(rng.integers(1, 5)),
    )


def robust_z_written_out(values: list[float], scale: float | None = None, eps: float = 1e-6) -> np.ndarray:
    """(r - median) / (1.4826 * MAD + eps), MAD = median |r - median|; `scale` replaces 1.4826 * MAD."""
    r = np.asarray(values, dtype=float)
    med = np.median(r)
    if scale is None:
        scale = 1.4826 * np.median(np.abs(r - med))
    return (r - med) / (scale + eps)


# --- invariants over random tables -----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_chosen_beats_rejected_and_weights_combine_on_random_tables(policy):
    rng = np.random.default_rng(1234)
    for trial in range(60):
        table = random_table(rng, ties=trial % 3 == 0)
        config = random_config(rng, policy)
        bad_ids = {r["sample_id"] for r in table
                   if any(v is None or not math.isfinite(v) for v in r["scores"].values())}
        try:
            pairs, summary = build_pairs(table, config)
        except UserError:
            pytest.fail(f"trial {trial}: unexpected UserError")
        dims, weights = summary["dimensions"], summary["weights"]
        prompt_of = {r["sample_id"]: r["prompt_id"] for r in table}
        per_prompt: dict[str, int] = {}
        for p in pairs:
            assert p["chosen_score"] > p["rejected_score"], (trial, p)
            assert p["margin"] == p["chosen_score"] - p["rejected_score"]
            assert p["margin"] >= config.min_margin
            assert prompt_of[p["chosen_id"]] == prompt_of[p["rejected_id"]] == p["prompt_id"]
            assert p["chosen_id"] != p["rejected_id"]
            assert not {p["chosen_id"], p["rejected_id"]} & bad_ids
            for side in ("chosen", "rejected"):
                combined = sum(weights[d] * p[f"{side}_{d}_z"] for d in dims)
                assert p[f"{side}_score"] == pytest.approx(combined, rel=1e-9, abs=1e-9)
            if config.max_dimension_regression is not None:
                for d in dims:
                    worse = np.sign(weights[d]) * (p[f"rejected_{d}_z"] - p[f"chosen_{d}_z"])
                    assert worse <= config.max_dimension_regression + 1e-12
            per_prompt[p["prompt_id"]] = per_prompt.get(p["prompt_id"], 0) + 1
        if config.max_pairs_per_prompt is not None:
            assert max(per_prompt.values(), default=0) <= config.max_pairs_per_prompt
        if policy == "best_vs_worst":
            assert max(per_prompt.values(), default=0) <= 1
        assert summary["counts"]["pairs"] == len(pairs)
        assert set(summary["excluded_sample_ids"]) == bad_ids
        dropped = sum(summary["dropped"].values())
        assert summary["counts"]["candidate_pairs"] == len(pairs) + dropped
        json.dumps(summary, allow_nan=False)  # serialisable, no NaN


def test_pareto_never_emits_a_pair_whose_winner_loses_a_dimension():
    rng = np.random.default_rng(7)
    emitted = 0
    for trial in range(80):
        table = random_table(rng, ties=trial % 2 == 0)
        config = random_config(rng, "pareto")
        pairs, summary = build_pairs(table, config)
        weights = summary["weights"]
        active = [d for d in summary["dimensions"] if weights[d] != 0]
        for p in pairs:
            for suffix in ("", "_z"):
                gains = [np.sign(weights[d]) * (p[f"chosen_{d}{suffix}"] - p[f"rejected_{d}{suffix}"])
                         for d in active]
                assert min(gains) >= 0, (trial, p)
            assert max(np.sign(weights[d]) * (p[f"chosen_{d}"] - p[f"rejected_{d}"]) for d in active) > 0
        emitted += len(pairs)
    assert emitted > 50  # the property was exercised


def test_pareto_skips_incomparable_pairs_and_counts_them():
    table = [row("a", "p", clip=1.0, motion=0.0), row("b", "p", clip=0.0, motion=1.0),
             row("c", "p", clip=-1.0, motion=-1.0)]
    config = PairsConfig(policy="pareto", normalize="none", min_margin=0.0)
    pairs, summary = build_pairs(table, config)
    assert sorted((p["chosen_id"], p["rejected_id"]) for p in pairs) == [("a", "c"), ("b", "c")]
    assert summary["dropped"]["not_dominated"] == 1


def test_pareto_orients_negative_weights_as_penalties():
    # flicker has a negative weight: lower is better. a dominates b (better clip, less flicker).
    table = [row("a", "p", clip=1.0, flicker=0.1), row("b", "p", clip=0.5, flicker=0.9)]
    config = PairsConfig(policy="pareto", normalize="none", min_margin=0.0, weights={"clip": 1.0, "flicker": -1.0})
    pairs, _ = build_pairs(table, config)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("a", "b")]
    assert pairs[0]["chosen_score"] == pytest.approx(1.0 - 0.1)


# --- normalisation -----------------------------------------------------------------------------------


def test_prompt_normalisation_uses_per_prompt_median_and_mad_for_large_prompts():
    rng = np.random.default_rng(3)
    big = {f"b{i}": float(v) for i, v in enumerate(rng.normal(2.0, 3.0, size=12))}
    table = [row(s, "big", clip=v) for s, v in big.items()]
    z = normalize_scores(np.array(list(big.values()))[:, None], ["big"] * 12, "prompt", pool_scale_below=8)
    np.testing.assert_allclose(z[:, 0], robust_z_written_out(list(big.values())), rtol=1e-12)

    # Through build_pairs: every sample appears in some pair; its z column is the formula's value.
    pairs, _ = build_pairs(table, PairsConfig(policy="all_above_margin", min_margin=0.0))
    expected = dict(zip(big, robust_z_written_out(list(big.values())), strict=True))
    seen = {}
    for p in pairs:
        seen[p["chosen_id"]], seen[p["rejected_id"]] = p["chosen_clip_z"], p["rejected_clip_z"]
    assert seen.keys() == expected.keys()
    for sample, value in seen.items():
        assert value == pytest.approx(expected[sample], rel=1e-12)


def test_prompt_normalisation_pools_the_scale_for_small_prompts_but_centres_per_prompt():
    small_a = [0.0, 1.0, 5.0]                     # K = 3 <= 8: pooled scale
    small_b = [10.0, 10.5, 11.0, 30.0]            # K = 4 <= 8: pooled scale
    large = [float(v) for v in np.linspace(-4.0, 4.0, 10) ** 3]  # K = 10 > 8: its own MAD
    groups = ["a"] * 3 + ["b"] * 4 + ["c"] * 10
    raw = np.array(small_a + small_b + large)[:, None]
    z = normalize_scores(raw, groups, "prompt", pool_scale_below=8, eps=1e-6)[:, 0]

    residuals = np.concatenate([np.asarray(g) - np.median(g) for g in (small_a, small_b, large)])
    pooled = 1.4826 * np.median(np.abs(residuals))
    np.testing.assert_allclose(z[:3], robust_z_written_out(small_a, scale=pooled), rtol=1e-12)
    np.testing.assert_allclose(z[3:7], robust_z_written_out(small_b, scale=pooled), rtol=1e-12)
    np.testing.assert_allclose(z[7:], robust_z_written_out(large), rtol=1e-12)

    # pool_scale_below=0 turns pooling off: every prompt uses its own MAD.
    z_own = normalize_scores(raw, groups, "prompt", pool_scale_below=0)[:, 0]
    np.testing.assert_allclose(z_own[:3], robust_z_written_out(small_a), rtol=1e-12)
    # A prompt with one sample (residual 0 by construction) does not shrink the pooled scale.
    solos = [f"solo{i}" for i in range(6)]
    z_solo = normalize_scores(np.vstack([raw, np.full((6, 1), 7.0)]), [*groups, *solos], "prompt")[:, 0]
    np.testing.assert_allclose(z_solo[:-6], z, rtol=1e-12)
    # The bound is inclusive: K == pool_scale_below pools, K == pool_scale_below + 1 does not.
    z_4 = normalize_scores(raw, groups, "prompt", pool_scale_below=4)[:, 0]
    np.testing.assert_allclose(z_4[3:7], robust_z_written_out(small_b, scale=pooled), rtol=1e-12)
    z_3 = normalize_scores(raw, groups, "prompt", pool_scale_below=3)[:, 0]
    np.testing.assert_allclose(z_3[3:7], robust_z_written_out(small_b), rtol=1e-12)

    # The summary reports the pooled scale and how many prompts used it.
    table = [row(f"s{i}", g, clip=float(v)) for i, (g, v) in enumerate(zip(groups, raw[:, 0], strict=True))]
    _, summary = build_pairs(table, PairsConfig(min_margin=0.0))
    assert summary["normalization"]["pooled_scale"]["clip"] == pytest.approx(pooled)
    assert summary["normalization"]["pooled_scale_prompts"] == 2


def test_store_and_none_normalisation():
    values = [3.0, -1.0, 4.0, 1.5, 9.0, 2.6]
    groups = ["a", "a", "a", "b", "b", "b"]
    raw = np.array(values)[:, None]
    np.testing.assert_allclose(normalize_scores(raw, groups, "store")[:, 0], robust_z_written_out(values), rtol=1e-12)
    np.testing.assert_array_equal(normalize_scores(raw, groups, "none"), raw)


def test_zero_mad_falls_back_to_the_standard_deviation():
    # 7 of 10 values tie: the MAD is 0, and (r - median) / eps would make this dimension dominate.
    values = [1.0] * 7 + [0.0, 0.0, 0.0]
    z = normalize_scores(np.array(values)[:, None], ["p"] * 10, "prompt", pool_scale_below=0)[:, 0]
    np.testing.assert_allclose(z, (np.array(values) - 1.0) / (np.std(values) + 1e-6), rtol=1e-12)
    table = [row(f"s{i}", "p", motion=v) for i, v in enumerate(values)]
    _, summary = build_pairs(table, PairsConfig(pool_scale_below=0, min_margin=0.0))
    assert summary["normalization"]["std_fallbacks"] == {"motion": 1}
    assert any("standard deviation" in w for w in summary["warnings"])
    # A constant dimension normalises to 0 (and gives no pair).
    constant = normalize_scores(np.ones((4, 1)), ["p"] * 4, "prompt")
    np.testing.assert_array_equal(constant, 0.0)


# --- weights and filters -------------------------------------------------------------------------------


def test_weights_combine_as_written_out():
    table = [row("a", "p", clip=0.30, aesthetic=5.0, motion=0.2),
             row("b", "p", clip=0.25, aesthetic=6.0, motion=0.9)]
    config = PairsConfig(normalize="none", weights={"clip": 10.0, "aesthetic": 0.5, "motion": -1.0}, min_margin=0.0)
    (pair,), summary = build_pairs(table, config)
    score_a = 10.0 * 0.30 + 0.5 * 5.0 - 1.0 * 0.2  # 5.3
    score_b = 10.0 * 0.25 + 0.5 * 6.0 - 1.0 * 0.9  # 4.6
    assert (pair["chosen_id"], pair["rejected_id"]) == ("a", "b")
    assert pair["chosen_score"] == pytest.approx(score_a)
    assert pair["rejected_score"] == pytest.approx(score_b)
    assert pair["margin"] == pytest.approx(score_a - score_b)
    assert summary["weights"] == {"aesthetic": 0.5, "clip": 10.0, "motion": -1.0}


def test_empty_weights_mean_one_each_and_unlisted_dimensions_get_zero():
    table = [row("a", "p", clip=1.0, motion=0.0), row("b", "p", clip=0.0, motion=3.0)]
    (pair,), summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0))
    assert summary["weights"] == {"clip": 1.0, "motion": 1.0}
    assert pair["chosen_id"] == "b" and pair["chosen_score"] == 3.0
    (pair,), summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0, weights={"clip": 1.0}))
    assert summary["weights"] == {"clip": 1.0, "motion": 0.0}
    assert pair["chosen_id"] == "a" and pair["chosen_score"] == 1.0
    assert pair["chosen_motion"] == 0.0 and pair["rejected_motion"] == 3.0  # still recorded


def test_min_margin_drops_pairs():
    table = [row("lo", "p", clip=0.0), row("mid", "p", clip=0.3), row("hi", "p", clip=1.0)]
    config = PairsConfig(normalize="none", policy="all_above_margin", min_margin=0.5)
    pairs, summary = build_pairs(table, config)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("hi", "lo"), ("hi", "mid")]  # margin order
    assert summary["dropped"]["margin"] == 1
    # best_vs_worst: the one candidate is dropped when its margin is too small.
    pairs, summary = build_pairs(table, PairsConfig(normalize="none", min_margin=1.5))
    assert pairs == [] and summary["dropped"]["margin"] == 1 and summary["counts"]["prompts_without_pairs"] == 1
    assert any("no pairs kept" in w for w in summary["warnings"])


def test_ties_never_make_a_pair_even_with_zero_min_margin():
    table = [row("a", "p", clip=0.5), row("b", "p", clip=0.5)]
    for policy in POLICIES:
        pairs, summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0, policy=policy))
        assert pairs == [], policy


def test_max_dimension_regression_drops_pairs():
    # a wins on the combined score (1.0 vs 0.5) but is 0.5 worse on motion.
    table = [row("a", "p", clip=1.0, motion=0.0), row("b", "p", clip=0.0, motion=0.5)]
    base = {"normalize": "none", "min_margin": 0.0}
    pairs, summary = build_pairs(table, PairsConfig(**base, max_dimension_regression=0.4))
    assert pairs == [] and summary["dropped"]["dimension_regression"] == 1
    pairs, summary = build_pairs(table, PairsConfig(**base, max_dimension_regression=0.6))
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("a", "b")]
    pairs, _ = build_pairs(table, PairsConfig(**base))  # None = off
    assert len(pairs) == 1


def test_max_pairs_per_prompt_keeps_the_largest_margins():
    table = [row(f"s{i}", "p", clip=float(i)) for i in range(5)]
    config = PairsConfig(normalize="none", policy="all_above_margin", min_margin=0.0, max_pairs_per_prompt=3)
    pairs, summary = build_pairs(table, config)
    assert [p["margin"] for p in pairs] == [4.0, 3.0, 3.0]
    assert summary["dropped"]["max_pairs"] == 10 - 3


def test_best_vs_worst_gives_one_pair_per_prompt_with_two_valid_samples():
    rng = np.random.default_rng(11)
    for _ in range(20):
        table = random_table(rng, bad_rate=0.15)
        valid: dict[str, list[str]] = {}
        for r in table:
            ok = all(v is not None and math.isfinite(v) for v in r["scores"].values())
            valid.setdefault(r["prompt_id"], [])
            if ok:
                valid[r["prompt_id"]].append(r["sample_id"])
        pairs, summary = build_pairs(table, PairsConfig(min_margin=0.0))
        eligible = {p for p, ids in valid.items() if len(ids) >= 2}
        assert [p["prompt_id"] for p in pairs] == [p for p in valid if p in eligible]  # table order
        assert summary["counts"]["prompts_too_few_samples"] == len(valid) - len(eligible)
        for p in pairs:  # top vs bottom of the combined score
            z = {}
            for q in build_pairs(table, PairsConfig(min_margin=0.0, policy="all_above_margin"))[0]:
                if q["prompt_id"] == p["prompt_id"]:
                    z[q["chosen_id"]], z[q["rejected_id"]] = q["chosen_score"], q["rejected_score"]
            assert p["chosen_score"] == max(z.values()) and p["rejected_score"] == min(z.values())


# --- bad input ---------------------------------------------------------------------------------------------


def test_non_finite_samples_are_excluded_and_reported_by_id():
    table = [row("ok1", "p", clip=0.1, motion=0.5), row("nan", "p", clip=math.nan, motion=9.0),
             row("inf", "p", clip=math.inf, motion=0.0), row("neg", "p", clip=0.2, motion=-math.inf),
             row("none", "p", clip=None, motion=1.0), row("gone", "p", motion=1.0),
             row("ok2", "p", clip=0.9, motion=0.4)]
    for policy in POLICIES:
        pairs, summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0, policy=policy))
        assert {p["chosen_id"] for p in pairs} | {p["rejected_id"] for p in pairs} <= {"ok1", "ok2"}
    assert summary["excluded_sample_ids"] == ["nan", "inf", "neg", "none", "gone"]
    assert {(e["sample_id"], e["dimension"], e["value"]) for e in summary["excluded"]} == {
        ("nan", "clip", "nan"), ("inf", "clip", "inf"), ("neg", "motion", "-inf"),
        ("none", "clip", "missing"), ("gone", "clip", "missing")}
    assert summary["counts"]["valid_samples"] == 2 and summary["counts"]["excluded_samples"] == 5
    assert any("nan, inf, neg, none, gone" in w for w in summary["warnings"])
    # Spread statistics only see valid scores.
    assert summary["score_spread"]["motion"]["max"] == 0.5


def test_a_prompt_with_fewer_than_two_valid_samples_gives_no_pairs():
    table = [row("a", "p1", clip=1.0), row("b", "p1", clip=math.nan), row("c", "p2", clip=1.0),
             row("d", "p2", clip=0.0)]
    pairs, summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0))
    assert [p["prompt_id"] for p in pairs] == ["p2"]
    assert summary["counts"]["prompts_too_few_samples"] == 1
    assert summary["counts"]["prompts_without_pairs"] == 1


def test_unknown_weight_dimension_is_a_user_error_listing_the_dimensions():
    table = [row("a", "p", clip=1.0, motion=0.0), row("b", "p", clip=0.0, motion=1.0)]
    with pytest.raises(UserError, match=r"'motoin'.*did you mean 'motion'.*clip, motion"):
        build_pairs(table, PairsConfig(weights={"clip": 1.0, "motoin": 1.0}))


@pytest.mark.parametrize("table", [[], [row("a", "p"), row("b", "p")]], ids=["empty", "no-dimensions"])
def test_table_without_scores_is_a_user_error(table):
    with pytest.raises(UserError, match="no scores"):
        build_pairs(table, PairsConfig())


def test_malformed_tables_are_user_errors():
    with pytest.raises(UserError, match="'a' appears more than once"):
        build_pairs([row("a", "p", clip=1.0), row("a", "p", clip=2.0)], PairsConfig())
    with pytest.raises(UserError, match="not a number"):
        build_pairs([row("a", "p", clip="high"), row("b", "p", clip=2.0)], PairsConfig())
    with pytest.raises(UserError, match="missing scores"):
        build_pairs([{"sample_id": "a", "prompt_id": "p"}], PairsConfig())
    with pytest.raises(UserError, match="clashes"):
        build_pairs([row("a", "p", id=1.0), row("b", "p", id=2.0)], PairsConfig())
    with pytest.raises(UserError, match="clashes"):
        build_pairs([row("a", "p", clip=1.0, clip_z=1.0)], PairsConfig())


def test_score_rows_and_mappings_give_the_same_pairs():
    rng = np.random.default_rng(5)
    table = random_table(rng, bad_rate=0.0)
    rows = [ScoreRow(r["sample_id"], r["prompt_id"], r["scores"]) for r in table]
    config = PairsConfig(policy="all_above_margin")
    assert build_pairs(rows, config) == build_pairs(table, config)


# --- config -------------------------------------------------------------------------------------------


def test_config_fields_are_documented_and_validated():
    assert help_problems(PairsConfig) == []
    config = config_from_dict(PairsConfig, {"weights": {"clip": 2, "motion": "0.5"}, "policy": "pareto",
                                            "max_pairs_per_prompt": "none"})
    assert config.weights == {"clip": 2.0, "motion": 0.5} and config.max_pairs_per_prompt is None
    bad = [({"policy": "best"}, "policy"), ({"normalize": "zscore"}, "normalize"),
           ({"min_margin": -1}, "min_margin"), ({"eps": 0}, "eps"), ({"pool_scale_below": -1}, "pool_scale_below"),
           ({"max_dimension_regression": -0.1}, "max_dimension_regression"),
           ({"max_pairs_per_prompt": 0}, "max_pairs_per_prompt"), ({"weights": {"clip": 0}}, "weights"),
           ({"weights": {"clip": "nan"}}, "weights"), ({"min_margn": 1}, "did you mean 'min_margin'")]
    for data, field in bad:
        with pytest.raises(UserError, match=field):
            config_from_dict(PairsConfig, data, "pairs.yaml")


# --- saving --------------------------------------------------------------------------------------------


def test_saved_dataset_round_trips_and_summary_is_written(tmp_path):
    import datasets

    rng = np.random.default_rng(2)
    table = random_table(rng, bad_rate=0.1)
    pairs, summary = build_pairs(table, PairsConfig(policy="all_above_margin", min_margin=0.0))
    assert pairs
    out = save_pairs(pairs, summary, tmp_path / "pairs", {"store": "/data/store", "scorers": ["clip"]})
    assert out == tmp_path / "pairs"
    loaded = datasets.load_from_disk(str(out))
    assert loaded.column_names == pair_columns(summary["dimensions"])
    assert loaded.features["chosen_id"].dtype == "string" and loaded.features["margin"].dtype == "float64"
    assert loaded.to_list() == pairs  # exact: float64 columns

    written = json.loads((out / "summary.json").read_text())
    assert written["metadata"] == {"store": "/data/store", "scorers": ["clip"]}
    assert written["config"]["policy"] == "all_above_margin"
    assert written["counts"] == summary["counts"]
    assert written["excluded_sample_ids"] == summary["excluded_sample_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_existing_output_is_refused_without_overwrite(tmp_path):
    import datasets

    table = [row("a", "p", clip=1.0), row("b", "p", clip=0.0)]
    pairs, summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0))
    out = tmp_path / "pairs"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder that is not a pairs dataset is never replaced
        with pytest.raises(UserError, match="is not a pairs dataset"):
            save_pairs(pairs, summary, out, {}, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()
    save_pairs(pairs, summary, out, {})
    with pytest.raises(UserError, match="already holds a pairs dataset; pass --overwrite"):
        save_pairs(pairs, summary, out, {})
    save_pairs(pairs, summary, out, {}, overwrite=True)
    assert datasets.load_from_disk(str(out))["chosen_id"] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]  # the old copy was removed
    (tmp_path / "empty").mkdir()
    save_pairs(pairs, summary, tmp_path / "empty", {})  # an empty directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="must be a directory"):
        save_pairs(pairs, summary, tmp_path / "file", {})


def test_no_pairs_gives_a_valid_empty_dataset_with_the_columns(tmp_path):
    import datasets

    table = [row("a", "p", clip=1.0, motion=2.0), row("b", "q", clip=0.0, motion=1.0)]  # one sample per prompt
    pairs, summary = build_pairs(table, PairsConfig())
    assert pairs == [] and any("no pairs kept" in w for w in summary["warnings"])
    out = save_pairs(pairs, summary, tmp_path / "pairs", {"store": "s"})
    loaded = datasets.load_from_disk(str(out))
    assert len(loaded) == 0
    assert loaded.column_names == [*BASE_COLUMNS, "chosen_clip", "rejected_clip", "chosen_clip_z",
                                   "rejected_clip_z", "chosen_motion", "rejected_motion", "chosen_motion_z",
                                   "rejected_motion_z"]
    assert json.loads((out / "summary.json").read_text())["counts"]["pairs"] == 0


def test_save_rejects_records_with_the_wrong_columns(tmp_path):
    table = [row("a", "p", clip=1.0), row("b", "p", clip=0.0)]
    pairs, summary = build_pairs(table, PairsConfig(normalize="none", min_margin=0.0))
    with pytest.raises(ValueError, match="columns"):
        save_pairs([{**pairs[0], "extra": 1.0}], summary, tmp_path / "pairs", {})
    assert not (tmp_path / "pairs").exists()
