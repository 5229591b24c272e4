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


# ---- DiffusionNFT (Zheng et al. 2025) ------------------------------------------------------------------------
def optimality_probability(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] of each sample from its group-relative advantage A:

        r = clamp(clamp(A, -clip, clip) / (2 clip) + 1/2, 0, 1)

    so A = 0 (a sample as good as its group's mean, or a tied group) gives r = 1/2, A = +clip gives 1."""
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0.0, 1.0)


def nft_loss(velocity: torch.Tensor, old_velocity: torch.Tensor, ref_velocity: torch.Tensor | None,
             noisy: torch.Tensor, sigma: torch.Tensor, latents: torch.Tensor, optimality: torch.Tensor,
             beta: float, scale: float, kl_weight: float, min_weight: float = 1e-5
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's forward-process loss on clean samples x0 (B, ...) re-noised to x_s = (1 - s) x0 + s eps.

    With v = v_theta(x_s) the policy's velocity, v_old that of the old (sampling) policy and r the optimality
    probability (`optimality_probability`), the implicit positive and negative policies are

        v+ = beta v + (1 - beta) v_old              v- = (1 + beta) v_old - beta v

    each read as a clean-sample prediction x0± = x_s - s v± and scored against x0 with the adaptive weight
    w± = stopgrad(mean_{C,T,H,W} |x0± - x0|), floored at `min_weight`:

        L± = mean_{C,T,H,W} (x0± - x0)^2 / w±
        loss = scale * mean_B [ r L+ / beta + (1 - r) L- / beta ] + kl_weight * mean_B mean (v - v_ref)^2

    The paper's code scales the policy term by its advantage clip (`scale`). Minimising it pulls v+ towards the
    good samples and v- towards the bad ones, so v moves away from the bad ones by beta times as much as it
    moves to the good. At v = v_old the gradient of the policy term is proportional to (2 r - 1): a sample with
    r = 1/2 contributes none. `ref_velocity` None (kl_weight 0) skips the reference term. Metrics: policy_loss,
    kl (mean (v - v_ref)^2), old_deviation (mean (v - v_old)^2), positive_loss, negative_loss (means of L±).
    """
    shape = (-1,) + (1,) * (latents.dim() - 1)
    s = sigma.float().view(shape)
    v, v_old, x0, x_s = velocity.float(), old_velocity.detach().float(), latents.float(), noisy.float()
    # v± = v_old ± beta (v - v_old): written around the old policy's prediction so that at v = v_old both are it
    # exactly, and r = 1/2 gives exactly zero gradient (not rounding noise).
    old_prediction, step = x_s - s * v_old, s * (beta * (v - v_old))
    positive, negative = old_prediction - step, old_prediction + step

    def weighted_error(prediction: torch.Tensor) -> torch.Tensor:
        weight = (prediction.detach() - x0).abs().flatten(1).mean(dim=1).clamp(min=min_weight)
        return (prediction - x0).square().flatten(1).mean(dim=1) / weight

    positive_loss, negative_loss = weighted_error(positive), weighted_error(negative)
    r = optimality.float()
    policy_loss = scale * (r * positive_loss / beta + (1 - r) * negative_loss / beta).mean()
    if ref_velocity is None:
        kl = torch.zeros((), device=v.device)
    else:
        kl = (v - ref_velocity.detach().float()).square().flatten(1).mean(dim=1).mean()
    loss = policy_loss + kl_weight * kl
    metrics = {"policy_loss": policy_loss.detach(), "kl": kl.detach(),
               "old_deviation": (v - v_old).square().mean().detach(),
               "positive_loss": positive_loss.mean().detach(), "negative_loss": negative_loss.mean().detach()}
    return loss, metrics
