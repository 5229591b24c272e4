"""The eval stage: base vs candidate adapters on the SAME prompts and seeds, scored, compared pairwise.

For every prompt and seed, the base model (adapters disabled) and each candidate adapter generate from the
same initial noise; every reward scores every video. Per reward and candidate: means, the paired difference
with a bootstrap 95% CI, and win / tie / loss rates against the base. `trained` rewards are the ones the
adapter was optimised for (their weighted sum is reported as `combined`); `held_out` rewards were not
trained on; `truth` metrics are ground truth the rewards never see (the shapes world's oracle, or a user's
own scorer of the same interface). A trained reward that rises while a held-out reward or a ground-truth
metric falls is flagged as possible reward hacking.
Writes `eval.json` (+ the mp4s of `save_videos` prompts per model for the report, every seed, the prompts
spread over the prompt groups: `rlhf.report_inputs.spread_prompts`) and returns it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import INT_MAX, ConfigError, option
from rlhf.errors import UserError
from rlhf.io import output_path_problem
from rlhf.options import MAX_MICRO_BATCH, ModelOptions, VideoOptions, in_range, uses_guidance
from rlhf.outputs import EVAL_RESULTS, check_output, staged_dir

logger = logging.getLogger("contentv-rlhf")
COMBINED = "combined"
BASE = "base"
MAX_EVAL_SEEDS = 100_000  # seeds per prompt; far beyond any evaluation budget
MAX_BOOTSTRAP_RESAMPLES = 1_000_000  # each resample holds a copy of the paired differences


@dataclass
class EvalConfig(ModelOptions, VideoOptions):
    """`eval`: the model and sampling sections plus candidates, prompts, seeds and rewards."""

    # eval compares the base with every candidate of `adapters`: ModelOptions' single adapter is no option
    # here (init=False keeps it out of __init__, the YAML keys and the flags), only the generator reads it.
    adapter: str | None = dataclasses.field(default=None, init=False)
    adapter_scale: float = dataclasses.field(default=1.0, init=False)
    adapters: list[str] = option([], "Candidate LoRA adapters to compare with the base model (one or more).")
    prompts: str | None = option(None, "Held-out prompt file (.txt/.jsonl/.csv/datasets folder).")
    seeds: int = option(4, "Seeds per prompt; every model uses the same seeds.")
    seed_offset: int = option(100_000, "First evaluation seed (keep evaluation seeds apart from training's).")
    batch_size: int = option(
        4, f"Videos (prompt x seed, across prompts) sampled, decoded and scored together by each model, "
        f"1..{MAX_MICRO_BATCH}; with batch_cfg the transformer runs twice as many rows per forward. Larger batches "
        "use the device better and need more memory; a video's noise comes from its seed alone, so the scores do "
        "not depend on it (up to float rounding).")
    rewards: str | None = option(None, "Rewards YAML of the trained rewards (as given to `score`).")
    held_out_rewards: str | None = option(None, "Rewards YAML of rewards NOT trained on (hacking check).")
    ground_truth: str | None = option(
        None, "Rewards YAML of ground-truth metrics, reported and never trained on (weights are ignored), e.g. "
        "configs/world/ground_truth.yaml: the shapes world's oracle accuracy and cleanliness."
    )
    out: str | None = option(None, "Output directory for eval.json and sample videos (built in a hidden sibling and "
                                   "renamed into place when complete).")
    overwrite: bool = option(False, "Replace an existing eval in `out` (never a folder of another kind).")
    save_videos: int = option(2, "Prompts whose videos (all seeds, every model) are saved for the report, spread "
                                 "over the prompt groups (a shapes-world colour-size combination; any other prompt "
                                 "is a group of its own).")
    tie_tolerance: float = option(0.0, "Score differences within this tolerance count as ties (>= 0).")
    bootstrap_resamples: int = option(
        2000, f"Bootstrap resamples for the confidence intervals (1..{MAX_BOOTSTRAP_RESAMPLES})."
    )

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        VideoOptions.__post_init__(self)
        for name in ("prompts", "rewards", "out"):
            if not getattr(self, name):
                raise ConfigError(name, "is required")
        if not self.adapters:
            raise ConfigError("adapters", "needs at least one candidate adapter directory")
        if problem := output_path_problem(self.out, "dir"):
            raise ConfigError("out", problem)
        in_range("seeds", self.seeds, 1, MAX_EVAL_SEEDS)
        in_range("seed_offset", self.seed_offset, 0, INT_MAX - self.seeds)  # every seed within torch's int64
        in_range("batch_size", self.batch_size, 1, MAX_MICRO_BATCH)
        if self.save_videos < 0:
            raise ConfigError("save_videos", f"must be >= 0, got {self.save_videos}")
        in_range("tie_tolerance", self.tie_tolerance, 0, math.inf)
        # Checked here: the statistics run only after every video has been generated.
        in_range("bootstrap_resamples", self.bootstrap_resamples, 1, MAX_BOOTSTRAP_RESAMPLES)


def _build_rewards(path: str | None, field: str) -> dict:
    from rewards.build import build_scorers
    from rewards.config import load_rewards_config

    return build_scorers(load_rewards_config(path, field)) if path else {}


def run_eval(config: EvalConfig) -> dict[str, Any]:
    import numpy as np
    import torch

    from rewards.build import score_videos
    from rlhf.base_model import check_adapter_base
    from rlhf.generation import VideoGenerator
    from rlhf.io import write_json
    from rlhf.lora import load_adapter, use_adapter
    from rlhf.progress import Progress
    from rlhf.prompts import load_prompts
    from rlhf.report_inputs import spread_prompts
    from rlhf.stats import compare_paired
    from rlhf.video import to_uint8_frames, write_mp4

    out = check_output(config.out, field="field 'out'", kind=EVAL_RESULTS, overwrite=config.overwrite, inputs={
        "model": config.model, "adapter": config.adapters, "prompts": config.prompts, "rewards": config.rewards,
        "held-out rewards": config.held_out_rewards, "ground truth": config.ground_truth})
    prompts = load_prompts(config.prompts)
    if prompts.report():
        logger.warning(prompts.report())
    trained = _build_rewards(config.rewards, "rewards")
    held_out = _build_rewards(config.held_out_rewards, "held_out_rewards")
    truth = _build_rewards(config.ground_truth, "ground_truth")
    for path, others in ((config.held_out_rewards, held_out), (config.ground_truth, truth)):
        overlap = sorted(set(trained) & set(others))
        if overlap:
            raise UserError(f"{path}: scorer name(s) {overlap} also appear in the trained rewards "
                            f"{config.rewards}; a held-out reward or ground-truth metric must not be trained on")
    overlap = sorted(set(held_out) & set(truth))
    if overlap:
        raise UserError(f"{config.ground_truth}: scorer name(s) {overlap} also appear in the held-out rewards "
                        f"{config.held_out_rewards}; give each metric one name")
    scorers = {**trained, **held_out, **truth}

    for path in config.adapters:  # before any video: an adapter trained on another base is refused
        check_adapter_base(path, config.model, family=config.family)
    generator = VideoGenerator(config, max_sequence_length=config.max_sequence_length)
    candidates = {f"candidate{i}": str(Path(path)) for i, path in enumerate(config.adapters)}
    for name, path in candidates.items():
        load_adapter(generator.transformer, path, adapter_name=name)
    generator.transformer.requires_grad_(False)
    guided = uses_guidance(config.guidance)
    texts = prompts.prompts + ([config.negative_prompt] if guided else [])
    embeds = generator.encode_prompts(texts)
    if config.free_text_encoders:
        generator.free_text_encoders()
    uncond = embeds.select(len(prompts.prompts)) if guided else None
    seeds = [config.seed_offset + i for i in range(config.seeds)]
    saved = set(spread_prompts(prompts.prompts, config.save_videos))  # one group after another

    # Every (prompt, seed), prompt-major, cut into batches of `batch_size` that may span prompts.
    items = [(p_index, s_index) for p_index in range(len(prompts.prompts)) for s_index in range(len(seeds))]
    batches = [items[start:start + config.batch_size] for start in range(0, len(items), config.batch_size)]

    with staged_dir(out, "the eval") as staging:  # a killed eval leaves no half-written folder
        models = [BASE, *candidates]
        # scores[model][reward] -> (prompts, seeds)
        scores = {m: {r: np.zeros((len(prompts.prompts), len(seeds))) for r in scorers} for m in models}
        videos: dict[str, dict[str, list[str]]] = {m: {} for m in models}
        with Progress(total=len(items) * len(models), desc="eval", unit="video") as progress:
            for batch in batches:
                cond = embeds.select([p_index for p_index, _ in batch])  # one row per video
                batch_seeds = [seeds[s_index] for _, s_index in batch]
                texts = [prompts.prompts[p_index] for p_index, _ in batch]
                for model in models:
                    use_adapter(generator.transformer, None if model == BASE else model)
                    latents = generator.sample_latents(cond, uncond, batch_seeds, config, progress=False)
                    video = generator.decode(latents)  # (B, 3, T, H, W) in [-1, 1]
                    frames = ((video + 1) / 2).permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W) in [0, 1]
                    with torch.no_grad():
                        batch_scores = score_videos(scorers, frames, texts, batch_size=len(batch))
                    for reward, values in batch_scores.items():
                        for row, (p_index, s_index) in enumerate(batch):
                            scores[model][reward][p_index, s_index] = values[row].item()
                    for row, (p_index, s_index) in enumerate(batch):
                        if p_index in saved:
                            path = staging / "videos" / f"{model}_p{p_index:03d}_seed{seeds[s_index]}.mp4"
                            write_mp4(path, to_uint8_frames(video[row]), fps=config.fps)
                            videos[model].setdefault(str(p_index), []).append(str(path.relative_to(staging)))
                    progress.update(len(batch))

        def combined(model: str) -> np.ndarray:
            return sum(weight * scores[model][name] for name, (_, weight) in trained.items())

        comparisons, warnings = {}, []
        # A weight-0 entry of the trained rewards is only logged: it did not shape the pairs or gradients.
        rewards_of = {**{r: "trained" if w else "logged" for r, (_, w) in trained.items()},
                      **{r: "held_out" for r in held_out}, **{r: "truth" for r in truth}, COMBINED: "trained"}
        for model in candidates:
            rows = {}
            for reward in [COMBINED, *scorers]:
                base = combined(BASE) if reward == COMBINED else scores[BASE][reward]
                cand = combined(model) if reward == COMBINED else scores[model][reward]
                rows[reward] = compare_paired(base.ravel(), cand.ravel(), config.tie_tolerance,
                                              config.bootstrap_resamples).to_dict()
            rising = [r for r in trained if rewards_of[r] == "trained" and rows[r]["ci_low"] > 0]
            falling = [r for r in [*held_out, *truth] if rows[r]["ci_high"] < 0]
            if rising and falling:
                warnings.append(f"{model} ({candidates[model]}): trained reward(s) {', '.join(rising)} rose while "
                                f"held-out reward(s) or ground truth {', '.join(falling)} fell: possible reward hacking")
            comparisons[model] = rows

        result = {
            "model": str(config.model),
            "candidates": candidates,
            "prompts": prompts.prompts,
            "seeds": seeds,
            "rewards": rewards_of,
            "weights": {name: weight for name, (_, weight) in trained.items()},
            "scores": {m: {r: v.tolist() for r, v in per.items()} for m, per in scores.items()},
            "comparisons": comparisons,
            "warnings": warnings,
            "videos": videos,
            "sampling": {k: getattr(config, k) for k in ("frames", "height", "width", "steps", "guidance", "fps")},
        }
        write_json(staging / "eval.json", result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The comparison table printed on the terminal."""
    lines = []
    for model, rows in result["comparisons"].items():
        lines.append(f"{model}: {result['candidates'][model]}  (n = {next(iter(rows.values()))['n']} prompt x seed)")
        lines.append(f"  {'reward':<20} {'kind':<8} {'base':>9} {'tuned':>9} {'diff':>9} {'95% CI':>21} "
                     f"{'win':>6} {'tie':>6}")
        for reward, row in rows.items():
            ci = f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
            lines.append(f"  {reward:<20} {result['rewards'][reward]:<8} {row['base_mean']:>9.4f} "
                         f"{row['candidate_mean']:>9.4f} {row['mean_diff']:>+9.4f} {ci:>21} "
                         f"{row['win_rate']:>6.1%} {row['tie_rate']:>6.1%}")
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    return "\n".join(lines)
