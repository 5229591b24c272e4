"""Flow-DPO losses: Diffusion-DPO (Wallace et al., 2023) for velocity-predicting flow models, as pure functions.

For a pair (winner x0_w, loser x0_l) of one prompt, with ONE noise eps and ONE sigma shared by both:

    err(model, x0) = mean_{C,T,H,W} || v_model(x_sigma, 1000 sigma) - (eps - x0) ||^2
    d_w = err(policy, x0_w) - err(ref, x0_w)          d_l = err(policy, x0_l) - err(ref, x0_l)
    h   = -(d_w - d_l) / 2                             (the implicit log-ratio difference)
    z   = beta * h                                     (the "reward margin")

    sigmoid:  loss = -log sigmoid(z)
    hinge:    loss = relu(1 - z)
    ipo:      loss = (h - 1 / (2 beta))^2              (IPO, Azar et al. 2023, on the log-ratio difference)

The policy improves on the winner relative to the reference more than on the loser when d_w < d_l; the
implicit accuracy is mean(d_w < d_l), ties counting one half (so a zero-initialised adapter scores 0.5 and
its sigmoid loss is log 2). Optional: an SFT term `sft_weight * err(policy, x0_w)` and per-pair weights w_i:

    loss = (1/B) sum_i w_i * loss_i

a weighted MEAN over the micro-batch's B pairs, not divided by sum_i w_i: the weights are normalised once over
the whole dataset (`PairData`: margin / mean margin, so mean 1), and dividing by the batch's own weight sum
would cancel them (at one pair per micro-batch it would make every weight 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from rlhf.sampling import shift_sigmas

LossType = Literal["sigmoid", "hinge", "ipo"]


def flow_matching_error(velocity: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error of a velocity prediction against `noise - latents`: (B,) float32."""
    target = noise.float() - latents.float()
    return (velocity.float() - target).square().flatten(1).mean(dim=1)


def velocity_distance(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample `mean_{C,T,H,W} ||velocity - target||^2`: (B,) float32 (target is treated as a constant).

    The reward-gradient trainer's regulariser towards the base: `target` is the base model's velocity (adapter
    disabled) at the same input, so the distance is 0 exactly when the policy predicts what the base does.
    """
    return (velocity.float() - target.detach().float()).square().flatten(1).mean(dim=1)


def flow_dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
    sft_weight: float = 0.0,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-DPO loss from per-pair errors (all (B,)); returns (scalar loss, detached metrics)."""
    d_w = policy_err_w - ref_err_w
    d_l = policy_err_l - ref_err_l
    log_ratio_diff = -(d_w - d_l) / 2  # h
    margin = beta * log_ratio_diff  # z
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif loss_type == "hinge":
        losses = F.relu(1 - margin)
    elif loss_type == "ipo":
        losses = (log_ratio_diff - 1 / (2 * beta)).square()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, hinge or ipo")
    if sft_weight:
        losses = losses + sft_weight * policy_err_w
    if pair_weights is not None:
        loss = (losses * pair_weights).mean()  # weights are normalised over the dataset, not the batch
    else:
        loss = losses.mean()

    wins = (d_w < d_l).float() + 0.5 * (d_w == d_l).float()
    metrics = {
        "loss": loss.detach(),
        "implicit_accuracy": wins.mean().detach(),
        "reward_margin": margin.mean().detach(),
        "policy_err_w": policy_err_w.mean().detach(),
        "policy_err_l": policy_err_l.mean().detach(),
        "ref_err_w": ref_err_w.mean().detach(),
        "ref_err_l": ref_err_l.mean().detach(),
    }
    return loss, metrics


# ---- SFT on the best samples (rejection-sampling fine-tuning: RAFT, Dong et al. 2023) ---------------------------
def flow_matching_loss(velocity: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain flow-matching (rectified-flow) loss of the policy on a micro-batch of chosen samples x0 (B, ...).

    With per sample one noise eps ~ N(0, I) and one sigma s, x_s = (1 - s) x0 + s eps, and the policy's velocity
    v = v_theta(x_s, 1000 s, text) (`velocity`, the caller's forward):

        err_i = mean_{C,T,H,W} (v_i - (eps_i - x0_i))^2         (`flow_matching_error`, as in Flow-DPO)
        loss  = (1/B) sum_i err_i

    the SD3 / ContentV pretraining objective, here on the samples the rewards ranked best. Metrics: loss.
    """
    loss = flow_matching_error(velocity, noise, latents).mean()
    return loss, {"loss": loss.detach()}


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    sampler: Literal["logit_normal", "uniform"] = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Training sigmas (B,) in (0, 1): logit-normal (SD3 default) or uniform, then the scheduler's shift."""
    if sampler == "logit_normal":
        sigmas = torch.sigmoid(torch.randn(batch, generator=generator) * logit_std + logit_mean)
    elif sampler == "uniform":
        sigmas = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"unknown sigma sampler {sampler!r}")
    return shift_sigmas(sigmas, shift)


# ---- GRPO (Flow-GRPO, Liu et al. 2025) -----------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor,
                     clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages `(N,)` from per-reward scores `rewards` `(N, K)` of samples in groups `groups` `(N,)`.

    Each reward is normalised within each group (flow_grpo `stat_tracking.py`: z = (r - mean_g) / (std_g + eps),
    population std), then `A = sum_k weights_k * z_k`, clipped to +-clip. With one reward of weight 1 this is
    flow_grpo's advantage. A reward equal across a group gives z = 0 there exactly (not rounding noise / eps),
    so a group whose rewards are all equal has A = 0 and contributes no policy gradient.
    """
    rewards = rewards.double()
    z = torch.zeros_like(rewards)
    for group in groups.unique():
        members = groups == group
        r = rewards[members]  # (G, K)
        spread = (r.max(dim=0).values > r.min(dim=0).values).double()  # (K,) 0 where the group is tied
        z[members] = spread * (r - r.mean(dim=0)) / (r.std(dim=0, unbiased=False) + eps)
    return (z @ weights.double()).clamp(-clip, clip).float()


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              mean: torch.Tensor, ref_mean: torch.Tensor | None, std: float, beta: float
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped GRPO loss of a batch of stochastic transitions `(B,)`, plus beta * KL to the reference.

        ratio = exp(log_prob - old_log_prob)
        policy_loss = mean_B max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))
        KL = mean_B mean_{C,T,H,W} (mean - ref_mean)^2 / (2 std^2)

    The KL is the exact KL divergence between the transition's Gaussians N(mean, std^2 I) and N(ref_mean, std^2 I)
    of equal variance, per dimension (a mean over dims, as the log-probabilities are): `std` is the transition's
    std, std_t * sqrt(-dt). flow_grpo divides by 2 std_t^2 instead (without the sqrt(-dt) factor), i.e. its KL
    is this one times -dt; beta here = flow_grpo's beta * -dt for the same penalty. `ref_mean` None (beta 0)
    skips it. Metrics: policy_loss, kl, approx_kl = mean 0.5 (log_prob - old_log_prob)^2, clip_frac =
    mean(|ratio - 1| > clip_range), ratio (mean).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    if ref_mean is None:
        kl = torch.zeros((), device=log_prob.device)
    else:
        kl = ((mean - ref_mean) ** 2).flatten(1).mean(dim=1).mean() / (2 * std**2)
    loss = policy_loss + beta * kl
    metrics = {
        "policy_loss": policy_loss.detach(), "kl": kl.detach(),
        "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean().detach(),
        "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        "ratio": ratio.mean().detach(),
    }
    return loss, metrics
