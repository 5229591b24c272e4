"""Reward-gradient trainer (DRaFT-K / ReFL style): LoRA on the ContentV transformer from differentiable rewards.

Each step samples videos with the policy (base + LoRA) from fresh noise, decodes a subset of their frames with
the VAE, scores them with the configured rewards and back-propagates `-reward_scale * reward` into the LoRA
parameters through the last `grad_steps` denoising steps (DRaFT-K; the earlier steps run under `no_grad`).

Supports: truncated back-propagation through the last K Euler steps, optional stop-gradient on each step's
latent input to the transformer, batched or split classifier-free guidance, differentiable decoding of only the
first frame / k evenly spaced / k random frames (the causal Wan VAE decodes a latent prefix; per-latent-frame
gradient checkpointing in the decoder), weighted sums of differentiable scorers normalised by the base model's
within-prompt spread (`calibrate_rewards`, the scale `pairs` uses), a regulariser towards the base (the policy's
velocity against the base's on noised detached samples), transformer gradient checkpointing, bf16 autocast, gradient
accumulation, grad-norm clipping, warmup + schedules, non-finite step skipping, atomic checkpoints with exact
resume, metrics.jsonl + tensorboard/wandb (all from rlhf/training.py); single process, DDP, FSDP2, ZeRO-2.

Assumptions: prompt embeddings depend only on the prompt, so they are computed once at start (text encoders
freed before the transformer loads) and cached on the CPU; the VAE and the scorers are frozen. Prompt order,
noise and decoded frames depend only on (seed, micro-batch index, rank), so a resumed run repeats an
uninterrupted one. The forwards of a step bypass the DDP wrapper (a step runs several forwards before one
backward) and under DDP the LoRA gradients are averaged over processes explicitly; FSDP2 and ZeRO-2 reduce
them in their own backward hooks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo.losses import sample_sigmas, velocity_distance
from dpo.reward_gradient_config import RewardGradientConfig
from rewards.build import RewardNormalization, WeightedScorer, build_scorers, weighted_reward
from rewards.config import load_rewards_config
from rlhf import devices
from rlhf.errors import UserError
from rlhf.models.family import transformer_family, vae_family
from rlhf.options import uses_guidance
from rlhf.progress import Progress
from rlhf.prompts import load_prompts, prompt_id
from rlhf.sampling import (
    FlowSchedule,
    PromptEmbeds,
    euler_step,
    predict_velocity,
)
from rlhf.training import TrainingRun, step_generator

logger = logging.getLogger("contentv-rlhf")
ENCODE_CHUNK = 8  # prompts per text-encoder call at start


# ---- frozen parts, built once ------------------------------------------------------------------------------
@dataclass
class FrozenParts:
    """Everything a step needs besides the policy; built once by `load_frozen_parts`."""

    schedule: FlowSchedule
    vae: torch.nn.Module
    scorers: dict[str, WeightedScorer]
    reward_device: torch.device
    prompts: list[str]
    text: PromptEmbeds  # (N, L, D), (N, P) on the CPU: one row per prompt
    negative: PromptEmbeds | None  # (1, L, D), (1, P) on the CPU; None without guidance
    normalization: RewardNormalization | None = None  # set by `calibrate_rewards`; None = raw scores


def load_frozen_parts(config: RewardGradientConfig, device: torch.device) -> FrozenParts:
    """The reward-gradient trainer's frozen parts: `load_online_parts` with a differentiable, weighted scorer."""
    def check(scorers: dict[str, WeightedScorer]) -> None:
        if not any(s.scorer.differentiable and s.weight != 0 for s in scorers.values()):
            raise UserError(f"{config.rewards}: no differentiable scorer with a non-zero weight; reward-gradient "
                            f"training needs one (differentiable: "
                            f"{', '.join(n for n, s in scorers.items() if s.scorer.differentiable) or 'none'})")

    return load_online_parts(config, device, check)


def load_online_parts(config, device: torch.device, check_scorers: Callable[[dict[str, WeightedScorer]], None]
                      ) -> FrozenParts:
    """Prompts, scorers, VAE and the prompt-embedding cache of an online trainer (its config's model, prompts,
    rewards, dtype, vae_dtype, max_sequence_length, guidance and negative_prompt). Cheap checks first, big models
    last: `check_scorers` refuses a rewards YAML the trainer cannot use before any model loads."""
    from rlhf.models.loader import load_model

    # 1. Inputs that fail fast: the prompt file and the rewards config (scorer weight files are checked here).
    prompt_list = load_prompts(config.prompts)
    if prompt_list.report():
        logger.warning(prompt_list.report())
    rewards = load_rewards_config(config.rewards)
    scorers = build_scorers(rewards)
    check_scorers(scorers)
    # 2. VAE and text encoders (not the transformer): encode every prompt once, then free the encoders.
    parts = load_model(config.model, dtype=config.dtype, device=device, vae_dtype=config.vae_dtype,
                       load_transformer=False, max_sequence_length=config.max_sequence_length, family=config.family)
    encoder, parts.prompt_encoder = parts.prompt_encoder, None
    prompts = prompt_list.prompts
    text = PromptEmbeds.cat([encoder.encode(prompts[i:i + ENCODE_CHUNK]).to("cpu")
                             for i in range(0, len(prompts), ENCODE_CHUNK)])
    negative = encoder.encode([config.negative_prompt]).to("cpu") if uses_guidance(config.guidance) else None
    encoder.release()
    return FrozenParts(parts.schedule, parts.vae, scorers, devices.resolve_device(rewards.device), prompts,
                       text, negative)


# ---- pure pieces of a step ---------------------------------------------------------------------------------
def prompt_indices(micro_batch: int, batch_size: int, rank: int, world_size: int, num_prompts: int,
                   seed: int) -> list[int]:
    """Prompt indices of global micro-batch `micro_batch` for process `rank`.

    Consecutive positions of an endless sequence of per-epoch permutations (epoch e seeded by (seed, e, -1)):
    every prompt is drawn equally often, any prompt count works, and the draw depends only on the index.
    """
    start = (micro_batch * world_size + rank) * batch_size
    orders: dict[int, list[int]] = {}
    picked = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in orders:
            orders[epoch] = torch.randperm(num_prompts, generator=step_generator(seed, epoch, -1)).tolist()
        picked.append(orders[epoch][offset])
    return picked


def sample_with_grad(model: torch.nn.Module, noise: torch.Tensor, sigmas: torch.Tensor, cond: PromptEmbeds,
                     uncond: PromptEmbeds | None, *, guidance: float, batch_cfg: bool, grad_steps: int,
                     stop_latent_grad: bool, num_train_timesteps: int, guidance_2: float | None = None) -> torch.Tensor:
    """Euler sampling from `noise` (B, C, T, H, W) where only the last `grad_steps` steps record gradients.

    Steps 1..N-K run under `no_grad`; steps N-K+1..N keep the graph through the model (DRaFT-K). With
    `stop_latent_grad`, each of those steps feeds the transformer a detached latent, so gradients reach earlier
    steps only through the Euler updates `x + (sigma_next - sigma) * v`. Returns float32 latents.
    """
    steps = len(sigmas) - 1
    latents = noise.float()
    for index in range(steps):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        with_grad = index >= steps - grad_steps
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            model_in = latents.detach() if stop_latent_grad else latents
            velocity = predict_velocity(model, model_in, sigma, cond, uncond, guidance, batch_cfg,
                                        num_train_timesteps, guidance_scale_2=guidance_2)
            latents = euler_step(latents, velocity, sigma, sigma_next)
    return latents


def select_frames(mode: str, num_frames: int, k: int | None, generator: torch.Generator) -> list[int]:
    """Sorted video-frame indices the reward sees: [0], k evenly spaced from first to last, or k random."""
    if mode == "first":
        return [0]
    if mode == "k_evenly_spaced":
        return torch.linspace(0, num_frames - 1, k).round().long().tolist()
    if mode == "random_k":
        return sorted(torch.randperm(num_frames, generator=generator)[:k].tolist())
    raise ValueError(f"unknown decode_frames mode {mode!r}")


def decode_video_frames(vae: torch.nn.Module, latents: torch.Tensor, frames: Sequence[int],
                        checkpoint: bool = False) -> torch.Tensor:
    """Differentiably decode video frames `frames` of normalised latents (B, C, t, h, w) -> (B, n, 3, H, W) in [0, 1].

    The VAE's model family decodes (`ModelFamily.decode_frames`). The Wan VAE is causal, so the frames up to the
    last requested one come from the latent prefix that ends at its latent frame; later latent frames are never
    decoded (`first` decodes latent frame 0 alone); HunyuanVideo's VAE decodes the whole clip. Identical to the
    same frames of the whole clip's decode (checked in tests). With `checkpoint`, the decoder's activations are
    recomputed in the backward pass instead of kept (the Wan VAE: per latent frame).
    """
    return vae_family(vae).decode_frames(vae, latents, frames, checkpoint)


@torch.no_grad()
def calibrate_rewards(run: TrainingRun, parts: FrozenParts, config: RewardGradientConfig) -> RewardNormalization:
    """Per-reward centre and scale from the base model's videos, so a weight means what it means in `pairs`.

    The reference model (adapter disabled, or the frozen reference adapter) samples `calibration_samples`
    videos for each of the first `calibration_prompts` prompts of the seed's order, decoded and scored as in
    training. Reward k's scale is `rewards.pairs.prompt_scale`, the pooled within-prompt 1.4826 MAD (the
    scale `pairs` divides by with normalize: prompt), or with calibration_spread std `rewards.pairs.prompt_std`,
    the pooled within-prompt standard deviation; its centre is the median of all the scores. Noise comes from
    generators keyed by (seed, -2, sample), so a resumed run calibrates identically. A scale of 0 for a reward
    with a non-zero weight is an error (its z-score would be unbounded); weight-0 rewards get scale 1.
    """
    import numpy as np

    from rewards.pairs import prompt_scale, prompt_std

    schedule, device = parts.schedule, run.device
    count = min(config.calibration_prompts, len(parts.prompts))
    chosen = prompt_indices(0, count, 0, 1, len(parts.prompts), config.seed)
    jobs = [(p, g) for p in chosen for g in range(config.calibration_samples)]  # (prompt index, sample)
    uncond = parts.negative.to(device, run.unwrapped.dtype) if parts.negative is not None else None
    rows: list[list[float]] = []
    with run.reference_mode() as reference:
        for start in range(0, len(jobs), config.batch_size):
            chunk = jobs[start:start + config.batch_size]
            generators = [step_generator(config.seed, -2, start + i) for i in range(len(chunk))]
            shape = transformer_family(reference).latent_shape(config.frames, config.height, config.width,
                                                                reference.config)
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
            frames = select_frames(config.decode_frames, config.frames, config.num_decode_frames, generators[0])
            cond = parts.text.select([p for p, _ in chunk]).to(device, reference.dtype)
            with run.accelerator.autocast():
                latents = sample_with_grad(
                    reference, noise, schedule.sigmas(config.steps), cond, uncond, guidance=config.guidance,
                    batch_cfg=config.batch_cfg, grad_steps=0, stop_latent_grad=False,
                    num_train_timesteps=schedule.num_train_timesteps, guidance_2=config.guidance_2)
            video = decode_video_frames(parts.vae, latents, frames).to(parts.reward_device)
            _, scores = weighted_reward(parts.scorers, video, [parts.prompts[p] for p, _ in chunk])
            rows += torch.stack([scores[k].float().cpu() for k in parts.scorers], dim=1).tolist()
    raw = np.array(rows)  # (prompts x samples, rewards)
    if not np.isfinite(raw).all():
        raise UserError(f"{config.rewards}: a reward was not finite on the base model's calibration videos")
    spread = prompt_std if config.calibration_spread == "std" else prompt_scale
    scale, centre = spread(raw, [p for p, _ in jobs]), np.median(raw, axis=0)
    normalization = RewardNormalization({}, {})
    for k, (name, (_, weight)) in enumerate(parts.scorers.items()):
        if scale[k] == 0 and weight != 0:
            raise UserError(f"{config.rewards}: reward {name!r} did not vary between the base model's videos of a "
                            f"prompt ({len(jobs)} calibration videos); raise calibration_samples or set "
                            "reward_normalize: none")
        normalization.centre[name] = float(centre[k])
        normalization.scale[name] = float(scale[k]) if scale[k] > 0 else 1.0
    return normalization


def average_gradients(run: TrainingRun) -> None:
    """Average the trainable gradients over processes (a step's forwards bypass the DDP wrapper)."""
    if run.accelerator.num_processes == 1:
        return
    for param in run.params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = run.accelerator.reduce(torch.cat([p.grad.flatten() for p in run.params]), reduction="mean")
    for param, grad in zip(run.params, flat.split([p.numel() for p in run.params]), strict=True):
        param.grad.copy_(grad.view_as(param))


def base_anchor_loss(run: TrainingRun, x0: torch.Tensor, cond: PromptEmbeds, schedule: FlowSchedule,
                     generator: torch.Generator, guidance: float = 1.0) -> torch.Tensor:
    """`mean_B mean_{C,T,H,W} ||v_policy(x_s, 1000 s) - v_base(x_s, 1000 s)||^2`, `x_s = (1 - s) x0 + s eps`.

    One eps and one logit-normal (shifted) sigma s per sample; `v_base` is the reference model (adapter
    disabled) without gradients, computed before the policy's pass. Its minimum, 0, is the base itself
    (a zero or disabled adapter), unlike the flow-matching error on the policy's own samples, whose
    target `eps - x0` the policy that drew x0 already fits. Both are conditional velocities (no CFG); a
    guidance-distilled model embeds `guidance`, the scale it samples at.
    """
    batch = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    sigmas = sample_sigmas(batch, generator, "logit_normal", shift=schedule.shift).to(x0.device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    with torch.no_grad(), run.reference_mode() as reference, run.accelerator.autocast():
        target = predict_velocity(reference, x_t, sigmas, cond, guidance_scale=guidance,
                                  num_train_timesteps=schedule.num_train_timesteps)
    with run.accelerator.autocast():
        velocity = predict_velocity(run.unwrapped, x_t, sigmas, cond, guidance_scale=guidance,
                                    num_train_timesteps=schedule.num_train_timesteps)
    return velocity_distance(velocity, target).mean()


# ---- the step ----------------------------------------------------------------------------------------------
def reward_gradient_step(run: TrainingRun, parts: FrozenParts, indices: list[int], config: RewardGradientConfig,
                         generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics for one micro-batch of prompts (the backward pass is the caller's)."""
    # Several forwards per backward: the bare module (DDP's wrapper expects one; see average_gradients).
    # Under FSDP2 it is the sharded module itself; under ZeRO-2 the engine reduces in backward hooks.
    policy = run.unwrapped
    device, dtype = run.device, policy.dtype
    batch, prompts = len(indices), [parts.prompts[i] for i in indices]
    # 1. Noise and the decoded frames from the step's generator: a resumed run draws the same.
    shape = transformer_family(policy).latent_shape(config.frames, config.height, config.width, policy.config)
    noise = torch.randn((batch, *shape), generator=generator).to(device)  # (B, C, T, H, W)
    frames = select_frames(config.decode_frames, config.frames, config.num_decode_frames, generator)
    cond = parts.text.select(indices).to(device, dtype)
    uncond = parts.negative.to(device, dtype) if parts.negative is not None else None
    # 2. Sample with the policy: steps 1..N-K without gradients, the last K with.
    with run.accelerator.autocast():
        latents = sample_with_grad(
            policy, noise, parts.schedule.sigmas(config.steps), cond, uncond, guidance=config.guidance,
            batch_cfg=config.batch_cfg, grad_steps=config.grad_steps, stop_latent_grad=config.stop_latent_grad,
            num_train_timesteps=parts.schedule.num_train_timesteps, guidance_2=config.guidance_2,
        )  # (B, C, T, H, W) float32
    # 3. Decode only the frames the reward needs, in the VAE's dtype (outside autocast), with gradients.
    video = decode_video_frames(parts.vae, latents, frames, config.vae_gradient_checkpointing)  # (B, n, 3, H, W)
    # 4. The weighted reward; the loss maximises its batch mean.
    total, terms = weighted_reward(parts.scorers, video.to(parts.reward_device), prompts, parts.normalization)
    loss = -config.reward_scale * total.mean()
    metrics = {"reward_total": total.detach().mean(), **{f"reward_{k}": v.mean() for k, v in terms.items()}}
    # 5. Regulariser towards the base: the policy's velocity against the base's on its own detached samples.
    if config.fm_weight > 0:
        fm_loss = base_anchor_loss(run, latents.detach(), cond, parts.schedule, generator, config.guidance)
        loss = loss + config.fm_weight * fm_loss
        metrics["fm_loss"] = fm_loss.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


# ---- the loop ----------------------------------------------------------------------------------------------
def train_reward_gradient(config: RewardGradientConfig) -> Path:
    """Train a LoRA adapter on differentiable rewards; returns the final adapter directory."""
    run = TrainingRun(config, config, config.device, config)
    accelerator = run.accelerator
    # Order matters: the text encoders are freed before the transformer is loaded (peak memory).
    parts = load_frozen_parts(config, run.device)
    run.prepare(run.load_policy(config.model, config.dtype, config.init_adapter, quantize=config.quantize,
                                family=config.family))
    if config.reward_normalize == "calibrate":
        parts.normalization = calibrate_rewards(run, parts, config)
        if run.is_main:
            logger.info("reward normalisation (base model, %d x %d videos): %s", config.calibration_prompts,
                        config.calibration_samples, ", ".join(
                            f"{k} = (score - {parts.normalization.centre[k]:.4g}) / {parts.normalization.scale[k]:.4g}"
                            for k in parts.scorers))
    rank, world = accelerator.process_index, accelerator.num_processes
    accumulation = config.gradient_accumulation_steps
    if run.is_main:
        logger.info("reward gradient: %d prompts, rewards %s, K=%d of %d steps, %d steps x %d micro-batch(es) x "
                    "%d prompt(s) x %d process(es)", len(parts.prompts), ", ".join(parts.scorers), config.grad_steps,
                    config.steps, config.max_steps, accumulation, config.batch_size, world)

    progress = Progress(total=config.max_steps, initial=run.step, desc="train reward_gradient", unit="step",
                        enabled=run.is_main)
    with progress:
        for step in run.steps():
            devices.reset_peak_memory(run.device)
            start = time.perf_counter()
            totals: dict[str, float] = {}
            finite, prompt_ids = True, []
            with run.counting():
                for micro in range(accumulation):
                    index = step * accumulation + micro
                    indices = prompt_indices(index, config.batch_size, rank, world, len(parts.prompts), config.seed)
                    prompt_ids += [prompt_id(i) for i in indices]
                    with run.accumulation(last=micro == accumulation - 1):
                        loss, metrics = reward_gradient_step(run, parts, indices, config,
                                                             step_generator(config.seed, index, rank))
                        run.backward(loss)
                    finite &= bool(torch.isfinite(loss))
                    for key, value in metrics.items():
                        totals[key] = totals.get(key, 0.0) + float(value) / accumulation
            if run.layout == "replicated":  # FSDP and DeepSpeed reduce the gradients in the backward pass
                average_gradients(run)
            run.end_step(step, totals, finite, prompt_ids, start, progress, {"loss": "loss", "reward": "reward_total"})
    return run.finish({"method": "reward_gradient", "prompts": str(config.prompts), "rewards": str(config.rewards),
                       "model": str(config.model)})
