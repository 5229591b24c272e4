"""DiffusionNFT trainer (Zheng et al. 2025, "Online Diffusion Reinforcement with Forward Process"): online LoRA
training from rewards through the flow-matching loss, with no likelihoods and no sampling trajectories.

A round samples `group_size` videos for each of `prompts_per_round` prompts with the OLD policy (the LoRA weights
`old`, a slowly following copy of the trained ones): the ODE, `steps` Euler steps at `guidance`, any sampler
would do, and only the clean latents are kept. The decoded videos are scored with the rewards YAML; each reward is
normalised within its prompt's group and the weighted sum, clipped to +-advantage_clip, is the advantage A
(`dpo.losses.group_advantages`, as GRPO), turned into an optimality probability r = A / (2 clip) + 1/2 in
[0, 1]. Then `updates_per_round` optimiser steps each take an equal share of the round's videos, re-noise every
clean sample x0 at `train_timesteps` of the sampling schedule's noise levels (drawn without repeats, fresh
noise each) and minimise `dpo.losses.nft_loss`:

    v+ = beta v + (1 - beta) v_old        v- = (1 + beta) v_old - beta v        x0± = x_s - s v±
    loss = clip mean_B [r L+ + (1 - r) L-] / beta + kl_weight mean (v - v_base)^2,   L± = |x0± - x0|^2 / w±

with v the policy's conditional velocity (CFG-free training), v_old the old policy's and v_base the base's
(adapter disabled), w± the adaptive weights. At the start of every round after the first, the old policy moves
towards the trained one, old <- d old + (1 - d) policy, d = min((step - old_decay_start) x old_decay_rate,
old_decay_max) (0 before old_decay_start).

Rounds, their prompts, the order of their videos and every noise depend only on (seed, round, video slot), never
on the process count (`dpo.rounds`). Checkpoints fall between rounds and carry the old policy
(`trainer_tensors.safetensors`), so a resumed run samples and trains exactly as an uninterrupted one. Supports
several rewards (weight-0 ones are logged only; no gradients through rewards, so any scorer works), bf16
autocast, gradient checkpointing, grad-norm clipping, warmup + schedules, non-finite step skipping,
metrics.jsonl + tensorboard/wandb (rlhf/training.py); single process and DDP (the policy's forwards bypass the
DDP wrapper and the LoRA gradients are averaged explicitly, as GRPO).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo.losses import nft_loss, optimality_probability
from dpo.nft_config import NFTConfig
from dpo.reward_gradient import FrozenParts, average_gradients, decode_video_frames
from dpo.rounds import assign_advantages, prompts_of_rounds, round_blocks, round_prompts, start_round_run
from rewards.build import score_videos
from rlhf import devices
from rlhf.models.family import transformer_family
from rlhf.progress import Progress
from rlhf.prompts import prompt_id
from rlhf.sampling import PromptEmbeds, denoise, predict_velocity
from rlhf.training import TrainingRun, step_generator

logger = logging.getLogger("contentv-rlhf")
OLD_PREFIX = "old."  # the old policy's tensors in the checkpoint: OLD_PREFIX + the LoRA parameter's name


@dataclass
class Chunk:
    """One micro-batch of a round's videos on this process: sampled together, trained together."""

    slots: list[int]
    prompts: list[int]  # prompt index of each video
    latents: torch.Tensor  # (B, C, T, H, W) float32 CPU: the clean samples
    rewards: torch.Tensor  # (B, K) raw scores, one column per scorer
    advantages: torch.Tensor | None = None  # (B,)


@dataclass
class Round:
    updates: list[list[Chunk]]  # this process's chunks, per update
    metrics: dict[str, float]  # reward statistics of the whole round (all processes)


# ---- the old policy ----------------------------------------------------------------------------------------
OldWeights = list[tuple[torch.nn.Parameter, torch.Tensor]]  # (trained LoRA parameter, its old value)


@contextlib.contextmanager
def old_policy(old: OldWeights) -> Iterator[None]:
    """The policy's LoRA weights replaced by the old policy's for the block (no gradients), restored after."""
    with torch.no_grad():
        trained = [param.detach().clone() for param, _ in old]
        for param, value in old:
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for (param, _), value in zip(old, trained, strict=True):
                param.copy_(value)


@torch.no_grad()
def follow_policy(old: OldWeights, decay: float) -> None:
    """old <- decay old + (1 - decay) policy, for every LoRA weight."""
    for param, value in old:
        value.mul_(decay).add_(param.detach(), alpha=1.0 - decay)


# ---- sampling a round --------------------------------------------------------------------------------------
@torch.no_grad()
def sample_chunk(run: TrainingRun, parts: FrozenParts, config: NFTConfig, round_index: int, slots: list[int],
                 prompts: list[int]) -> Chunk:
    """Sample videos `slots` with the model as it is (the ODE, CFG at `guidance`), decode and score them."""
    model, device = run.unwrapped, run.device
    shape = transformer_family(model).latent_shape(config.frames, config.height, config.width, model.config)
    noise = torch.stack([torch.randn(shape, generator=step_generator(config.seed, round_index, slot))
                         for slot in slots]).to(device)  # per video: the same under any batching
    cond = parts.text.select(prompts).to(device, model.dtype)
    uncond = parts.negative.to(device, model.dtype) if parts.negative is not None else None
    with run.accelerator.autocast():
        latents = denoise(model, noise, parts.schedule.sigmas(config.steps), cond, uncond, config.guidance,
                          config.batch_cfg, parts.schedule.num_train_timesteps, guidance_scale_2=config.guidance_2)
    video = decode_video_frames(parts.vae, latents, list(range(config.frames)))  # (B, F, 3, H, W) in [0, 1]
    scores = score_videos(parts.scorers, video, [parts.prompts[p] for p in prompts], batch_size=len(slots))
    return Chunk(slots, prompts, latents.float().cpu(), torch.stack([scores[k].double() for k in parts.scorers], 1))


def sample_round(run: TrainingRun, parts: FrozenParts, config: NFTConfig, round_index: int, old: OldWeights
                 ) -> Round:
    """This process's share of round `round_index`, sampled by the old policy, with the advantages of whole
    groups (gathered from every process)."""
    accelerator = run.accelerator
    # 1. The round's prompts and this process's video slots per update.
    prompts = round_prompts(round_index, config, len(parts.prompts))
    blocks = round_blocks(round_index, config, accelerator.process_index, accelerator.num_processes)
    G = config.group_size
    # 2. Sample every block in micro-batches with the old policy, decode and score.
    with old_policy(old):
        updates = [[sample_chunk(run, parts, config, round_index, block[i:i + config.batch_size],
                                 [prompts[s // G] for s in block[i:i + config.batch_size]])
                    for i in range(0, len(block), config.batch_size)] for block in blocks]
    chunks = [c for update in updates for c in update]
    # 3. Advantages of whole groups (every process's rewards gathered) and the round's metrics.
    metrics = assign_advantages(run, parts, chunks, prompts, G, config.advantage_clip)
    return Round(updates, metrics)


# ---- the step ----------------------------------------------------------------------------------------------
def training_levels(config: NFTConfig, round_index: int, slots: list[int]) -> torch.Tensor:
    """(B, train_timesteps) indices into the sampling schedule's `steps` noise levels: each video's own draw
    without repeats, the same under any batching or process count."""
    return torch.stack([torch.randperm(config.steps, generator=step_generator(config.seed, round_index, slot, -4))
                        [:config.train_timesteps] for slot in slots])


def conditional_velocity(run: TrainingRun, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                         cond: PromptEmbeds, num_train_timesteps: int, guidance: float = 1.0) -> torch.Tensor:
    """The model's velocity for the prompt alone (no CFG): what NFT trains. A guidance-distilled model embeds
    `guidance` (the scale it samples at, so the trained velocity is the sampling policy's)."""
    with run.accelerator.autocast():
        return predict_velocity(model, x, sigma, cond, guidance_scale=guidance, num_train_timesteps=num_train_timesteps)


def nft_update(run: TrainingRun, parts: FrozenParts, config: NFTConfig, round_: Round, round_index: int,
               update: int, old: OldWeights) -> tuple[bool, dict[str, float]]:
    """Backward of update `update`'s loss: the mean over this process's share of the update's videos, each at its
    `train_timesteps` noise levels. Returns (every loss finite, metrics averaged over the same)."""
    policy, device = run.unwrapped, run.device
    levels = parts.schedule.sigmas(config.steps)[:config.steps]  # the sampling schedule's levels, without the 0
    chunks = round_.updates[update]
    count = sum(len(c.slots) for c in chunks) * config.train_timesteps
    totals: dict[str, float] = {}
    finite = True
    for chunk in chunks:
        cond = parts.text.select(chunk.prompts).to(device, policy.dtype)
        x0 = chunk.latents.to(device)
        optimality = optimality_probability(chunk.advantages, config.advantage_clip).to(device)
        picks = training_levels(config, round_index, chunk.slots)
        for j in range(config.train_timesteps):
            # 1. Re-noise each clean sample at its j-th level with its own noise: x_s = (1 - s) x0 + s eps.
            sigma = levels[picks[:, j]].to(device, torch.float32)
            eps = torch.stack([torch.randn(x0.shape[1:], generator=step_generator(config.seed, round_index, slot,
                                                                                  -5, j))
                               for slot in chunk.slots]).to(device)
            s = sigma.view(-1, *([1] * (x0.dim() - 1)))
            noisy = (1 - s) * x0 + s * eps
            # 2. The old policy's and the base's velocities, without gradients, before the policy's pass.
            with torch.no_grad():
                with old_policy(old):
                    v_old = conditional_velocity(run, policy, noisy, sigma, cond, parts.schedule.num_train_timesteps,
                                                 config.guidance)
                v_base = None
                if config.kl_weight > 0:
                    with run.reference_mode() as reference:
                        v_base = conditional_velocity(run, reference, noisy, sigma, cond,
                                                      parts.schedule.num_train_timesteps, config.guidance)
            # 3. The policy's velocity, with gradients.
            v = conditional_velocity(run, policy, noisy, sigma, cond, parts.schedule.num_train_timesteps, config.guidance)
            # 4. The NFT loss; backward of its share of the update's mean.
            loss, metrics = nft_loss(v, v_old, v_base, noisy, sigma, x0, optimality, config.beta,
                                     config.advantage_clip, config.kl_weight)
            share = len(chunk.slots) / count
            run.backward(loss * share)
            finite &= bool(torch.isfinite(loss))
            metrics["optimality"] = optimality.mean()
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * share
    return finite, totals


# ---- the loop ----------------------------------------------------------------------------------------------
def train_nft(config: NFTConfig) -> Path:
    """Train a LoRA adapter with DiffusionNFT; returns the final adapter directory."""
    run, parts = start_round_run(config)
    policy = run.load_policy(config.model, config.dtype, config.init_adapter, quantize=config.quantize,
                             family=config.family)
    # The old policy starts as the policy; a resume (in prepare) restores the checkpoint's.
    run.trainer_tensors = {OLD_PREFIX + name: param.detach().clone()
                           for name, param in policy.named_parameters() if param.requires_grad}
    run.prepare(policy)
    named = dict(run.unwrapped.named_parameters())
    old = [(named[key.removeprefix(OLD_PREFIX)], value) for key, value in run.trainer_tensors.items()]
    if run.is_main:
        logger.info("nft: %d prompts, rewards %s, %d rounds x %d prompts x G=%d, %d sampling steps at guidance %g, "
                    "%d of them trained per video, %d update(s) per round, %d process(es)", len(parts.prompts),
                    ", ".join(parts.scorers), config.max_steps // config.updates_per_round,
                    config.prompts_per_round, config.group_size, config.steps, config.guidance,
                    config.train_timesteps, config.updates_per_round, run.accelerator.num_processes)
    seen = prompts_of_rounds(run.step // config.updates_per_round, config, len(parts.prompts))
    round_, decay = None, 0.0
    progress = Progress(total=config.max_steps, initial=run.step, desc="train nft", unit="step", enabled=run.is_main)
    with progress:
        for step in run.steps():
            devices.reset_peak_memory(run.device)
            start = time.perf_counter()
            round_index, update = divmod(step, config.updates_per_round)
            prompts = round_prompts(round_index, config, len(parts.prompts))
            with run.counting("sampling_and_update" if update == 0 else "update"):
                if update == 0:
                    if step > 0:  # the previous round's updates are done: the old policy follows them
                        decay = config.old_decay(step)
                        follow_policy(old, decay)
                    round_ = sample_round(run, parts, config, round_index, old)
                    seen.update(prompts)
                finite, totals = nft_update(run, parts, config, round_, round_index, update, old)
            average_gradients(run)
            totals.update(round_.metrics, prompts_seen=float(len(seen)), old_decay=decay)
            run.end_step(step, totals, finite, [prompt_id(i) for i in prompts], start, progress,
                         {"loss": "loss", "reward": "reward_mean"})
    return run.finish({"method": "nft", "prompts": str(config.prompts), "rewards": str(config.rewards),
                       "model": str(config.model)})
