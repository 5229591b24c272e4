"""Preference pairs from automatic reward scores: normalise, combine, pair, filter, save.

Input is a *score table*: one `ScoreRow(sample_id, prompt_id, scores)` per sampled video, where
`scores` maps a reward dimension (`clip`, `aesthetic`, `motion`, ...) to its raw score. Plain mappings
with the same three keys are accepted too (e.g. rows read from JSON, where a failed score is `null`).
`build_pairs(table, config)` returns `(pairs, summary)`; `save_pairs` writes them as a Hugging Face
dataset plus `summary.json`. Steps 1-2 below (`combine_scores`, configured by `ScoreCombination`) are shared
with `train --method sft`, which fine-tunes on each prompt's best samples by the same combined score.

Formulas (raw score r_ik of sample i, dimension k; p(i) is the prompt of sample i):

1. Normalise (`normalize`), on the valid samples only:

   - `"prompt"` (robust per-prompt z-score)::

         z_ik = (r_ik - m_pk) / (s_pk + eps)     m_pk = median_{j in p} r_jk
         s_pk = 1.4826 * median_{j in p} |r_jk - m_pk|          (1.4826 * MAD)

     With few samples the per-prompt MAD is noise, so for a prompt with at most `pool_scale_below`
     valid samples the scale is pooled over the whole store while the centre stays per prompt::

         s_pk = s_k^pool = 1.4826 * median_{j in store} |r_jk - m_p(j)k|

     (residuals from each sample's own prompt median, over the prompts with >= 2 valid samples).
   - `"store"`: m_k and s_k = 1.4826 * MAD over all valid samples of the store.
   - `"none"`: z_ik = r_ik.

   If 1.4826 * MAD is 0 (more than half of the values tie, e.g. a binary score), the population
   standard deviation of the same values is used as the scale instead (for normal data both estimate
   sigma), so a few differing values do not become +-1/eps; `summary["normalization"]["std_fallbacks"]`
   counts these. A dimension that is constant within a prompt gets z = 0 there.

2. Combine: `S_i = sum_k w_k * z_ik`. `weights` empty = every dimension weight 1; a dimension left out
   of a non-empty `weights` gets weight 0 (kept in the dataset, not used for ranking). A negative
   weight makes a penalty dimension (higher raw score = worse, e.g. flicker). The *active* dimensions
   are those with w_k != 0; "better on k" means `sign(w_k) * z` is larger.

3. Pair each prompt's valid samples (prompts with < 2 valid samples give none), `policy`:

   - `"best_vs_worst"`: one candidate, the top vs the bottom combined score (ties broken by table
     order). If a filter drops it the prompt has no pair: no fallback to the next-best pair.
   - `"all_above_margin"`: every unordered pair, the higher combined score as the winner.
   - `"pareto"`: the pairs where the winner is >= on every active dimension and > on at least one
     (judged on the raw scores, oriented by sign(w_k); normalisation is a monotone map within a
     prompt, so this is also dominance in z). Incomparable pairs are counted as `not_dominated`.

4. Filter, in this order; a dropped pair is counted under the first reason that drops it:

   - `margin`: keep only `S_w - S_l > 0` and `S_w - S_l >= min_margin` (ties never make a pair);
   - `dimension_regression` (epsilon_k, when set): drop if `max_k sign(w_k) * (z_lk - z_wk) > epsilon_k`
     over the active dimensions;
   - `max_pairs`: keep the `max_pairs_per_prompt` largest margins of each prompt.

A sample with a non-finite (NaN, +-inf) or missing score in *any* dimension is excluded from ranking
and reported (`summary["excluded"]`: sample id, prompt id, dimension, value); it is never ranked.

References: Diffusion-DPO (Wallace et al. 2023) and flow_grpo's DPO recipe (best-vs-worst of K
samples); VideoAlign (Liu et al. 2025: small gaps are ties); CaPO / Parrot (Pareto-front pairs across
rewards); Rousseeuw & Croux 1993 (MAD; 1.4826 = 1 / Phi^-1(3/4)). Design notes: algorithms.md
("Preference pairs from automatic rewards") and rewards-facts.md ("Combining dimensions into
preferences").
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rlhf import io
from rlhf.config import ConfigError, config_to_dict, option
from rlhf.errors import UserError, quote

if TYPE_CHECKING:
    import datasets

NormalizeMode = Literal["prompt", "store", "none"]
PairPolicy = Literal["best_vs_worst", "all_above_margin", "pareto"]
NORMALIZE_CHOICES: tuple[str, ...] = NormalizeMode.__args__
POLICY_CHOICES: tuple[str, ...] = PairPolicy.__args__

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): makes the MAD a consistent estimate of sigma for normal data
BASE_COLUMNS: tuple[str, ...] = (
    "prompt_id", "chosen_id", "rejected_id", "chosen_score", "rejected_score", "margin",
)
DROP_REASONS: tuple[str, ...] = ("not_dominated", "margin", "dimension_regression", "max_pairs")
SUMMARY_FILE = "summary.json"


@dataclass
class ScoreCombination:
    """How raw reward scores become one combined score per sample (steps 1-2: normalise, weight); shared by
    `pairs` and `train --method sft`."""

    weights: dict[str, float] = option(
        {}, "Weight w_k of each reward dimension in the combined score S = sum_k w_k * z_k, where z_k is the "
        "dimension's score after `normalize` (by default a robust z-score, so every dimension is in the same "
        "unit), e.g. --weights '{clip: 1, aesthetic: 0.5}'. Empty = the weights the rewards config gave `score` "
        "(recorded in the store); those are set for raw scores (configs/world/rewards.yaml gives aesthetic 0.1 "
        "for its wider range) and here multiply normalised ones, so set weights here when normalising. A "
        "dimension left out of a non-empty mapping gets 0 (its scores are kept, not ranked); a negative weight "
        "makes a penalty (higher = worse)."
    )
    normalize: NormalizeMode = option(
        "prompt", "How raw scores are normalised before weighting: prompt = robust z-score "
        "(x - median) / (1.4826 MAD + eps) within each prompt; store = the same over the whole store; "
        "none = raw scores."
    )
    pool_scale_below: int = option(
        8, "With normalize=prompt, prompts with at most this many valid samples use the MAD scale pooled "
        "over the whole store (still centred on their own median); 0 = never pool."
    )
    eps: float = option(1e-6, "Added to the normalisation scale to avoid dividing by zero.")

    def __post_init__(self) -> None:
        for name, weight in self.weights.items():
            if not isinstance(name, str) or not name:
                raise ConfigError("weights", f"keys must be non-empty dimension names, got {name!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError("weights", f"weight of {name!r} must be a finite number, got {quote(weight)}")
        if self.weights and not any(self.weights.values()):
            raise ConfigError("weights", "are all 0: at least one dimension needs a non-zero weight")
        if self.normalize not in NORMALIZE_CHOICES:
            raise ConfigError("normalize", f"must be one of {', '.join(NORMALIZE_CHOICES)}, got {self.normalize!r}")
        if self.pool_scale_below < 0:
            raise ConfigError("pool_scale_below", f"must be >= 0, got {self.pool_scale_below}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError("eps", f"must be a finite number > 0, got {self.eps}")


@dataclass
class PairsConfig(ScoreCombination):
    """`pairs`: how raw reward scores become preference pairs (normalise, combine, pair, filter)."""

    policy: PairPolicy = option(
        "best_vs_worst", "Which pairs to form per prompt: best_vs_worst = top vs bottom combined score; "
        "all_above_margin = every pair whose combined margin passes min_margin; pareto = pairs whose "
        "winner is no worse on any weighted dimension and better on one."
    )
    min_margin: float = option(
        0.5, "Drop a pair whose combined-score margin is below this (ambiguous pairs teach noise); in "
        "weighted normalised units. Pairs with margin 0 (ties) are always dropped."
    )
    max_dimension_regression: float | None = option(
        None, "Drop a pair if the winner is worse than the loser on any weighted dimension by more than "
        "this, in normalised units (epsilon_k); none = no check."
    )
    max_pairs_per_prompt: int | None = option(
        None, "Keep at most this many pairs per prompt (the largest margins); none = no limit."
    )

    def __post_init__(self) -> None:
        ScoreCombination.__post_init__(self)
        if self.policy not in POLICY_CHOICES:
            raise ConfigError("policy", f"must be one of {', '.join(POLICY_CHOICES)}, got {self.policy!r}")
        if not (self.min_margin >= 0 and math.isfinite(self.min_margin)):
            raise ConfigError("min_margin", f"must be a finite number >= 0, got {self.min_margin}")
        regression = self.max_dimension_regression
        if regression is not None and not (regression >= 0 and math.isfinite(regression)):
            raise ConfigError("max_dimension_regression", f"must be a finite number >= 0 or none, got {regression}")
        if self.max_pairs_per_prompt is not None and self.max_pairs_per_prompt < 1:
            raise ConfigError("max_pairs_per_prompt", f"must be >= 1 or none, got {self.max_pairs_per_prompt}")


@dataclass(frozen=True)
class ScoreRow:
    """One scored sample. `scores[dim]` is the raw score; None (or a missing key) = not scored."""

    sample_id: str
    prompt_id: str
    scores: Mapping[str, float | None]

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], where: str = "score table") -> ScoreRow:
        """A row from a mapping with keys `sample_id`, `prompt_id`, `scores` (others are ignored)."""
        if not isinstance(row, Mapping):
            raise UserError(f"{where}: expected a mapping with sample_id, prompt_id, scores; got {quote(row)}")
        missing = [key for key in ("sample_id", "prompt_id", "scores") if key not in row]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} (have: {', '.join(map(str, row))})")
        return cls(sample_id=row["sample_id"], prompt_id=row["prompt_id"], scores=row["scores"])


def pair_columns(dimensions: Sequence[str]) -> list[str]:
    """Column names of a pair record, in order: the base columns, then per dimension (in the given
    order) `chosen_<d>`, `rejected_<d>` (raw) and `chosen_<d>_z`, `rejected_<d>_z` (normalised)."""
    columns = list(BASE_COLUMNS)
    for dim in dimensions:
        columns += [f"chosen_{dim}", f"rejected_{dim}", f"chosen_{dim}_z", f"rejected_{dim}_z"]
    return columns


def pair_features(dimensions: Sequence[str]) -> datasets.Features:
    """The `datasets.Features` of the pairs dataset: ids as strings, every score as float64."""
    import datasets

    return datasets.Features({
        name: datasets.Value("string" if name.endswith("_id") and name in BASE_COLUMNS else "float64")
        for name in pair_columns(dimensions)
    })


def normalize_scores(raw: np.ndarray, groups: Sequence[Any] | np.ndarray, mode: NormalizeMode, *,
                     pool_scale_below: int = 8, eps: float = 1e-6) -> np.ndarray:
    """Normalised scores `z` (N, D) of finite raw scores `raw` (N, D), `groups[i]` = prompt of row i.

    Implements step 1 of the module docstring (median / 1.4826 MAD, pooled scale for small prompts,
    standard-deviation fallback for a zero MAD).
    """
    z, _ = _normalize(np.asarray(raw, dtype=np.float64), _group_codes(groups), mode, pool_scale_below, eps)
    return z


@dataclass(frozen=True)
class CombinedScores:
    """A score table's samples with their normalised and combined scores (`combine_scores`), in table order."""

    rows: list[ScoreRow]
    dimensions: list[str]  # sorted by name
    weights: dict[str, float]  # the effective weight of every dimension
    raw: np.ndarray  # (N, D) raw scores, NaN where missing
    z: np.ndarray  # (N, D) normalised scores; NaN for excluded samples
    combined: np.ndarray  # (N,) S_i = sum_k w_k z_ik; NaN for excluded samples
    valid: np.ndarray  # (N,) bool: every dimension scored and finite
    codes: np.ndarray  # (N,) index of each sample's prompt in `prompt_ids`
    prompt_ids: list[str]  # in table order
    excluded: list[dict[str, Any]]  # one entry per non-finite or missing score (see build_pairs' summary)
    normalization: dict[str, Any]  # _normalize's counters: mode, eps, pooled_scale, pooled_scale_prompts, ...


def combine_scores(table: Iterable[ScoreRow | Mapping[str, Any]], combination: ScoreCombination) -> CombinedScores:
    """Steps 1-2 of the module docstring: each valid sample's normalised scores z and combined score S.

    Raises `UserError` for an empty table, a table without scores, a weight for a dimension the table lacks,
    duplicate sample ids or non-numeric scores.
    """
    rows = [row if isinstance(row, ScoreRow) else ScoreRow.from_mapping(row, f"score table row {i}")
            for i, row in enumerate(table)]
    if not rows:
        raise UserError("no scores: the score table is empty (score the rollout store first)")
    dims = _dimensions(rows)
    if not dims:
        raise UserError(f"no scores: none of the {len(rows)} samples of the score table has a score")
    raw, excluded = _raw_matrix(rows, dims)
    weights = _effective_weights(combination.weights, dims)

    valid = np.isfinite(raw).all(axis=1)  # (N,)
    prompt_ids = list(dict.fromkeys(row.prompt_id for row in rows))  # table order
    code_of = {pid: c for c, pid in enumerate(prompt_ids)}
    codes = np.array([code_of[row.prompt_id] for row in rows], dtype=np.int64)  # (N,)

    z = np.full_like(raw, np.nan)  # (N, D); excluded samples stay NaN and are never ranked
    z[valid], norm_info = _normalize(raw[valid], codes[valid], combination.normalize, combination.pool_scale_below,
                                     combination.eps)
    w = np.array([weights[d] for d in dims])  # (D,)
    active = w != 0
    combined = z[:, active] @ w[active]  # (N,)
    return CombinedScores(rows, dims, weights, raw, z, combined, valid, codes, prompt_ids, excluded, norm_info)


def build_pairs(table: Iterable[ScoreRow | Mapping[str, Any]],
                config: PairsConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference pairs from a score table, and a summary of what was kept, dropped and excluded.

    Returns `(pairs, summary)`: `pairs` is a list of flat records with the columns of
    `pair_columns(summary["dimensions"])` (dimensions sorted by name), grouped by prompt in table
    order, largest margin first; `chosen_score > rejected_score` in every record.

    `summary` is a JSON-serialisable dict (no NaN) with the keys:

    - `config`: the PairsConfig as a dict; `dimensions`: sorted names; `weights`: effective weight of
      every dimension;
    - `counts`: prompts, samples, valid_samples, excluded_samples, prompts_too_few_samples (< 2 valid
      samples), prompts_without_pairs (those included), candidate_pairs, pairs;
    - `dropped`: not_dominated (pareto), margin, dimension_regression, max_pairs
      (candidate_pairs = pairs + the sum of these);
    - `excluded`: one entry per non-finite or missing score {sample_id, prompt_id, dimension, value
      ("nan", "inf", "-inf" or "missing")}; `excluded_sample_ids`: the samples, in table order;
    - `normalization`: mode, eps, pooled_scale (the store-wide scale per dimension: of the within-prompt
      residuals for mode prompt, of the scores for mode store; None for none), pooled_scale_prompts
      (prompts with >= 2 valid samples that used it), std_fallbacks (per dimension);
    - `score_spread`: per dimension {mean, std, min, max, within_prompt_std} of the valid raw scores
      (population std; within_prompt_std = mean over prompts with >= 2 valid samples);
    - `margin_stats`: {mean, min, max} of the kept pairs' margins (None without pairs);
    - `warnings`: human-readable lines (exclusions, small prompts, std fallbacks, no pairs kept).

    Raises `UserError` for an empty table, a table without scores, a weight for a dimension the
    table lacks, duplicate sample ids, non-numeric scores or a dimension name that clashes with a column.
    """
    scores = combine_scores(table, config)
    rows, dims, weights, raw, z = scores.rows, scores.dimensions, scores.weights, scores.raw, scores.z
    combined, valid, codes, prompt_ids = scores.combined, scores.valid, scores.codes, scores.prompt_ids
    excluded, norm_info = scores.excluded, scores.normalization
    _check_column_names(dims)
    w = np.array([weights[d] for d in dims])  # (D,)
    active = w != 0
    sign = np.sign(w)

    valid_members = _groups(codes[valid], np.flatnonzero(valid))  # per prompt code: valid table indices
    counts = {"candidate_pairs": 0, "prompts_too_few_samples": 0, "prompts_without_pairs": 0}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    chosen: list[np.ndarray] = [np.empty(0, dtype=np.int64)]  # per prompt: table indices of kept pairs
    rejected: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    for code in range(len(prompt_ids)):
        members = valid_members.get(code, np.empty(0, dtype=np.int64))  # table order
        if len(members) < 2:
            counts["prompts_too_few_samples"] += 1
            counts["prompts_without_pairs"] += 1
            continue
        win, lose, not_dominated = _candidates(config.policy, combined[members],
                                               raw[members][:, active] * sign[active])
        win, lose = members[win], members[lose]  # (P,) table indices of each candidate's winner / loser
        dropped["not_dominated"] += not_dominated
        counts["candidate_pairs"] += len(win) + not_dominated
        margin = combined[win] - combined[lose]  # (P,)
        keep = (margin > 0) & (margin >= config.min_margin)
        dropped["margin"] += int(np.count_nonzero(~keep))
        if config.max_dimension_regression is not None and active.any():
            regression = (sign[active] * (z[lose][:, active] - z[win][:, active])).max(axis=1)  # (P,)
            regressed = keep & (regression > config.max_dimension_regression)
            dropped["dimension_regression"] += int(np.count_nonzero(regressed))
            keep &= ~regressed
        kept = np.flatnonzero(keep)
        kept = kept[np.lexsort((lose[kept], win[kept], -margin[kept]))]  # largest margin first
        if config.max_pairs_per_prompt is not None and len(kept) > config.max_pairs_per_prompt:
            dropped["max_pairs"] += len(kept) - config.max_pairs_per_prompt
            kept = kept[: config.max_pairs_per_prompt]
        if not len(kept):
            counts["prompts_without_pairs"] += 1
        chosen.append(win[kept])
        rejected.append(lose[kept])

    pairs = _records(rows, dims, raw, z, combined, np.concatenate(chosen), np.concatenate(rejected))

    summary = _summary(config, rows, dims, weights, raw, codes, valid, excluded, norm_info, counts,
                       dropped, pairs)
    return pairs, summary


def save_pairs(pairs: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out_dir: str | os.PathLike,
               metadata: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write `pairs` as a `datasets.Dataset` (`save_to_disk`) and `summary.json` into `out_dir`.

    `summary.json` holds `{"metadata": metadata, **summary}` (the summary carries the config); put the
    source store path and anything else worth keeping in `metadata`. The dataset's columns are
    `pair_columns(summary["dimensions"])`, typed by `pair_features`; an empty `pairs` gives a valid
    empty dataset with those columns (build_pairs then put a warning in the summary). Everything is
    written into a temporary sibling directory, then renamed into place, so `out_dir` never holds a
    partial result. Returns the absolute `out_dir`.

    Raises:
        UserError: `out_dir` is not a directory, or holds something other than a pairs dataset, or one without
            `overwrite` (rlhf/outputs.py); a write failed (full disk, permissions).
        ValueError: a record's keys are not the expected columns (a programming error).
    """
    import datasets

    from rlhf.outputs import PAIRS_DATASET, check_output, staged_dir

    out = check_output(out_dir, field="out", kind=PAIRS_DATASET, inputs={}, overwrite=overwrite)
    dims = list(summary["dimensions"])
    columns = pair_columns(dims)
    for i, record in enumerate(pairs):
        if set(record) != set(columns):
            raise ValueError(f"pair {i}: columns {sorted(record)} differ from the expected {columns}")
    text = io.dumps({"metadata": dict(metadata), **summary}, indent=2) + "\n"

    with staged_dir(out, "the pairs dataset") as staging:
        dataset = datasets.Dataset.from_dict({c: [r[c] for r in pairs] for c in columns},
                                             features=pair_features(dims))
        # datasets writes 0 shards for an empty dataset, which load_from_disk then cannot read.
        dataset.save_to_disk(str(staging), num_shards=1 if not pairs else None)
        (staging / SUMMARY_FILE).write_text(text, encoding="utf-8")
    return out


# --- internals -----------------------------------------------------------------------------------


def _raw_matrix(rows: list[ScoreRow], dims: list[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(N, D) float matrix of the raw scores (NaN where missing) and the non-finite / missing report."""
    seen: set[str] = set()
    raw = np.empty((len(rows), len(dims)))
    excluded: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if not isinstance(row.sample_id, str) or not isinstance(row.prompt_id, str):
            raise UserError(f"score table row {i}: sample_id and prompt_id must be strings, got "
                            f"{row.sample_id!r}, {row.prompt_id!r}")
        if row.sample_id in seen:
            raise UserError(f"score table: sample id {row.sample_id!r} appears more than once")
        seen.add(row.sample_id)
        for k, dim in enumerate(dims):
            value = row.scores.get(dim)
            if value is None:
                raw[i, k] = np.nan
                excluded.append(_bad(row, dim, "missing"))
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise UserError(f"score table: sample {row.sample_id!r}: score {dim!r} is not a number: {quote(value)}")
            raw[i, k] = float(value)
            if not math.isfinite(raw[i, k]):
                excluded.append(_bad(row, dim, str(raw[i, k])))
    return raw, excluded


def _bad(row: ScoreRow, dim: str, value: str) -> dict[str, Any]:
    return {"sample_id": row.sample_id, "prompt_id": row.prompt_id, "dimension": dim, "value": value}


def _dimensions(rows: list[ScoreRow]) -> list[str]:
    dims: set[str] = set()
    for row in rows:
        if not isinstance(row.scores, Mapping):
            raise UserError(f"score table: sample {row.sample_id!r}: scores must be a mapping, got {quote(row.scores)}")
        for dim in row.scores:
            if not isinstance(dim, str) or not dim:
                raise UserError(f"score table: sample {row.sample_id!r}: dimension names must be "
                                f"non-empty strings, got {dim!r}")
        dims.update(row.scores)
    return sorted(dims)


def _effective_weights(weights: Mapping[str, float], dims: list[str]) -> dict[str, float]:
    unknown = [d for d in weights if d not in dims]
    if unknown:
        close = difflib.get_close_matches(unknown[0], dims, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"field 'weights': unknown dimension {unknown[0]!r}{hint}; the score table has: "
                        f"{', '.join(dims)}")
    if not weights:
        return dict.fromkeys(dims, 1.0)
    return {d: float(weights.get(d, 0.0)) for d in dims}


def _check_column_names(dims: list[str]) -> None:
    owner: dict[str, str] = {c: "" for c in BASE_COLUMNS}
    for dim in dims:
        for column in pair_columns([dim])[len(BASE_COLUMNS):]:
            if column in owner:
                other = f"the base column {column!r}" if not owner[column] else f"dimension {owner[column]!r}"
                raise UserError(f"score table: dimension name {dim!r} gives a column {column!r} that clashes "
                                f"with {other}; rename the dimension")
            owner[column] = dim


def prompt_scale(raw: np.ndarray, groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The pooled within-prompt scale `s_k^pool` (D,) of finite raw scores (N, D), `groups[i]` = prompt of row i.

    `1.4826 * median |r_ik - m_p(i)k|` over the prompts with >= 2 samples (the std of the same residuals where
    that is 0): the scale `normalize: prompt` divides by for prompts with few samples, so `w_k * r_k / s_k`
    weighs reward k as a pair's combined score does (the reward-gradient trainer's normalisation).
    """
    raw = np.asarray(raw, dtype=np.float64)
    resid = np.concatenate([raw[idx] - np.median(raw[idx], axis=0) for idx in _repeated_prompts(groups)])
    return _scale(resid)[0]


def prompt_std(raw: np.ndarray, groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The pooled within-prompt standard deviation (D,) of finite raw scores (N, D), `groups[i]` = prompt of row i.

    `sqrt(sum_p sum_i (r_ik - mean_pk)^2 / (n - P))` over the P prompts with >= 2 samples (n rows among them):
    unlike `prompt_scale`'s MAD it does not jump when a reward's scores within a prompt fall in two clusters
    (a word drawn right or as its confusion): the MAD of a few such samples is either the spread inside a
    cluster or half the gap between them, whichever more than half of the residuals fall in.
    """
    raw = np.asarray(raw, dtype=np.float64)
    groups_idx = _repeated_prompts(groups)
    squares = sum(((raw[idx] - raw[idx].mean(axis=0)) ** 2).sum(axis=0) for idx in groups_idx)
    dof = sum(len(idx) for idx in groups_idx) - len(groups_idx)
    return np.sqrt(squares / dof)


def _repeated_prompts(groups: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """The row positions of each prompt with >= 2 samples: what a pooled within-prompt spread is taken over."""
    repeated = [idx for idx in _groups(_group_codes(groups)).values() if len(idx) >= 2]
    if not repeated:
        raise ValueError("a pooled within-prompt spread needs a prompt with >= 2 samples")
    return repeated


def _group_codes(groups: Sequence[Any] | np.ndarray) -> np.ndarray:
    codes: dict[Any, int] = {}
    return np.array([codes.setdefault(g, len(codes)) for g in np.asarray(groups).tolist()], dtype=np.int64)


def _groups(codes: np.ndarray, index: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """{code: positions i with codes[i] == code, in order} (or `index[i]` for those positions)."""
    order = np.argsort(codes, kind="stable")
    uniq, starts = np.unique(codes[order], return_index=True)
    chunks = np.split(order if index is None else index[order], starts[1:])
    return {int(c): chunk for c, chunk in zip(uniq, chunks, strict=True)}


def _scale(resid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column scale of residuals (M, D): 1.4826 * median |resid|, or the std where that is 0.

    Returns (scale (D,), fell_back (D,) bool: the MAD was 0 but the values were not constant).
    """
    mad = MAD_TO_SIGMA * np.median(np.abs(resid), axis=0)
    std = resid.std(axis=0)
    fell_back = (mad == 0) & (std > 0)
    return np.where(mad == 0, std, mad), fell_back


def _normalize(raw: np.ndarray, codes: np.ndarray, mode: str, pool_below: int,
               eps: float) -> tuple[np.ndarray, dict[str, Any]]:
    """z (N, D) from raw (N, D) and group codes (N,); plus counters for the summary (see module doc)."""
    n_dims = raw.shape[1]
    info: dict[str, Any] = {"mode": mode, "eps": eps, "pooled_scale": None, "pooled_scale_prompts": 0,
                            "std_fallbacks": np.zeros(n_dims, dtype=np.int64)}
    if mode == "none" or len(raw) == 0:
        return raw.copy(), info
    if mode == "store":
        resid = raw - np.median(raw, axis=0)  # (N, D)
        scale, fell_back = _scale(resid)
        info["std_fallbacks"] += fell_back
        info["pooled_scale"] = scale.tolist()
        return resid / (scale + eps), info
    if mode != "prompt":
        raise ValueError(f"unknown normalisation mode {mode!r}")

    resid = np.empty_like(raw)  # (N, D): residual from each sample's own prompt median
    groups = list(_groups(codes).values())
    for idx in groups:
        resid[idx] = raw[idx] - np.median(raw[idx], axis=0)
    pool_idx = np.concatenate([idx for idx in groups if len(idx) >= 2] or [np.empty(0, dtype=np.int64)])
    pooled, pooled_fell_back = np.zeros(n_dims), np.zeros(n_dims, dtype=bool)
    if len(pool_idx):
        pooled, pooled_fell_back = _scale(resid[pool_idx])
        info["pooled_scale"] = pooled.tolist()
    z = np.empty_like(raw)
    for idx in groups:
        if len(idx) <= pool_below:
            scale = pooled
            if len(idx) >= 2:
                info["pooled_scale_prompts"] += 1
                info["std_fallbacks"] += pooled_fell_back
        else:
            scale, fell_back = _scale(resid[idx])
            info["std_fallbacks"] += fell_back
        z[idx] = resid[idx] / (scale + eps)
    return z, info


def _candidates(policy: str, combined: np.ndarray,
                oriented: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Candidate pairs of one prompt: (winner (P,), loser (P,)) local indices, and the number of pairs
    that no sample dominates (pareto only).

    `combined` (K,) are the combined scores; `oriented` (K, A) the raw scores of the active dimensions
    times sign(w), so that larger is better on every column.
    """
    k = len(combined)
    if policy == "best_vs_worst":
        order = np.lexsort((np.arange(k), -combined))  # best first; ties in table order
        return order[:1], order[-1:], 0
    i, j = np.triu_indices(k, 1)  # every unordered pair once, i < j
    if policy == "all_above_margin":
        i_wins = combined[i] >= combined[j]
        return np.where(i_wins, i, j), np.where(i_wins, j, i), 0
    if policy != "pareto":
        raise ValueError(f"unknown pair policy {policy!r}")
    diff = oriented[:, None, :] - oriented[None, :, :]  # (K, K, A): row a minus row b
    dominates = (diff >= 0).all(axis=-1) & (diff > 0).any(axis=-1)  # (K, K): a dominates b
    i_wins, j_wins = dominates[i, j], dominates[j, i]
    either = i_wins | j_wins
    win = np.where(i_wins, i, j)[either]
    lose = np.where(i_wins, j, i)[either]
    return win, lose, int(np.count_nonzero(~either))


def _records(rows: list[ScoreRow], dims: list[str], raw: np.ndarray, z: np.ndarray, combined: np.ndarray,
             win: np.ndarray, lose: np.ndarray) -> list[dict[str, Any]]:
    """One flat record per pair (win[p], lose[p]), columns as `pair_columns(dims)`, plain Python values."""
    columns: dict[str, list] = {
        "prompt_id": [rows[i].prompt_id for i in win],
        "chosen_id": [rows[i].sample_id for i in win],
        "rejected_id": [rows[i].sample_id for i in lose],
        "chosen_score": combined[win].tolist(),
        "rejected_score": combined[lose].tolist(),
        "margin": (combined[win] - combined[lose]).tolist(),
    }
    for k, dim in enumerate(dims):
        columns[f"chosen_{dim}"], columns[f"rejected_{dim}"] = raw[win, k].tolist(), raw[lose, k].tolist()
        columns[f"chosen_{dim}_z"], columns[f"rejected_{dim}_z"] = z[win, k].tolist(), z[lose, k].tolist()
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _spread(raw: np.ndarray, codes: np.ndarray) -> dict[str, float | None]:
    """mean / std / min / max of one dimension's valid raw scores, and the mean within-prompt std."""
    if len(raw) == 0:
        return dict.fromkeys(("mean", "std", "min", "max", "within_prompt_std"))
    within = [raw[idx].std() for idx in _groups(codes).values() if len(idx) >= 2]
    return {"mean": float(raw.mean()), "std": float(raw.std()), "min": float(raw.min()),
            "max": float(raw.max()), "within_prompt_std": float(np.mean(within)) if within else None}


def _summary(config: PairsConfig, rows: list[ScoreRow], dims: list[str], weights: dict[str, float],
             raw: np.ndarray, codes: np.ndarray, valid: np.ndarray, excluded: list[dict[str, Any]],
             norm_info: dict[str, Any], counts: dict[str, int], dropped: dict[str, int],
             pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON-serialisable summary; its keys are listed in `build_pairs`."""
    excluded_ids = list(dict.fromkeys(e["sample_id"] for e in excluded))
    counts = {"prompts": len(set(codes.tolist())), "samples": len(rows), "valid_samples": int(valid.sum()),
              "excluded_samples": len(excluded_ids), **counts, "pairs": len(pairs)}
    pooled = norm_info["pooled_scale"]
    norm = {"mode": norm_info["mode"], "eps": norm_info["eps"],
            "pooled_scale": dict(zip(dims, pooled, strict=True)) if pooled is not None else None,
            "pooled_scale_prompts": norm_info["pooled_scale_prompts"],
            "std_fallbacks": {d: int(n) for d, n in zip(dims, norm_info["std_fallbacks"], strict=True)}}
    margins = [p["margin"] for p in pairs]

    warnings = []
    if excluded_ids:
        shown = ", ".join(excluded_ids[:5]) + (", ..." if len(excluded_ids) > 5 else "")
        warnings.append(f"{len(excluded_ids)} sample(s) excluded for non-finite or missing scores: {shown} "
                        "(see 'excluded')")
    if counts["prompts_too_few_samples"]:
        warnings.append(f"{counts['prompts_too_few_samples']} prompt(s) have fewer than 2 valid samples "
                        "and give no pairs")
    if any(norm["std_fallbacks"].values()):
        warnings.append("the MAD was 0 for some prompt/dimension scales (many tied scores); the standard "
                        f"deviation was used instead: {norm['std_fallbacks']}")
    if not pairs:
        warnings.append(f"no pairs kept (dropped: {dropped}); the dataset is empty. Lower min_margin or "
                        "max_dimension_regression, or sample more videos per prompt")
    return {
        "config": config_to_dict(config),
        "dimensions": dims,
        "weights": weights,
        "counts": counts,
        "dropped": dropped,
        "excluded": excluded,
        "excluded_sample_ids": excluded_ids,
        "normalization": norm,
        "score_spread": {d: _spread(raw[valid, k], codes[valid]) for k, d in enumerate(dims)},
        "margin_stats": ({"mean": float(np.mean(margins)), "min": float(min(margins)), "max": float(max(margins))}
                   if margins else None),
        "warnings": warnings,
    }
