"""The Wan2.1 text-to-video family (diffusers' `WanPipeline` layout): `WanTransformer3DModel`, a UMT5 text
encoder with its tokenizer, the Wan2.1 VAE (`AutoencoderKLWan`) and a `FlowMatchEulerDiscreteScheduler`.

What our sampler must match, read from diffusers' `WanPipeline` (tests/test_models_wan.py checks it equal):
- prompts are cleaned (`prompt_clean`: ftfy when installed, HTML unescape, whitespace collapse), tokenized to
  `max_sequence_length` (512) with the attention mask, encoded by UMT5, and the hidden states after each
  prompt's last token are zeroed; there is no pooled embedding;
- the transformer takes `hidden_states`, `timestep` (= sigma * 1000, one per sample) and
  `encoder_hidden_states`; guidance is v_uncond + g * (v_cond - v_uncond);
- the sigmas are the scheduler's own `set_timesteps(steps)` spacing (rlhf.sampling.FlowSchedule's
  "scheduler_default"), Euler steps;
- latents are normalised per channel with the VAE's `latents_mean` / `latents_std` (as ContentV's, same VAE).

Wan2.1 releases ship `UniPCMultistepScheduler` (a multistep solver) in `scheduler/`; our sampler integrates with
Euler steps, so such a folder is refused with the fix (docs/models.md) rather than sampled differently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError
from rlhf.models.contentv import decode_wan_vae, load_component
from rlhf.models.family import ModelFamily, PromptEncoding, unwrap
from rlhf.sampling import FlowSchedule, PromptEmbeds, latent_shape

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline's
# The self- and cross-attention projections of every Wan block (diffusers' Wan LoRA scripts adapt these).
LORA_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)
# The negative prompt of diffusers' WanPipeline example (an English rendering of Wan's own).
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)


class WanPromptEncoder(PromptEncoding):
    """UMT5 tokenizer + encoder, encoding as `WanPipeline._get_t5_prompt_embeds` does."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_sequence_length: int | None = None):
        self.tokenizer = tokenizer
        self.text_encoders = [text_encoder]
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if not self.text_encoders:
            raise RuntimeError("the text encoders were released; encode prompts before releasing them")
        tokens = self.tokenizer(
            [prompt_clean(str(p)) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoders[0](ids, mask).last_hidden_state  # (B, L, D)
        # WanPipeline keeps each prompt's first `mask.sum()` states and pads with zeros: the same as masking.
        return PromptEmbeds(hidden * mask[..., None].to(hidden.dtype), None)


class Wan21Family(ModelFamily):
    name = "wan2.1"
    pipeline_class = "WanPipeline"
    transformer_class_name = "WanTransformer3DModel"
    text_encoder_folders = ("text_encoder",)
    tokenizer_folders = ("tokenizer",)
    lora_targets = LORA_TARGETS
    # WanPipeline's call defaults (480p, 81 frames at 16 fps, 50 steps, guidance 5).
    sampling_defaults = dict(frames=81, height=480, width=832, steps=50, guidance=5.0,
                             negative_prompt=NEGATIVE_PROMPT, fps=16.0)
    sigma_spacing = "scheduler_default"
    # The VAE: Wan2.1's has 16 latent channels and 8x spatial compression. Families sharing
    # WanTransformer3DModel are told apart by the transformer's out_channels (= the VAE's latent channels).
    vae_latent_channels = 16
    vae_spatial_factor = 8

    def transformer_class(self) -> type[torch.nn.Module]:
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def claims_transformer(self, transformer_config: Mapping[str, Any]) -> bool:
        return transformer_config.get("out_channels", 16) == self.vae_latent_channels

    def schedule(self, path: Path) -> FlowSchedule:
        import json

        config_file = path / "scheduler" / "scheduler_config.json"
        try:
            name = json.loads(config_file.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None  # FlowSchedule.from_file names the problem
        if name not in (None, "FlowMatchEulerDiscreteScheduler"):
            raise UserError(f"{config_file}: scheduler {name} is not supported (the sampler takes Euler steps: "
                            "expected FlowMatchEulerDiscreteScheduler, WanPipeline's declared scheduler; for a Wan2.1 "
                            "release with UniPCMultistepScheduler, write a FlowMatchEulerDiscreteScheduler config "
                            "whose shift is its flow_shift, see docs/models.md)")
        return super().schedule(path)

    def load_transformer(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        return load_component(f"{path / 'transformer'}", self.transformer_class().from_pretrained, path,
                              subfolder="transformer", torch_dtype=dtype)

    def load_vae(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLWan

        return load_component(f"{path / 'vae'}", AutoencoderKLWan.from_pretrained, path, subfolder="vae",
                              torch_dtype=dtype)

    def load_prompt_encoder(self, path: Path, dtype: torch.dtype, device: torch.device,
                            max_sequence_length: int | None) -> PromptEncoding:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = load_component(f"{path / 'tokenizer'}", AutoTokenizer.from_pretrained, path, subfolder="tokenizer")
        encoder = load_component(f"{path / 'text_encoder'}", UMT5EncoderModel.from_pretrained, path,
                                 subfolder="text_encoder", dtype=dtype)
        return WanPromptEncoder(tokenizer, encoder.to(device).eval().requires_grad_(False), max_sequence_length)

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                 text: PromptEmbeds) -> torch.Tensor:
        return model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text.prompt_embeds,
            return_dict=False,
        )[0]

    def text_sizes(self, transformer_config: Mapping[str, Any]) -> dict[str, int]:
        return {"text feature size": transformer_config["text_dim"], "pooled text size": 0}

    def latent_shape(self, frames: int, height: int, width: int,
                     transformer_config: Mapping[str, Any]) -> tuple[int, int, int, int]:
        patch = tuple(transformer_config["patch_size"])  # (t, h, w)
        if patch[0] != 1:
            raise ValueError(f"a temporal patch of {patch[0]} is not supported (Wan2.1's is 1)")
        return latent_shape(frames, height, width, patch, transformer_config["out_channels"],
                            spatial_factor=self.vae_spatial_factor)

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        return decode_wan_vae(vae, latents)

    def lora_pipeline(self) -> type:
        from diffusers import WanPipeline

        return WanPipeline


class Wan22TI2VFamily(Wan21Family):
    """Wan2.2 TI2V-5B as a text-to-video model: WanPipeline with `expand_timesteps` (one timestep per latent token)
    and the Wan2.2 VAE (48 latent channels, 16x spatial compression with its own 2x2 patchify inside)."""

    name = "wan2.2-ti2v"
    vae_latent_channels = 48
    vae_spatial_factor = 16
    # WanPipeline's text-to-video settings for TI2V-5B (the Wan2.2 model card): 121 frames of 704x1280 at 24 fps.
    sampling_defaults = dict(frames=121, height=704, width=1280, steps=50, guidance=5.0,
                             negative_prompt=NEGATIVE_PROMPT, fps=24.0)

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                 text: PromptEmbeds) -> torch.Tensor:
        # WanPipeline's expand_timesteps gives every latent token of a text-to-video sample the same timestep
        # (its mask is all ones): (B,) -> (B, T * H/2 * W/2), the per-token modulation path of the transformer.
        frames, height, width = latents.shape[2:]
        patch = unwrap(model).config.patch_size
        tokens = frames // patch[0] * (height // patch[1]) * (width // patch[2])
        return super().velocity(model, latents, timestep[:, None].expand(-1, tokens), text)
