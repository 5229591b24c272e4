"""SD3Transformer3DModel: checkpoint compatibility with SD3, position embedding formula, (un)patchify."""

import math

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0

from rlhf.models.attention import JointAttnProcessor, sdpa_kernel
from rlhf.models.transformer import SD3Transformer3DModel

TINY = dict(
    in_channels=16, out_channels=16, patch_size=2, num_layers=3, num_attention_heads=2, attention_head_dim=16,
    joint_attention_dim=32, pooled_projection_dim=24,
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def test_parameter_names_and_shapes_equal_sd3():
    ours = SD3Transformer3DModel(**TINY)
    sd3 = SD3Transformer2DModel(**TINY, caption_projection_dim=32, pos_embed_max_size=192, qk_norm="rms_norm")
    assert {k: v.shape for k, v in ours.named_parameters()} == {k: v.shape for k, v in sd3.named_parameters()}
    # So an SD3-named state dict loads strictly.
    ours.load_state_dict({k: v for k, v in sd3.state_dict().items() if k != "pos_embed.pos_embed"}, strict=True)


def test_class_defaults_are_contentv_8b():
    # ContentV-8B's config.json sets only the six size keys; the rest must come from the class.
    model = SD3Transformer3DModel.from_config({"num_layers": 1})
    assert model.inner_dim == 38 * 64 == 2432
    assert model.context_embedder.in_features == 4096 and model.context_embedder.out_features == 2432
    assert model.time_text_embed.text_embedder.linear_1.in_features == 2048


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def test_position_embedding_equals_formula_non_square_multi_frame():
    model = randomized(SD3Transformer3DModel(**TINY))
    frames, height, width = 3, 4, 10  # latent grid 3 x 2 x 5 tokens after 2x2 patches
    dim = model.inner_dim
    zeros = torch.zeros(1, 16, frames, height, width)
    with torch.no_grad():
        pos = model.pos_embed(zeros)[0] - model.pos_embed.proj.bias  # conv of zeros = bias
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    t, y, x = t.flatten(), y.flatten(), x.flatten()  # tokens ordered (t, h, w)
    # ContentV: temporal quarter first, then spatial (width coordinate half, height half), spatial grid / 0.5.
    expected = torch.cat([sincos_1d(dim // 4, t), sincos_1d(3 * dim // 8, x / 0.5), sincos_1d(3 * dim // 8, y / 0.5)], 1)
    torch.testing.assert_close(pos.double(), expected, rtol=0, atol=1e-5)


def test_patch_embedding_is_per_frame_conv_and_unpatchify_inverts_patchify():
    model = randomized(SD3Transformer3DModel(**TINY))
    latents = torch.randn(2, 16, 3, 4, 6)
    with torch.no_grad():
        tokens = model.pos_embed(latents) - model.pos_embed.position_embedding(3, 2, 3, latents)
        frame1 = model.pos_embed.proj(latents[:, :, 1])  # (B, D, 2, 3)
    torch.testing.assert_close(tokens[:, 6:12], frame1.flatten(2).transpose(1, 2))

    # Build tokens whose channel layout is (p, q, c) per patch and check unpatchify against einops-style indexing.
    p = 2
    patches = torch.randn(2, 3 * 2 * 3, p * p * 16)
    video = model.unpatchify(patches, 3, 4, 6)
    t, h, w, pi, qi, c = 2, 1, 2, 1, 0, 5
    token = t * 6 + h * 3 + w
    assert video[1, c, t, h * p + pi, w * p + qi] == patches[1, token, (pi * p + qi) * 16 + c]


def test_forward_shape_and_gradient_checkpointing_equivalence():
    model = randomized(SD3Transformer3DModel(**TINY)).train()
    inputs = (torch.randn(2, 16, 2, 4, 4), torch.randn(2, 5, 32), torch.randn(2, 24), torch.tensor([900.0, 100.0]))
    plain = model(*inputs).sample
    plain.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    checkpointed = model(*inputs).sample
    checkpointed.square().mean().backward()
    assert plain.shape == (2, 16, 2, 4, 4)
    torch.testing.assert_close(checkpointed, plain)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_attention_processor_matches_diffusers():
    model = randomized(SD3Transformer3DModel(**TINY))
    inputs = (torch.randn(1, 16, 2, 4, 4), torch.randn(1, 5, 32), torch.randn(1, 24), torch.tensor([500.0]))
    with torch.no_grad():
        model.set_attn_processor(JointAttnProcessor2_0())
        reference = model(*inputs).sample

        calls = []

        def counting_kernel(q, k, v, heads):
            calls.append(q.shape)
            assert q.shape[1] == heads and math.isclose(q.shape[-1], 16)
            return sdpa_kernel(q, k, v, heads)

        model.set_attn_processor(JointAttnProcessor(counting_kernel))
        ours = model(*inputs).sample
    torch.testing.assert_close(ours, reference)
    assert len(calls) == TINY["num_layers"]
