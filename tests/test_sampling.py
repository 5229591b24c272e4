"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler, and CFG batching against two passes."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlhf.errors import UserError
from rlhf.models.transformer import SD3Transformer3DModel
from rlhf.options import round_frames, uses_guidance
from rlhf.sampling import (
    FlowSchedule,
    PromptEmbeds,
    denoise,
    euler_step,
    initial_noise,
    latent_shape,
    predict_velocity,
)

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=24)


def reference_scheduler(shift: float, steps: int) -> FlowMatchEulerDiscreteScheduler:
    """Configured as ContentV's pipeline does it: sigmas linspace(1, 0, steps + 1)[:-1], shifted."""
    import numpy as np

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return scheduler


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
@pytest.mark.parametrize("steps", [1, 8, 50])
def test_sigmas_and_timesteps_equal_diffusers(shift, steps):
    ours = FlowSchedule(shift=shift)
    sigmas = ours.sigmas(steps)
    reference = reference_scheduler(shift, steps)
    torch.testing.assert_close(sigmas, reference.sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.timesteps(sigmas), reference.timesteps, rtol=0, atol=1e-3)


def test_shift_formula():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(FlowSchedule(shift=3.0).shift_sigmas(s), 3 * s / (1 + 2 * s))


def test_euler_updates_equal_diffusers_step():
    steps, shift = 6, 3.0
    reference = reference_scheduler(shift, steps)
    sigmas = FlowSchedule(shift=shift).sigmas(steps)
    generator = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(2, 16, 2, 4, 4, generator=generator)
    for index, t in enumerate(reference.timesteps):
        velocity = torch.randn(ours.shape, generator=generator)
        theirs = reference.step(velocity, t, theirs, return_dict=False)[0]
        ours = euler_step(ours, velocity, float(sigmas[index]), float(sigmas[index + 1]))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_schedule_read_from_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_config(tmp_path)
    assert FlowSchedule.from_file(path).shift == 5.0
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_config(tmp_path)
    with pytest.raises(UserError, match="use_dynamic_shifting"):
        FlowSchedule.from_file(path)


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = SD3Transformer3DModel(**TINY).eval()
    for p in model.parameters():  # diffusers zero-inits the output head; make outputs depend on inputs
        torch.nn.init.normal_(p, std=0.05)
    return model


def embeds(batch: int, seed: int) -> PromptEmbeds:
    g = torch.Generator().manual_seed(seed)
    return PromptEmbeds(torch.randn(batch, 7, 32, generator=g), torch.randn(batch, 24, generator=g))


@torch.no_grad()
def test_batched_cfg_equals_two_passes(transformer):
    latents = torch.randn(3, 16, 2, 4, 6)
    cond, uncond = embeds(3, 1), embeds(1, 2)
    batched = predict_velocity(transformer, latents, 0.7, cond, uncond, guidance_scale=5.0, batch_cfg=True)

    def forward(text: PromptEmbeds) -> torch.Tensor:
        return transformer(latents, text.prompt_embeds, text.pooled, torch.full((3,), 700.0)).sample

    v_cond, v_uncond = forward(cond), forward(uncond.expand(3))
    expected = v_uncond + 5.0 * (v_cond - v_uncond)
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)
    sequential = predict_velocity(transformer, latents, 0.7, cond, uncond, guidance_scale=5.0, batch_cfg=False)
    torch.testing.assert_close(sequential, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_guidance_at_or_below_1_runs_no_unconditional_branch(transformer, scale):
    # diffusers and ContentV: do_classifier_free_guidance = guidance_scale > 1.
    assert not uses_guidance(scale) and uses_guidance(1.01)
    latents, cond, uncond = torch.randn(2, 16, 2, 4, 6), embeds(2, 1), embeds(1, 2)
    batches = []
    hook = transformer.register_forward_pre_hook(lambda _, args, kwargs: batches.append(len(kwargs["timestep"])),
                                                 with_kwargs=True)
    try:
        guided = predict_velocity(transformer, latents, 0.7, cond, uncond, guidance_scale=scale)
        plain = predict_velocity(transformer, latents, 0.7, cond)
    finally:
        hook.remove()
    assert batches == [2, 2]  # one conditional forward each, no unconditional rows
    torch.testing.assert_close(guided, plain)


@torch.no_grad()
def test_same_seed_same_latents_and_batch_independent(transformer):
    shape = latent_shape(5, 32, 48)
    sigmas = FlowSchedule(shift=3.0).sigmas(3)
    cond, uncond = embeds(1, 1), embeds(1, 2)

    def run(seeds):
        return denoise(transformer, initial_noise(shape, seeds), sigmas, cond, uncond, guidance_scale=4.0)

    a, b = run([11]), run([11])
    assert torch.equal(a, b)
    assert not torch.equal(a, run([12]))
    torch.testing.assert_close(run([12, 11])[1:], a, rtol=1e-5, atol=1e-5)


def test_frames_and_shapes():
    assert [round_frames(n) for n in (1, 5, 16, 17, 18, 125)] == [1, 5, 17, 17, 17, 125]
    assert latent_shape(125, 432, 768) == (16, 32, 54, 96)
    with pytest.raises(ValueError):
        latent_shape(17, 40, 64)
