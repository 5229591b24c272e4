"""GRPO trainer (Flow-GRPO with an SDE window, as Flow-GRPO-Fast / MixGRPO): online LoRA training from rewards.

A round samples `group_size` videos for each of `prompts_per_round` prompts with the policy (base + LoRA, with
CFG). The steps of a window run as Flow-GRPO's reverse SDE (`rlhf.sampling.sde_step_with_logprob`, noise level a),
the others as the ODE (Euler); the window's latents and the log-probabilities of its transitions are kept. The
decoded videos are scored with the rewards YAML; each reward is normalised within each prompt's group and the
weighted sum, clipped to +-advantage_clip, is the advantage (`dpo.losses.group_advantages`; the statistics are
those of the prompt's group in this round, as flow_grpo's PerPromptStatTracker, which it clears every epoch; across
rounds the prompts trained so far are counted, `prompts_seen`, as its history_prompts). Then
`updates_per_round` optimiser steps each take an equal share of the round's videos and minimise, over every
window transition of them, the PPO-clipped ratio loss plus beta * KL to the base (`dpo.losses.grpo_loss`):

    ratio = exp(log p_theta(x' | x) - log p_old(x' | x))      (log p: mean over dims, as flow_grpo)
    loss  = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta * mean_dims (mu_theta - mu_ref)^2 / (2 s^2)

with mu the SDE step's mean under the policy and under the reference (the same transformer, adapter disabled),
s = std_t sqrt(-dt) the transition's std: the exact KL of two Gaussians of equal variance, per dimension
(flow_grpo divides by 2 std_t^2, so its KL is this one times -dt). Both policy passes use CFG as sampling did.

Supports: fixed or sliding SDE windows, several rewards (per-reward group normalisation, weighted sum; weight-0
rewards are logged only; no gradients through the rewards, so any scorer works), groups whose rewards are all equal
contribute no policy gradient (their advantages are exactly 0), PPO clipping with the clip fraction, approx-KL and
KL logged, bf16 autocast, gradient checkpointing, grad-norm clipping, warmup + schedules, non-finite step skipping,
atomic checkpoints with exact resume, metrics.jsonl + tensorboard/wandb (all from rlhf/training.py); single
process and DDP (FSDP2 and DeepSpeed launches are refused: not tested with this trainer).

Assumptions: prompt embeddings depend only on the prompt (computed once at start, text encoders freed before the
transformer loads); the VAE and the scorers are frozen. A round's prompts, the order of its videos and every
video's noise depend only on (seed, round, video slot), never on the process count: with W processes the round's
videos are cut into updates_per_round x W equal blocks, process r samples blocks u W + r (u = 0..U-1), the
rewards are gathered so every process computes the advantages of whole groups, and update u trains on blocks
u W .. u W + W - 1, i.e. the same videos as update u of one process. A process's sampling micro-batches are its
training micro-batches, so at a round's first update the policy recomputes exactly the stored log-probabilities
(ratio 1). Checkpoints fall between rounds (max_steps and save_every are multiples of updates_per_round), so a
resumed run samples the same rounds as an uninterrupted one. The policy's forwards bypass the DDP wrapper (several
forwards per backward) and the LoRA gradients are averaged over processes explicitly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo.grpo_config import GRPOConfig
from dpo.losses import grpo_loss
from dpo.reward_gradient import FrozenParts, average_gradients, decode_video_frames
from dpo.rounds import assign_advantages, prompts_of_rounds, round_blocks, round_prompts, start_round_run
from rewards.build import score_videos
from rlhf import devices
from rlhf.models.family import transformer_family
from rlhf.progress import Progress
from rlhf.prompts import prompt_id
from rlhf.sampling import PromptEmbeds, euler_step, predict_velocity, sde_step_with_logprob
from rlhf.training import TrainingRun, step_generator

logger = logging.getLogger("contentv-rlhf")


@dataclass
class Chunk:
    """One micro-batch of a round's videos on this process: sampled together, trained together."""

    slots: list[int]
    prompts: list[int]  # prompt index of each video
    states: torch.Tensor  # (B, W + 1, C, T, H, W) float32 CPU: latents before each window step, and after the last
    log_probs: torch.Tensor  # (B, W) the sampler's log-probabilities of the window's transitions
    rewards: torch.Tensor  # (B, K) raw scores, one column per scorer
    advantages: torch.Tensor | None = None  # (B,)


@dataclass
class Round:
    window: range
    updates: list[list[Chunk]]  # this process's chunks, per update
    metrics: dict[str, float]  # reward statistics of the whole round (all processes)


@torch.no_grad()
def sample_chunk(run: TrainingRun, parts: FrozenParts, config: GRPOConfig, round_index: int, slots: list[int],
                 prompts: list[int], window: range) -> Chunk:
    """Sample videos `slots` with the policy (SDE in `window`, ODE elsewhere), decode and score them."""
    policy, device = run.unwrapped, run.device
    sigmas = parts.schedule.sigmas(config.steps)
    generators = [step_generator(config.seed, round_index, slot) for slot in slots]  # per video: any batching
    shape = transformer_family(policy).latent_shape(config.frames, config.height, config.width, policy.config)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)  # (B, C, T, H, W)
    cond = parts.text.select(prompts).to(device, policy.dtype)
    uncond = parts.negative.to(device, policy.dtype) if parts.negative is not None else None
    states, log_probs = [], []
    for index in range(config.steps):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        with run.accelerator.autocast():
            velocity = predict_velocity(policy, latents, sigma, cond, uncond, config.guidance, config.batch_cfg,
                                        parts.schedule.num_train_timesteps, guidance_scale_2=config.guidance_2)
        if index in window:
            states.append(latents.cpu())
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
            latents, log_prob, _, _ = sde_step_with_logprob(latents, velocity, sigma, sigma_next, config.noise_level,
                                                            sigma_max=float(sigmas[1]), noise=noise)
            log_probs.append(log_prob.cpu())
            if index == window[-1]:
                states.append(latents.cpu())  # x' of the window's last transition
        else:
            latents = euler_step(latents, velocity, sigma, sigma_next)
    video = decode_video_frames(parts.vae, latents, list(range(config.frames)))  # (B, F, 3, H, W) in [0, 1]
    scores = score_videos(parts.scorers, video, [parts.prompts[p] for p in prompts], batch_size=len(slots))
    return Chunk(slots, prompts, torch.stack(states, dim=1), torch.stack(log_probs, dim=1),
                 torch.stack([scores[k].double() for k in parts.scorers], dim=1))


def sample_round(run: TrainingRun, parts: FrozenParts, config: GRPOConfig, round_index: int) -> Round:
    """This process's share of round `round_index`, with the advantages of whole groups (gathered)."""
    accelerator = run.accelerator
    # 1. The round's prompts, the window, and this process's video slots per update.
    prompts, window = round_prompts(round_index, config, len(parts.prompts)), config.window(round_index)
    blocks = round_blocks(round_index, config, accelerator.process_index, accelerator.num_processes)
    G = config.group_size
    # 2. Sample every block in micro-batches (SDE window, CFG), decode and score.
    updates = [[sample_chunk(run, parts, config, round_index, block[i:i + config.batch_size],
                             [prompts[s // G] for s in block[i:i + config.batch_size]], window)
                for i in range(0, len(block), config.batch_size)] for block in blocks]
    chunks = [c for update in updates for c in update]
    # 3. Advantages of whole groups (every process's rewards gathered) and the round's metrics.
    metrics = assign_advantages(run, parts, chunks, prompts, G, config.advantage_clip)
    return Round(window, updates, {**metrics, "window_start": float(window.start)})


# ---- the step ----------------------------------------------------------------------------------------------
def transition(run: TrainingRun, model: torch.nn.Module, parts: FrozenParts, config: GRPOConfig, x: torch.Tensor,
               x_next: torch.Tensor, index: int, cond: PromptEmbeds, uncond: PromptEmbeds | None
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(log p(x_next | x) (B,), the SDE step's mean, std_t)` of sampling step `index` under `model`, with CFG."""
    sigmas = parts.schedule.sigmas(config.steps)
    sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
    with run.accelerator.autocast():
        velocity = predict_velocity(model, x, sigma, cond, uncond, config.guidance, config.batch_cfg,
                                    parts.schedule.num_train_timesteps, guidance_scale_2=config.guidance_2)
    _, log_prob, mean, std_t = sde_step_with_logprob(x, velocity, sigma, sigma_next, config.noise_level,
                                                     sigma_max=float(sigmas[1]), next_latents=x_next)
    return log_prob, mean, std_t


def grpo_update(run: TrainingRun, parts: FrozenParts, config: GRPOConfig, round_: Round, update: int
                ) -> tuple[bool, dict[str, float]]:
    """Backward of update `update`'s loss: the mean over this process's share of the update's videos and every
    window transition of them. Returns (every loss finite, metrics averaged over the same)."""
    policy, device = run.unwrapped, run.device
    sigmas = parts.schedule.sigmas(config.steps)
    uncond = parts.negative.to(device, policy.dtype) if parts.negative is not None else None
    chunks = round_.updates[update]
    count = sum(len(c.slots) for c in chunks) * len(round_.window)
    totals: dict[str, float] = {}
    finite = True
    for chunk in chunks:
        cond = parts.text.select(chunk.prompts).to(device, policy.dtype)
        advantages = chunk.advantages.to(device)
        for j, index in enumerate(round_.window):
            # 1. The stored transition x -> x' of window step j (sampled by the policy of this round's start).
            sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
            x, x_next = chunk.states[:, j].to(device), chunk.states[:, j + 1].to(device)  # (B, C, T, H, W)

            # 2. The reference's step mean (adapter disabled), without gradients, before the policy's pass.
            ref_mean = None
            if config.beta > 0:
                with torch.no_grad(), run.reference_mode() as reference:
                    ref_mean = transition(run, reference, parts, config, x, x_next, index, cond, uncond)[1]
            # 3. The policy's log-probability and mean, with gradients.
            log_prob, mean, std_t = transition(run, policy, parts, config, x, x_next, index, cond, uncond)
            # 4. PPO-clipped loss + beta KL; backward of its share of the update's mean.
            loss, metrics = grpo_loss(log_prob, chunk.log_probs[:, j].to(device), advantages, config.clip_range,
                                      mean, ref_mean, std_t * math.sqrt(sigma - sigma_next), config.beta)
            share = len(chunk.slots) / count
            run.backward(loss * share)
            finite &= bool(torch.isfinite(loss))
            for key, value in {"loss": loss.detach(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) * share
    return finite, totals


# ---- the loop ----------------------------------------------------------------------------------------------
def train_grpo(config: GRPOConfig) -> Path:
    """Train a LoRA adapter with GRPO; returns the final adapter directory."""
    run, parts = start_round_run(config)
    run.prepare(run.load_policy(config.model, config.dtype, config.init_adapter, quantize=config.quantize,
                                family=config.family))
    world = run.accelerator.num_processes
    if run.is_main:
        logger.info("grpo: %d prompts, rewards %s, %d rounds x %d prompts x G=%d, SDE window %d of %d steps (%s), "
                    "%d update(s) per round, %d process(es)", len(parts.prompts), ", ".join(parts.scorers),
                    config.max_steps // config.updates_per_round, config.prompts_per_round, config.group_size,
                    config.sde_window_size, config.steps, config.sde_window, config.updates_per_round, world)
    seen = prompts_of_rounds(run.step // config.updates_per_round, config, len(parts.prompts))
    round_ = None
    progress = Progress(total=config.max_steps, initial=run.step, desc="train grpo", unit="step",
                        enabled=run.is_main)
    with progress:
        for step in run.steps():
            devices.reset_peak_memory(run.device)
            start = time.perf_counter()
            round_index, update = divmod(step, config.updates_per_round)
            prompts = round_prompts(round_index, config, len(parts.prompts))
            with run.counting("sampling_and_update" if update == 0 else "update"):
                if update == 0:
                    round_ = sample_round(run, parts, config, round_index)
                    seen.update(prompts)
                finite, totals = grpo_update(run, parts, config, round_, update)
            average_gradients(run)
            totals.update(round_.metrics, prompts_seen=float(len(seen)))
            run.end_step(step, totals, finite, [prompt_id(i) for i in prompts], start, progress,
                         {"loss": "loss", "reward": "reward_mean"})
    return run.finish({"method": "grpo", "prompts": str(config.prompts), "rewards": str(config.rewards),
                       "model": str(config.model)})
