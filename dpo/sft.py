"""SFT trainer (rejection-sampling fine-tuning, RAFT: Dong et al. 2023): LoRA on the ContentV transformer with the
plain flow-matching loss on each prompt's best samples of a scored rollout store.

"Best" is the combined reward score that `pairs` ranks by (`rewards.pairs.combine_scores`: each reward normalised,
then weighted); per prompt the `top_k` highest are kept (ties in store order), optionally only those at or above
`min_score`. Samples with a non-finite or missing score are never selected (as in `pairs`). The selection is
written to `RUN/logs/selected_samples.jsonl` and summarised in `summary.json` ("selection"), and its digest is
recorded in every checkpoint: a resume after the store was rescored is refused.

Supports: the Flow-DPO trainer's machinery (rlhf/training.py: accelerate single process and DDP, tested here on 2
CPU processes; FSDP2 and DeepSpeed ZeRO-2 through the same calls, tested for dpo and reward_gradient only; bf16
autocast, gradient checkpointing and accumulation, clipping, schedules, 8-bit AdamW, quantised base, non-finite
step skipping, atomic checkpoints with exact resume, `max_seconds`, metrics.jsonl + trackers).

Assumptions: the store's latents and prompt embeddings were made by the base model being tuned; the text encoders
and the VAE are never loaded. There is no reference model: the loss does not look at the base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo.data import check_store_files, check_store_fits, epoch_batch, store_family
from dpo.losses import flow_matching_loss, sample_sigmas
from dpo.sft_config import SFTConfig
from dpo.trainer import velocity
from rewards.pairs import ScoreCombination, ScoreRow, combine_scores
from rlhf import io
from rlhf.config import ConfigError
from rlhf.errors import UserError
from rlhf.models.family import family_for
from rlhf.progress import Progress
from rlhf.sampling import FlowSchedule, PromptEmbeds
from rlhf.training import TrainingRun, step_generator
from rollouts.store import RolloutStore

logger = logging.getLogger("contentv-rlhf")
SELECTION_FILE = "selected_samples.jsonl"  # in RUN/logs/


@dataclass(frozen=True)
class SelectedSample:
    sample_id: str
    prompt_id: str
    rank: int  # within its prompt: 0 = the highest combined score
    score: float  # the combined score S
    scores: dict[str, float]  # raw score of every dimension


@dataclass
class SampleBatch:
    latents: torch.Tensor  # (B, C, T, H, W)
    text: PromptEmbeds  # (B, L, D), (B, P)
    sample_ids: list[str]


def select_best(table: Iterable[ScoreRow | Mapping[str, Any]], combination: ScoreCombination, top_k: int,
                min_score: float | None = None) -> tuple[list[SelectedSample], dict[str, Any]]:
    """Per prompt, the `top_k` valid samples with the highest combined score S (ties in table order), those with
    S >= `min_score` when it is set; grouped by prompt in table order, best first. Returns them and a summary:
    counts, effective weights, normalisation mode, mean S of the selected and of all valid samples."""
    scores = combine_scores(table, combination)
    combined, codes = scores.combined, scores.codes
    valid = np.flatnonzero(scores.valid)  # table indices
    order = valid[np.lexsort((valid, -combined[valid], codes[valid]))]  # by prompt, best first, then table order
    selected: list[SelectedSample] = []
    below, rank, previous = 0, 0, -1
    for i in order.tolist():
        rank = rank + 1 if codes[i] == previous else 0
        previous = codes[i]
        if rank >= top_k:
            continue
        if min_score is not None and combined[i] < min_score:
            below += 1
            continue
        row = scores.rows[i]
        selected.append(SelectedSample(row.sample_id, row.prompt_id, rank, float(combined[i]),
                                       {d: float(v) for d, v in zip(scores.dimensions, scores.raw[i], strict=True)}))
    excluded = list(dict.fromkeys(e["sample_id"] for e in scores.excluded))
    summary = {
        "samples": len(selected), "prompts": len({s.prompt_id for s in selected}),
        "store_samples": len(scores.rows), "store_prompts": len(scores.prompt_ids),
        "excluded_samples": len(excluded), "below_min_score": below, "top_k": top_k, "min_score": min_score,
        "weights": scores.weights, "normalize": combination.normalize,
        "mean_score_selected": float(np.mean([s.score for s in selected])) if selected else None,
        "mean_score_valid": float(combined[valid].mean()) if len(valid) else None,
    }
    if not selected:
        if excluded:
            first = scores.excluded[0]
            why = (f"{len(excluded)} of {len(scores.rows)} sample(s) have a non-finite or missing score (e.g. "
                   f"{first['sample_id']}: {first['dimension']} {first['value']})")
        else:
            why = f"none of the {len(valid)} scored sample(s) has a combined score >= min_score {min_score:g}"
        raise UserError(f"no sample selected: {why}; rescore the store or lower min_score")
    return selected, summary


class SampleData:
    """The selected samples joined with the rollout store: cached latents and prompt embeddings, no model needed.
    Batches are drawn by the same stateless rule as the pairs (`epoch_batch`): exact resume, any process count."""

    def __init__(self, store: RolloutStore, selected: list[SelectedSample]):
        self.store, self.selected = store, selected

    def __len__(self) -> int:
        return len(self.selected)

    def digest(self) -> str:
        """sha256 of the selection (ids and scores, in order): the data a run trains on, recorded in checkpoints."""
        return hashlib.sha256(json.dumps([dataclasses.asdict(s) for s in self.selected]).encode()).hexdigest()

    def check_files(self) -> None:
        check_store_files(self.store, (s.sample_id for s in self.selected), (s.prompt_id for s in self.selected),
                          "the selected samples")

    def batches_per_epoch(self, batch_size: int, world_size: int) -> int:
        count = len(self) // (batch_size * world_size)
        if count == 0:
            raise UserError(f"{self.store.root}: {len(self)} selected sample(s) are fewer than one global batch "
                            f"(batch_size {batch_size} x {world_size} process(es)); raise top_k or lower batch_size")
        return count

    def indices(self, micro_batch: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
        self.batches_per_epoch(batch_size, world_size)  # raises unless one global batch fits
        return epoch_batch(len(self), micro_batch, batch_size, rank, world_size, seed)

    def batch(self, indices: list[int]) -> SampleBatch:
        chosen = [self.selected[i] for i in indices]
        latents = torch.stack([self.store.load_sample(s.sample_id)["latents"] for s in chosen])  # (B, C, T, H, W)
        text = PromptEmbeds.cat([self.store.load_embeds(s.prompt_id) for s in chosen])
        return SampleBatch(latents, text, [s.sample_id for s in chosen])

    def write(self, path: Path) -> None:
        io.write_text(path, "".join(io.dumps(dataclasses.asdict(s)) + "\n" for s in self.selected))


def sft_step(run: TrainingRun, batch: SampleBatch, config: SFTConfig, schedule: FlowSchedule,
             generator: torch.Generator, guidance: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics for one micro-batch of selected samples (the backward pass is the caller's)."""
    device, dtype = run.device, run.unwrapped.dtype
    # 1. One noise and one sigma per sample.
    noise = torch.randn(batch.latents.shape, generator=generator)
    sigmas = sample_sigmas(batch.latents.shape[0], generator, config.sigma_sampler, config.logit_mean,
                           config.logit_std, schedule.shift if config.apply_shift else 1.0)
    # 2. Noised latents x_s = (1 - s) x0 + s eps: (B, C, T, H, W).
    x0 = batch.latents.to(device, torch.float32)
    noise, sigmas = noise.to(device), sigmas.to(device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    x_t = ((1 - s) * x0 + s * noise).to(dtype)
    text = batch.text.to(device, dtype)
    # 3. The policy's velocity, with gradients.
    v = velocity(run.policy, x_t, sigmas, text, schedule.num_train_timesteps, guidance)  # guidance: dpo.trainer.velocity
    # 4. The flow-matching loss against the target eps - x0.
    return flow_matching_loss(v, noise, x0)


def selection_of(config: SFTConfig, store: RolloutStore) -> tuple[list[SelectedSample], dict[str, Any]]:
    """The store's best samples under the config's combination and top_k / min_score."""
    from rewards.scoring import score_table, score_weights

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(ScoreCombination)}
    # Without explicit weights, each dimension keeps the weight it had in the rewards config that scored it (as
    # `pairs` does).
    fields["weights"] = fields["weights"] or score_weights(store)
    try:
        combination = ScoreCombination(**fields)
    except ConfigError as err:  # only the store's recorded weights can be bad here: the config's were checked
        raise UserError(f"{store.scores_dir}: the weights recorded by `score` {err.message}; pass --weights") from None
    return select_best(score_table(store), combination, config.top_k, config.min_score)


def train_sft(config: SFTConfig) -> Path:
    """Train a LoRA adapter with the flow-matching loss on the store's best samples; returns the adapter directory."""
    store = RolloutStore(config.store)
    store.read_meta()  # a folder that is not a store says so before the scores are looked for
    selected, selection = selection_of(config, store)
    data = SampleData(store, selected)
    data.check_files()
    model_dir = config.model or store.settings["model"]
    check_store_fits(store, selected[0].prompt_id, model_dir)
    family = store_family(store)  # the family the store's latents were made with
    schedule = family_for(model_dir, family).schedule(Path(model_dir))  # it reads (or refuses) the scheduler

    run = TrainingRun(config, config, config.device, config)
    run.inputs = {"selection_sha256": data.digest()}  # a rescored store selects other data: a resume must see it
    data.batches_per_epoch(config.batch_size, run.accelerator.num_processes)  # at least one full batch
    run.prepare(run.load_policy(model_dir, config.dtype, quantize=config.quantize, family=family))
    accelerator = run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    if run.is_main:
        data.write(run.logs_dir / SELECTION_FILE)  # after prepare: an overwrite has set the old logs aside
        logger.info("SFT: %d samples of %d prompts (top %d by combined score) from %s, %d steps x %d micro-batch(es) "
                    "x %d sample(s) x %d process(es), %s", len(data), selection["prompts"], config.top_k, store.root,
                    config.max_steps, config.gradient_accumulation_steps, config.batch_size, world, run.layout)

    progress = Progress(total=config.max_steps, initial=run.step, desc="train sft", unit="step", enabled=run.is_main)
    with progress:
        for step in run.steps():
            start = time.perf_counter()
            totals: dict[str, float] = {}
            finite, sample_ids = True, []
            with run.counting():
                for micro in range(config.gradient_accumulation_steps):
                    index = step * config.gradient_accumulation_steps + micro
                    batch = data.batch(data.indices(index, config.batch_size, rank, world, config.seed))
                    sample_ids += batch.sample_ids
                    last = micro == config.gradient_accumulation_steps - 1
                    with accelerator.autocast(), run.accumulation(last):
                        loss, metrics = sft_step(run, batch, config, schedule, step_generator(config.seed, index, rank),
                                                 store.settings.get("guidance"))
                        run.backward(loss)
                    finite &= bool(torch.isfinite(loss))
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) / config.gradient_accumulation_steps
            run.end_step(step, totals, finite, sample_ids, start, progress, {"loss": "loss"})
    return run.finish({"method": "sft", "store": str(store.root), "model": model_dir,
                       "selection": {**selection, "file": f"logs/{SELECTION_FILE}"}})
