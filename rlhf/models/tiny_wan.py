"""A tiny, randomly initialised Wan2.1 (or Wan2.2 TI2V) checkpoint in `WanPipeline`'s exact folder layout, built
offline.

The folder is written by `WanPipeline.save_pretrained`, so `WanPipeline.from_pretrained` loads it as it loads a
Wan2.1 release (model_index.json lists every component, `transformer_2` empty). Components are the real
classes at toy sizes: `WanTransformer3DModel` (2 blocks, 2 heads x 12), a 2-layer `UMT5EncoderModel` with a
character-level T5 tokenizer written offline (rlhf/models/tiny.py), the tiny Wan VAE that the tiny ContentV
model uses, and a shifted `FlowMatchEulerDiscreteScheduler` (WanPipeline's declared scheduler). The Wan2.2 TI2V
variant (`wan2.2-ti2v`) sets the pipeline's `expand_timesteps` and uses a tiny Wan2.2 VAE (48 latent channels,
16x spatial: a 2x2 patchify around a residual 8x VAE), with the transformer's channels to match. The Wan2.2 A14B
variant (`wan2.2-a14b`) adds a second expert (`transformer_2`, seeded on its own) and `boundary_ratio`
(TINY_BOUNDARY_RATIO, the T2V-A14B release's: with the tiny schedule's shift, 8 steps run 3 high-noise steps and
5 low-noise ones) and writes a low-noise guidance scale (`guidance_2`) in its sampling defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhf.model_defaults import write_model_defaults

# `text_dim` = the UMT5 d_model. attention_head_dim 12 splits into Wan's 3D RoPE as 4 (t) + 4 (h) + 4 (w).
TINY_WAN_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TINY_UMT5_CONFIG: dict[str, Any] = dict(
    d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
)
TINY_WAN_SAMPLING_DEFAULTS: dict[str, Any] = dict(frames=9, height=64, width=64, steps=8, guidance=4.0,
                                                  shift=3.0, fps=8.0)
# Wan2.2's VAE at minimum width: residual blocks, 12 = 3 x 2 x 2 patchified input channels, 48 latent channels. Its
# latents_mean / std are those of a trained VAE; a random one keeps 0 / 1 (the test compares normalised latents).
TINY_WAN22_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=16, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True, in_channels=12,
    out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)


TINY_BOUNDARY_RATIO = 0.875  # Wan2.2 T2V-A14B's
TINY_GUIDANCE_2 = 3.0


def write_tiny_wan(root: Path, seed: int, ti2v: bool = False, a14b: bool = False) -> None:
    """Write the tiny Wan2.1 checkpoint (Wan2.2 TI2V with `ti2v`, Wan2.2 A14B with `a14b`) into the empty folder
    `root` (each component seeded on its own)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from rlhf.models.tiny import TINY_VAE_CONFIG, _component_seed, _reinit_, write_t5_tokenizer
    from rlhf.models.wan import NEGATIVE_PROMPT

    staging = root / ".tokenizer"
    vocab_size = write_t5_tokenizer(staging)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    torch.manual_seed(_component_seed(seed, 0))
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **TINY_UMT5_CONFIG)).eval()
    torch.manual_seed(_component_seed(seed, 1))
    vae = AutoencoderKLWan(**(TINY_WAN22_VAE_CONFIG if ti2v else TINY_VAE_CONFIG))
    channels = dict(in_channels=48, out_channels=48) if ti2v else {}
    transformer = WanTransformer3DModel(**{**TINY_WAN_TRANSFORMER_CONFIG, **channels})
    # The tiny ContentV transformer's init (tiny._reinit_): outputs clearly depend on the latents and the prompt.
    _reinit_(transformer, torch.Generator().manual_seed(_component_seed(seed, 2)))
    experts: dict[str, Any] = {}
    if a14b:
        transformer_2 = WanTransformer3DModel(**TINY_WAN_TRANSFORMER_CONFIG)
        _reinit_(transformer_2, torch.Generator().manual_seed(_component_seed(seed, 3)))
        experts = dict(transformer_2=transformer_2, boundary_ratio=TINY_BOUNDARY_RATIO)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=TINY_WAN_SAMPLING_DEFAULTS["shift"])
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
                expand_timesteps=ti2v, **experts).save_pretrained(root, safe_serialization=True)
    for path in sorted(staging.iterdir()):
        path.unlink()
    staging.rmdir()
    write_model_defaults(root, {**TINY_WAN_SAMPLING_DEFAULTS, "negative_prompt": NEGATIVE_PROMPT,
                                **({"guidance_2": TINY_GUIDANCE_2} if a14b else {})})
