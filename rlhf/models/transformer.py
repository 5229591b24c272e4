"""ContentV's video MM-DiT: SD3.5-Large blocks with a per-frame patch embedding and 3D sin-cos positions.

The published checkpoint's `transformer/config.json` names the class `SD3Transformer3DModel` and sets
only `in_channels, out_channels, patch_size, num_layers, num_attention_heads, attention_head_dim`;
everything else is fixed by the class (see `../shared/design/contentv-facts.md`). Parameter names are
those of diffusers' `SD3Transformer2DModel` with the same configuration, so the real weights load with
no missing or unexpected keys. Unlike SD3 there is no learned/cropped position table: positions are the
fixed 3D sin-cos embedding of the (T, H/2, W/2) token grid, computed for each input shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin, SD3Transformer2DLoadersMixin
from diffusers.models.attention import AttentionMixin, JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, get_3d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import apply_lora_scale

# Fixed by the ContentV class, not stored in its config.json.
POS_EMBED_MAX_SIZE = 192
QK_NORM = "rms_norm"


def video_pos_embed(embed_dim: int, frames: int, height: int, width: int) -> torch.Tensor:
    """3D sin-cos position embedding for a (frames, height, width) token grid, tokens ordered (t, h, w).

    Returns `(frames * height * width, embed_dim)` float32. The spatial size is given width first and
    the spatial grid is interpolated by 0.5, as ContentV was trained.
    """
    pos = get_3d_sincos_pos_embed(
        embed_dim=embed_dim,
        spatial_size=(width, height),
        temporal_size=frames,
        spatial_interpolation_scale=0.5,
        temporal_interpolation_scale=1.0,
        output_type="pt",
    )  # (T, H*W, D)
    return pos.flatten(0, 1)


class VideoPatchEmbed(nn.Module):
    """Per-frame `Conv2d` patchify plus the 3D sin-cos position embedding.

    The conv is named `proj`, like SD3's `PatchEmbed.proj`, so `pos_embed.proj.*` weights load as is.
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position_embedding(self, frames: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        # The table depends only on the grid: cache it per shape/device/dtype (sampling calls this per step).
        key = (frames, height, width, like.device, like.dtype)
        if key not in self._pos_cache:
            pos = video_pos_embed(self.embed_dim, frames, height, width)
            self._pos_cache[key] = pos.to(device=like.device, dtype=like.dtype)
        return self._pos_cache[key]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = latents.shape  # (B, C, T, H, W)
        x = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)  # (B*T, C, H, W)
        x = self.proj(x)  # (B*T, D, H/p, W/p)
        grid_h, grid_w = x.shape[-2:]
        x = x.reshape(batch, frames, self.embed_dim, grid_h * grid_w).transpose(2, 3)  # (B, T, h*w, D)
        x = x.reshape(batch, frames * grid_h * grid_w, self.embed_dim)  # (B, T*h*w, D)
        return x + self.position_embedding(frames, grid_h, grid_w, x)


class SD3Transformer3DModel(
    ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin, SD3Transformer2DLoadersMixin
):
    """ContentV's transformer (38 layers, 38 heads x 64 for ContentV-8B).

    Args:
        in_channels / out_channels: latent channels (16 for the Wan VAE).
        patch_size: spatial patch size (2); frames are not patched.
        num_layers, num_attention_heads, attention_head_dim: the MM-DiT size.
        joint_attention_dim: text feature size (T5-XXL: 4096). Not in ContentV's config; tiny models set it.
        pooled_projection_dim: pooled CLIP-L + CLIP-G size (2048). Not in ContentV's config either.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]
    _repeated_blocks = ["JointTransformerBlock"]  # regional torch.compile (rlhf/compiling.py)
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        patch_size: int = 2,
        num_layers: int = 38,
        num_attention_heads: int = 38,
        attention_head_dim: int = 64,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 2048,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = VideoPatchEmbed(patch_size, in_channels, self.inner_dim)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=self.inner_dim, pooled_projection_dim=pooled_projection_dim
        )
        # ContentV sets caption_projection_dim to the inner dim.
        self.context_embedder = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=self.inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=index == num_layers - 1,
                    qk_norm=QK_NORM,
                    use_dual_attention=False,
                )
                for index in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * out_channels, bias=True)
        self.gradient_checkpointing = False

    def unpatchify(self, tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """`(B, T*h*w, p*p*C)` tokens back to `(B, C, T, h*p, w*p)` latents."""
        p = self.config.patch_size
        batch = tokens.shape[0]
        grid_h, grid_w = height // p, width // p
        x = tokens.reshape(batch, frames, grid_h, grid_w, p, p, self.out_channels)  # (B, T, h, w, p, q, C)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, T, h, p, w, q)
        return x.reshape(batch, self.out_channels, frames, grid_h * p, grid_w * p)

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Predict the flow velocity.

        Args:
            hidden_states: noisy latents `(B, C, T, H, W)`.
            encoder_hidden_states: text tokens `(B, L, joint_attention_dim)`.
            pooled_projections: pooled text `(B, pooled_projection_dim)`.
            timestep: `(B,)` model timesteps, `1000 * sigma`.
        """
        _, _, frames, height, width = hidden_states.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height/width ({height}x{width}) must be divisible by patch_size={p}")

        # 1. Tokens: patchify + positions, timestep/pooled-text conditioning, text projection.
        hidden_states = self.pos_embed(hidden_states)  # (B, T*h*w, D)
        temb = self.time_text_embed(timestep, pooled_projections)  # (B, D)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)  # (B, L, D)

        # 2. Joint attention blocks over all video tokens and text tokens.
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )

        # 3. Output head and unpatchify.
        hidden_states = self.norm_out(hidden_states, temb)
        hidden_states = self.proj_out(hidden_states)  # (B, T*h*w, p*p*C)
        output = self.unpatchify(hidden_states, frames, height, width)  # (B, C, T, H, W)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
