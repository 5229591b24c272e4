"""Flow-matching Euler sampling with classifier-free guidance, as pure functions.

Conventions (rectified flow, as SD3 / ContentV): `x_sigma = (1 - sigma) * x0 + sigma * noise`, the model
predicts the velocity `v = noise - x0` at timestep `1000 * sigma`, and one Euler step from `sigma` to
`sigma_next` is `x + (sigma_next - sigma) * v`. The sigma schedule is the family's spacing (ContentV:
`linspace(1, 0, steps + 1)[:-1]`, passed as `sigmas=` to the scheduler; Wan: the scheduler's own
`set_timesteps(steps)` spacing) shifted by the checkpoint scheduler's `shift`, then a terminal 0 — identical to
diffusers' `FlowMatchEulerDiscreteScheduler` (checked in tests/test_sampling.py and tests/test_models_wan.py).
The transformer is called the way its model family calls it (`rlhf.models.family.velocity`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.errors import UserError
from rlhf.options import VAE_TEMPORAL_FACTOR, uses_guidance

VAE_SPATIAL_FACTOR = 8
LATENT_CHANNELS = 16

# Scheduler options that change the schedule in ways this sampler does not implement.
_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "use_dynamic_shifting",
    "invert_sigmas",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",
)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow scheduler's time shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


# How the unshifted sigmas of `steps` steps are spaced (the model family picks one):
# - "to_zero": linspace(1, 0, steps + 1)[:-1], what ContentV's and HunyuanVideo's pipelines pass as `sigmas=` to the
#   scheduler, which casts them to float32 and shifts them in float32 (as here: a float64 shift differs by an ulp,
#   enough for a sampler to drift 1e-4 from the pipeline's in 3 steps);
# - "scheduler_default": diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(steps) without sigmas, what
#   WanPipeline runs: linspace(1, shifted(1 / num_train_timesteps), steps) (its sigma_min is already shifted).
SIGMA_SPACINGS = ("to_zero", "scheduler_default")


@dataclass(frozen=True)
class FlowSchedule:
    """The sigma schedule of a flow-matching checkpoint (read from `scheduler/scheduler_config.json`)."""

    shift: float = 1.0
    num_train_timesteps: int = 1000
    spacing: str = "to_zero"  # one of SIGMA_SPACINGS

    def __post_init__(self) -> None:
        if self.spacing not in SIGMA_SPACINGS:
            raise ValueError(f"spacing must be one of {SIGMA_SPACINGS}, got {self.spacing!r}")

    @classmethod
    def from_config(cls, config: Mapping, source: str = "scheduler config", spacing: str = "to_zero") -> FlowSchedule:
        for option in _UNSUPPORTED_SCHEDULER_OPTIONS:
            if config.get(option):
                raise UserError(f"{source}: scheduler option {option}={config[option]!r} is not supported "
                                "(expected a plain shifted FlowMatchEulerDiscreteScheduler)")
        shift = config.get("shift", 1.0)
        if not isinstance(shift, (int, float)) or shift <= 0:
            raise UserError(f"{source}: 'shift' must be a positive number, got {shift!r}")
        return cls(shift=float(shift), num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   spacing=spacing)

    @classmethod
    def from_file(cls, path: str | Path, spacing: str = "to_zero") -> FlowSchedule:
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: scheduler config not found") from None
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable JSON scheduler config ({err})") from None
        return cls.from_config(config, source=str(path), spacing=spacing)

    def shift_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        return shift_sigmas(sigmas, self.shift)

    def sigmas(self, steps: int) -> torch.Tensor:
        """`steps + 1` float32 sigmas from 1 (pure noise) down to a terminal 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if self.spacing == "to_zero":  # cast first, then shifted in float32, as the scheduler does with `sigmas=`
            base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1].to(torch.float32)
            shifted = self.shift_sigmas(base)
        else:
            sigma_min = self.shift_sigmas(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64))
            base = torch.linspace(1.0, float(sigma_min), steps, dtype=torch.float64)
            shifted = self.shift_sigmas(base).to(torch.float32)
        return torch.cat([shifted, torch.zeros(1)])

    def timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Model timesteps for all but the terminal sigma."""
        return sigmas[:-1] * self.num_train_timesteps


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One flow-matching Euler step from `sigma` to `sigma_next` (computed in float32)."""
    return latents.float() + (sigma_next - sigma) * velocity.float()


def sde_step_with_logprob(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float, noise_level: float, *,
    sigma_max: float, noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
    next_latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One step of Flow-GRPO's reverse SDE (same marginals as the ODE), and the step's Gaussian log-probability.

    With a = `noise_level`, dt = sigma_next - sigma (< 0) and std_t = a * sqrt(sigma / (1 - sigma)) (at sigma = 1,
    `sigma_max` replaces sigma in the denominator: flow_grpo's `sigmas[1]`, the first step's next sigma):

        mean = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 * (1 - sigma) / (2 sigma)) * dt
        x'   = mean + std_t * sqrt(-dt) * eps
        log p(x' | x) = mean over the non-batch dims of log N(x'; mean, (std_t * sqrt(-dt))^2)

    flow_grpo `sd3_sde_with_logprob.py`. `x'` is `next_latents` when given (recomputing the log-probability of a
    stored transition), else drawn with `noise` (same shape as `latents`) or from `generator` (CPU draw).
    Returns `(x', log_prob (B,), mean, std_t)`, all float32; std_t excludes the sqrt(-dt) factor, as in
    flow_grpo. With a = 0 the step is `euler_step` exactly and the log-probability (undefined) is returned as 0.
    """
    x, v = latents.float(), velocity.float()
    dt = sigma_next - sigma
    std_t = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    if noise_level == 0:
        return mean, torch.zeros(x.shape[0], device=x.device), mean, 0.0
    std = std_t * math.sqrt(-dt)
    if next_latents is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
        next_latents = mean + std * noise.float()
    next_latents = next_latents.float()
    log_prob = -((next_latents.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return next_latents, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std_t


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + g * (v_cond - v_uncond)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def latent_shape(frames: int, height: int, width: int, patch_size: int | Sequence[int] = 2,
                 channels: int = LATENT_CHANNELS, spatial_factor: int = VAE_SPATIAL_FACTOR) -> tuple[int, int, int, int]:
    """(C, T, H, W) of one sample's latents for a video of `frames` (4k + 1) x `height` x `width` through a Wan
    VAE (4x temporal, `spatial_factor` spatial: 8 for Wan2.1's, 16 for Wan2.2's). `patch_size` is the
    transformer's spatial patch, or its (t, h, w) patch."""
    spatial_patch = patch_size if isinstance(patch_size, int) else max(patch_size[-2:])
    multiple = spatial_factor * spatial_patch
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    if (frames - 1) % VAE_TEMPORAL_FACTOR:
        raise ValueError(f"frames must be 4k + 1, got {frames}")
    return (
        channels,
        (frames - 1) // VAE_TEMPORAL_FACTOR + 1,
        height // spatial_factor,
        width // spatial_factor,
    )


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """Standard normal noise `(len(seeds), *shape)`, each sample from its own seed.

    Drawn on the CPU in float32 so a seed gives the same noise whatever the device and batch composition.
    """
    samples = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(samples)


@dataclass
class PromptEmbeds:
    """Text conditioning: token features `(B, L, D)` and pooled features `(B, P)`, or None for a family whose
    transformer takes no pooled embedding (Wan); `mask` `(B, L)` (1 for a prompt token, 0 after) for a family whose
    transformer takes the token mask (HunyuanVideo), else None."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    mask: torch.Tensor | None = None

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(fn(self.prompt_embeds), None if self.pooled is None else fn(self.pooled),
                            None if self.mask is None else fn(self.mask))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        return self._map(lambda t: t.to(device, dtype))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def select(self, index: int | Sequence[int] | torch.Tensor) -> PromptEmbeds:
        index = torch.as_tensor([index] if isinstance(index, int) else index, dtype=torch.long)
        return self._map(lambda t: t[index])

    def expand(self, batch: int) -> PromptEmbeds:
        """Broadcast a single embedding to `batch` rows (a no-op when already `batch` rows)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot broadcast {len(self)} prompt embeddings to a batch of {batch}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        pooled, masks = [p.pooled for p in parts], [p.mask for p in parts]
        for values, what in ((pooled, "pooled features"), (masks, "token masks")):
            if any(v is None for v in values) and not all(v is None for v in values):
                raise ValueError(f"cannot concatenate prompt embeddings with and without {what}")
        return PromptEmbeds(
            torch.cat([p.prompt_embeds for p in parts]), None if pooled[0] is None else torch.cat(pooled),
            None if masks[0] is None else torch.cat(masks),
        )


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigma: float | torch.Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None = None,
    guidance_scale: float = 1.0,
    batch_cfg: bool = True,
    num_train_timesteps: int = 1000,
    guidance_scale_2: float | None = None,
) -> torch.Tensor:
    """Guided velocity for `latents` (B, C, T, H, W) at `sigma`.

    `guidance_scale_2` is the scale of a two-expert model's low-noise expert (None: `guidance_scale`); the model's
    family picks the step's scale (`ModelFamily.guidance_scale`). With guidance, the unconditional and conditional inputs run as ONE batched forward when `batch_cfg`
    (faster), or as two forwards (half the activation memory). `cond`/`uncond` are already on the
    transformer's device and dtype; either may be a single row broadcast to the batch.
    """
    batch = latents.shape[0]
    model_in = latents.to(cond.prompt_embeds.dtype)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
    timestep = (sigma * num_train_timesteps).expand(batch)  # (B,)

    from rlhf.models.family import transformer_family

    family = transformer_family(transformer)

    def forward(x: torch.Tensor, text: PromptEmbeds, t: torch.Tensor) -> torch.Tensor:
        return family.velocity(transformer, x, t, text)

    cond = cond.expand(batch)
    if family.guidance_distilled:  # the scale is the transformer's input: one conditional forward, no CFG
        return family.velocity(transformer, model_in, timestep, cond, guidance=guidance_scale)
    if uncond is None or not uses_guidance(guidance_scale):
        return forward(model_in, cond, timestep)
    uncond = uncond.expand(batch)
    if batch_cfg:
        both = forward(
            torch.cat([model_in, model_in]), PromptEmbeds.cat([uncond, cond]), torch.cat([timestep, timestep])
        )
        v_uncond, v_cond = both.chunk(2)
    else:
        v_uncond, v_cond = forward(model_in, uncond, timestep), forward(model_in, cond, timestep)
    if guidance_scale_2 is not None:
        guidance_scale = family.guidance_scale(transformer, float(timestep[0]), guidance_scale, guidance_scale_2)
    return guided_velocity(v_cond.float(), v_uncond.float(), guidance_scale)


def denoise(
    transformer: torch.nn.Module,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cond: PromptEmbeds,
    uncond: PromptEmbeds | None = None,
    guidance_scale: float = 1.0,
    batch_cfg: bool = True,
    num_train_timesteps: int = 1000,
    on_step: Callable[[int], None] | None = None,
    guidance_scale_2: float | None = None,
) -> torch.Tensor:
    """Integrate from `noise` (at sigmas[0]) to sigmas[-1] with Euler steps; returns float32 latents."""
    latents = noise.float()
    for index in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
        velocity = predict_velocity(
            transformer, latents, sigma, cond, uncond, guidance_scale, batch_cfg, num_train_timesteps,
            guidance_scale_2=guidance_scale_2,
        )
        latents = euler_step(latents, velocity, sigma, sigma_next)
        if on_step is not None:
            on_step(index)
    return latents
