"""Flow-DPO trainer: LoRA on the transformer (any model family) from preference pairs of a rollout store.

Supports: accelerate (single process, DDP on CUDA/NPU, gloo on CPU, FSDP2, DeepSpeed ZeRO-2), bf16 autocast,
gradient checkpointing, gradient accumulation, grad-norm clipping, warmup + constant/linear/cosine schedules,
AdamW (8-bit with bitsandbytes), sigmoid/hinge/IPO losses, SFT regulariser, margin-weighted pairs, non-finite
step skipping, atomic checkpoints with exact resume, metrics.jsonl + tensorboard/wandb.

Assumptions: the pairs come from one rollout store whose latents and prompt embeddings were made by the
same base model; the text encoders and the VAE are never loaded. The reference model is the policy with
its adapter disabled (no second copy of the weights).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from dpo.config import DPOConfig
from dpo.data import PairBatch, PairData, pairs_store_path, store_family
from dpo.losses import flow_dpo_loss, flow_matching_error, sample_sigmas
from rlhf.errors import UserError
from rlhf.models.family import family_for
from rlhf.models.family import velocity as family_velocity
from rlhf.progress import Progress
from rlhf.sampling import FlowSchedule, PromptEmbeds
from rlhf.training import TrainingRun, step_generator
from rollouts.store import RolloutStore

logger = logging.getLogger("contentv-rlhf")


def velocity(model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, text: PromptEmbeds,
             num_train_timesteps: int, guidance: float | None = None) -> torch.Tensor:
    """The transformer's prediction at `sigmas` (B,), called the way its model family calls it; a
    guidance-distilled model embeds `guidance` (the scale the store's samples were drawn at)."""
    return family_velocity(model, latents, sigmas * num_train_timesteps, text, guidance=guidance)


def dpo_step(run: TrainingRun, batch: PairBatch, config: DPOConfig, schedule: FlowSchedule,
             generator: torch.Generator, guidance: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics for one micro-batch of pairs (the backward pass is the caller's)."""
    device, dtype = run.device, run.unwrapped.dtype
    pairs = batch.latents_w.shape[0]
    # 1. One noise and one sigma per pair, shared by winner and loser.
    noise = torch.randn(batch.latents_w.shape, generator=generator)
    sigmas = sample_sigmas(pairs, generator, config.sigma_sampler, config.logit_mean, config.logit_std,
                           schedule.shift if config.apply_shift else 1.0)
    # 2. Winner and loser stacked into one batch: (2B, C, T, H, W).
    x0 = torch.cat([batch.latents_w, batch.latents_l]).to(device, torch.float32)
    noise = torch.cat([noise, noise]).to(device)
    sigmas = torch.cat([sigmas, sigmas]).to(device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    x_t = ((1 - s) * x0 + s * noise).to(dtype)
    text = PromptEmbeds.cat([batch.text, batch.text]).to(device, dtype)
    # 3. Reference errors first, without gradients (switching adapters must not touch the policy's graph),
    #    then policy errors with gradients.
    with torch.no_grad(), run.reference_mode() as reference:
        ref_err = flow_matching_error(velocity(reference, x_t, sigmas, text, schedule.num_train_timesteps, guidance),
                                      noise, x0)
    policy_err = flow_matching_error(velocity(run.policy, x_t, sigmas, text, schedule.num_train_timesteps, guidance),
                                     noise, x0)
    # 4. The loss on (winner, loser) halves.
    return flow_dpo_loss(
        policy_err[:pairs], policy_err[pairs:], ref_err[:pairs], ref_err[pairs:], beta=config.beta,
        loss_type=config.loss_type, sft_weight=config.sft_weight,
        pair_weights=batch.weights.to(device) if config.pair_weighting != "none" else None,
    )


def train_dpo(config: DPOConfig) -> Path:
    """Train a LoRA adapter with Flow-DPO; returns the final adapter directory."""
    pairs_dir = Path(config.pairs)
    if not pairs_dir.is_dir():
        raise UserError(f"{pairs_dir}: pairs dataset not found (a directory written by `contentv-rlhf pairs`)")
    store_path = config.store or pairs_store_path(pairs_dir)
    if not store_path:
        raise UserError(f"{pairs_dir}: records no rollout store; pass --store")
    store = RolloutStore(store_path)
    data = PairData(pairs_dir, store, config.pair_weighting)
    data.check_files()
    model_dir = config.model or store.settings["model"]
    data.check_fits(model_dir)
    family = store_family(store)  # the family the store's latents were made with
    schedule = family_for(model_dir, family).schedule(Path(model_dir))  # it reads (or refuses) the scheduler

    run = TrainingRun(config, config, config.device, config)
    run.inputs = {"pairs_sha256": data.digest()}  # pairs rebuilt in place are other data: a resume must see it
    data.batches_per_epoch(config.batch_size, run.accelerator.num_processes)  # at least one full batch
    run.prepare(run.load_policy(model_dir, config.dtype, config.init_adapter, config.reference == "init",
                                quantize=config.quantize, family=family))
    accelerator = run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    if run.is_main:
        logger.info("Flow-DPO: %d pairs from %s, %d steps x %d micro-batch(es) x %d pair(s) x %d process(es), %s",
                    len(data), store.root, config.max_steps, config.gradient_accumulation_steps,
                    config.batch_size, world, run.layout)

    progress = Progress(total=config.max_steps, initial=run.step, desc="train dpo", unit="step",
                        enabled=run.is_main)
    with progress:
        for step in run.steps():
            start = time.perf_counter()
            totals: dict[str, float] = {}
            finite, pair_ids = True, []
            with run.counting():
                for micro in range(config.gradient_accumulation_steps):
                    index = step * config.gradient_accumulation_steps + micro
                    batch = data.batch(data.indices(index, config.batch_size, rank, world, config.seed))
                    pair_ids += batch.pair_ids
                    last = micro == config.gradient_accumulation_steps - 1
                    with accelerator.autocast(), run.accumulation(last):
                        loss, metrics = dpo_step(run, batch, config, schedule, step_generator(config.seed, index, rank),
                                                 store.settings.get("guidance"))
                        run.backward(loss)
                    finite &= bool(torch.isfinite(loss))
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) / config.gradient_accumulation_steps
            run.end_step(step, totals, finite, pair_ids, start, progress, {"loss": "loss", "acc": "implicit_accuracy"})
    return run.finish({"method": "dpo", "pairs": str(pairs_dir), "store": str(store.root), "model": model_dir})
