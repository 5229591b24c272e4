"""The ContentV-8B family: SD3.5-style MM-DiT on video tokens, CLIP-L + CLIP-G + T5 text, the Wan2.1 VAE.

Facts from ../shared/design/contentv-facts.md. The published `model_index.json` (`ContentVPipeline`) lists the
scheduler, text encoders and tokenizers but NOT `transformer/` and `vae/`, so each subfolder is loaded
explicitly, like ContentV's demo (transformer in bf16, VAE in fp32 by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlhf.models.family import ModelFamily, PromptEncoding
from rlhf.options import DEFAULT_LORA_TARGETS, DEFAULT_NEGATIVE_PROMPT
from rlhf.sampling import PromptEmbeds, latent_shape

# The eight MM-DiT attention projections of every block, and the reference demo's negative prompt: defined in
# rlhf.options (kept light for `--help`), whose sampling defaults are ContentV's.
LORA_TARGETS = DEFAULT_LORA_TARGETS
NEGATIVE_PROMPT = DEFAULT_NEGATIVE_PROMPT


def load_component(what: str, loader, *args, **kwargs):
    """`loader(*args, local_files_only=True, **kwargs)`; a loading failure of a present folder (corrupt or
    mismatched files) becomes a UserError naming `what`."""
    from safetensors import SafetensorError

    from rlhf.errors import UserError, one_line

    try:
        return loader(*args, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise UserError(f"{what}: could not be loaded ({one_line(err)})") from None


def load_wan_vae(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The Wan VAE of a diffusers-layout folder (ContentV's, Wan2.1's, Wan2.2's), with CPU-friendly RMS norms
    (`rlhf.models.wan_vae`: the same formula, a third faster decoding on CPU, diffusers' own elsewhere)."""
    from diffusers import AutoencoderKLWan

    from rlhf.models.wan_vae import use_cpu_friendly_norms

    vae = load_component(f"{path / 'vae'}", AutoencoderKLWan.from_pretrained, path, subfolder="vae",
                         torch_dtype=dtype)
    use_cpu_friendly_norms(vae)
    return vae


def decode_wan_vae(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Decode with the Wan2.1 VAE (`latents * latents_std + latents_mean`, then `vae.decode`), clamped to [-1, 1]."""
    from rlhf.video import decode_latents

    return decode_latents(vae, latents)


class ContentVFamily(ModelFamily):
    name = "contentv"
    pipeline_class = "ContentVPipeline"
    transformer_class_name = "SD3Transformer3DModel"
    text_encoder_folders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_folders = ("tokenizer", "tokenizer_2", "tokenizer_3")
    lora_targets = LORA_TARGETS
    # ContentV's reference pipeline; equal to rlhf.options' SamplingOptions / VideoOptions defaults.
    sampling_defaults = dict(frames=125, height=432, width=768, steps=50, guidance=6.0,
                             negative_prompt=NEGATIVE_PROMPT, fps=24.0)
    sigma_spacing = "to_zero"

    def transformer_class(self) -> type[torch.nn.Module]:
        from rlhf.models.transformer import SD3Transformer3DModel

        return SD3Transformer3DModel

    def load_transformer(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        return load_component(f"{path / 'transformer'}", self.transformer_class().from_pretrained, path,
                              subfolder="transformer", torch_dtype=dtype)

    def load_vae(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        return load_wan_vae(path, dtype)

    def load_prompt_encoder(self, path: Path, dtype: torch.dtype, device: torch.device,
                            max_sequence_length: int | None) -> PromptEncoding:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from rlhf.text_encoding import PromptEncoder

        tokenizers = [
            load_component(f"{path / name}", cls.from_pretrained, path, subfolder=name)
            for name, cls in zip(self.tokenizer_folders, (CLIPTokenizer, CLIPTokenizer, T5TokenizerFast), strict=True)
        ]
        encoder_classes = (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)
        encoders = [
            load_component(f"{path / name}", cls.from_pretrained, path, subfolder=name, dtype=dtype)
            .to(device).eval().requires_grad_(False)
            for name, cls in zip(self.text_encoder_folders, encoder_classes, strict=True)
        ]
        return PromptEncoder(tokenizers, encoders, max_sequence_length)

    def use_device_attention(self, transformer: torch.nn.Module, device: torch.device) -> None:
        if device.type == "npu":  # the reference's npu_fusion_attention (rlhf/models/attention.py)
            from rlhf.models.attention import use_npu_attention

            use_npu_attention(transformer)

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                 text: PromptEmbeds) -> torch.Tensor:
        return model(
            hidden_states=latents,
            encoder_hidden_states=text.prompt_embeds,
            pooled_projections=text.pooled,
            timestep=timestep,
            return_dict=False,
        )[0]

    def text_sizes(self, transformer_config: Mapping[str, Any]) -> dict[str, int]:
        return {"text feature size": transformer_config["joint_attention_dim"],
                "pooled text size": transformer_config["pooled_projection_dim"]}

    def latent_shape(self, frames: int, height: int, width: int,
                     transformer_config: Mapping[str, Any]) -> tuple[int, int, int, int]:
        return latent_shape(frames, height, width, transformer_config["patch_size"],
                            transformer_config["in_channels"])

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return decode_wan_vae(vae, latents)

    def lora_pipeline(self) -> type:
        # ContentV's transformer is SD3's with a video patch embedding: SD3's LoRA format and loader fit it.
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline
