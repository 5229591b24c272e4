"""The eval stage: base vs candidate adapters on the SAME prompts and seeds, scored, compared pairwise.

For every prompt and seed, the base model (adapters disabled) and each candidate adapter generate from the
same initial noise; every reward scores every video. Per reward and candidate: means, the paired difference
with a bootstrap 95% CI, and win / tie / loss rates against the base. `trained` rewards are the ones the
adapter was optimised for (their weighted sum is reported as `combined`); `held_out` rewards were not
trained on; `truth` metrics are ground truth the rewards never see (the shapes world's oracle, or a user's
own scorer of the same interface); `vbench` dimensions are VBench's formulas (`rlhf.vbench`: subject and
background consistency, temporal flickering, dynamic degree, aesthetic quality) on the same videos, compared the
same way. A trained reward that rises while a held-out reward, a ground-truth metric or a VBench dimension falls
(95% CIs excluding zero: `hacking_warning`) is flagged as possible reward hacking.
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
VBENCH_FIELDS = ("vbench_dino", "vbench_dino_heads", "vbench_clip", "vbench_clip_large", "vbench_aesthetic_head",
                 "vbench_raft")


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
    vbench: list[str] = option(
        [], "VBench dimensions reported beside the rewards (VBench's formulas, models from local weights), "
        "comma-separated: subject_consistency, background_consistency, temporal_flickering, dynamic_degree, "
        "aesthetic_quality (motion_smoothness and imaging_quality are not supported: README 'VBench dimensions').")
    vbench_dino: str | None = option(None, "DINO ViT-B/16 weights for subject_consistency "
                                           "(dino_vitbase16_pretrain.pth).")
    vbench_dino_heads: int | None = option(None, "Attention heads of the DINO ViT (default: width / 64, as every "
                                                 "DINO ViT).")
    vbench_clip: str | None = option(None, "OpenAI CLIP ViT-B/32 weights for background_consistency (ViT-B-32.pt, "
                                           "TorchScript or state dict).")
    vbench_clip_large: str | None = option(None, "OpenAI CLIP ViT-L/14 weights for aesthetic_quality (ViT-L-14.pt, "
                                                 "TorchScript or state dict).")
    vbench_aesthetic_head: str | None = option(None, "LAION v1 aesthetic head for aesthetic_quality "
                                                     "(sa_0_4_vit_l_14_linear.pth).")
    vbench_raft: str | None = option(None, "RAFT-large weights for dynamic_degree: VBench's raft-things.pth or "
                                           "torchvision's raft_large_C_T_V1-22a6c225.pth.")

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
        self._check_vbench()

    def _check_vbench(self) -> None:
        from rlhf.vbench import WEIGHT_FIELDS, unknown_dimension_problem

        if problem := unknown_dimension_problem(self.vbench):
            raise ConfigError("vbench", problem)
        for name, dimensions in WEIGHT_FIELDS.items():
            needed_by = [d for d in dimensions if d in self.vbench]
            if needed_by and not getattr(self, name):
                raise ConfigError(name, f"is required by vbench dimension {needed_by[0]}")
        if self.vbench_dino_heads is not None and self.vbench_dino_heads < 1:
            raise ConfigError("vbench_dino_heads", f"must be >= 1, got {self.vbench_dino_heads}")
        # VBench's RAFT divides by zero on correlation levels of 1 px: frames padded to multiples of 8 must be
        # at least 128 px on each side (torchvision's RAFT refuses smaller ones).
        padded = min(self.height + (-self.height) % 8, self.width + (-self.width) % 8)
        if "dynamic_degree" in self.vbench and padded < 128:
            raise ConfigError("vbench", f"dynamic_degree needs frames of at least 128 x 128 pixels (RAFT), got "
                                        f"{self.height} x {self.width}")


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
    from rlhf.vbench import build_dimensions, vbench_frames
    from rlhf.video import to_scorer_frames, to_uint8_frames, write_mp4

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
    clash = sorted(set(scorers) & set(config.vbench))
    if clash:
        raise UserError(f"field 'vbench': {clash} is also the name of a reward; rename the reward")
    dimensions = build_dimensions(config.vbench, fps=config.fps, **{f: getattr(config, f) for f in VBENCH_FIELDS})

    for path in config.adapters:  # before any video: an adapter trained on another base is refused
        check_adapter_base(path, config.model, family=config.family)
    generator = VideoGenerator(config, max_sequence_length=config.max_sequence_length)
    for dimension in dimensions.values():
        dimension.to(generator.device)
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
        metrics = [*scorers, *dimensions]
        scores = {m: {r: np.zeros((len(prompts.prompts), len(seeds))) for r in metrics} for m in models}
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
                    frames = to_scorer_frames(video)  # (B, T, 3, H, W) in [0, 1]
                    with torch.no_grad():
                        batch_scores = score_videos(scorers, frames, texts, batch_size=len(batch))
                    for reward, values in batch_scores.items():
                        for row, (p_index, s_index) in enumerate(batch):
                            scores[model][reward][p_index, s_index] = values[row].item()
                    for name, dimension in dimensions.items():  # VBench scores one video at a time
                        for row, frames255 in enumerate(vbench_frames(video)):  # (T, 3, H, W) 0..255
                            p_index, s_index = batch[row]
                            scores[model][name][p_index, s_index] = dimension(frames255)
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
                      **{r: "held_out" for r in held_out}, **{r: "truth" for r in truth},
                      **{d: "vbench" for d in dimensions}, COMBINED: "trained"}
        for model in candidates:
            rows = {}
            for reward in [COMBINED, *metrics]:
                base = combined(BASE) if reward == COMBINED else scores[BASE][reward]
                cand = combined(model) if reward == COMBINED else scores[model][reward]
                rows[reward] = compare_paired(base.ravel(), cand.ravel(), config.tie_tolerance,
                                              config.bootstrap_resamples).to_dict()
            if warning := hacking_warning(rows, rewards_of):
                warnings.append(f"{model} ({candidates[model]}): {warning}")
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
            "vbench": {"dimensions": list(dimensions), "weights": {f: getattr(config, f) for f in VBENCH_FIELDS
                                                                    if getattr(config, f) is not None}},
        }
        write_json(staging / "eval.json", result)
    return result


def hacking_warning(rows: dict[str, dict[str, float]], kinds: dict[str, str]) -> str | None:
    """The reward-hacking guard: a sentence when a trained reward rose (95% CI of the paired difference above 0)
    while a held-out reward, ground-truth metric or VBench dimension fell (CI below 0; every VBench dimension is
    higher-is-better), else None. `rows` are one candidate's comparisons, `kinds` each name's kind."""
    rising = [r for r, row in rows.items() if kinds.get(r) == "trained" and r != COMBINED and row["ci_low"] > 0]
    falling = {kind: [r for r, row in rows.items() if kinds.get(r) == kind and row["ci_high"] < 0]
               for kind in ("held_out", "truth", "vbench")}
    if not rising or not any(falling.values()):
        return None
    named = {"held_out": "held-out reward(s)", "truth": "ground truth", "vbench": "VBench dimension(s)"}
    fell = "; ".join(f"{named[kind]} {', '.join(names)}" for kind, names in falling.items() if names)
    return f"trained reward(s) {', '.join(rising)} rose while {fell} fell: possible reward hacking"


def format_table(result: dict[str, Any]) -> str:
    """The comparison table printed on the terminal."""
    lines = []
    for model, rows in result["comparisons"].items():
        lines.append(f"{model}: {result['candidates'][model]}  (n = {next(iter(rows.values()))['n']} prompt x seed)")
        lines.append(f"  {'reward':<24} {'kind':<8} {'base':>9} {'tuned':>9} {'diff':>9} {'95% CI':>21} "
                     f"{'win':>6} {'tie':>6}")
        for reward, row in rows.items():
            ci = f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
            lines.append(f"  {reward:<24} {result['rewards'][reward]:<8} {row['base_mean']:>9.4f} "
                         f"{row['candidate_mean']:>9.4f} {row['mean_diff']:>+9.4f} {ci:>21} "
                         f"{row['win_rate']:>6.1%} {row['tie_rate']:>6.1%}")
    lines += [f"WARNING: {w}" for w in result["warnings"]]
    return "\n".join(lines)
