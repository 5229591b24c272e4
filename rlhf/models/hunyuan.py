"""The HunyuanVideo family (diffusers' `HunyuanVideoPipeline` layout): `HunyuanVideoTransformer3DModel`, a Llama
text encoder (`text_encoder`) and CLIP-L (`text_encoder_2`) with their tokenizers, `AutoencoderKLHunyuanVideo` and a
shifted `FlowMatchEulerDiscreteScheduler`.

What our sampler must match, read from diffusers' `HunyuanVideoPipeline` (tests/test_models_hunyuan.py checks it
equal):
- each prompt is wrapped in the pipeline's chat template (`DEFAULT_PROMPT_TEMPLATE`), tokenized to
  `crop_start + max_sequence_length` (95 + 256) tokens with the attention mask, encoded by Llama, and the hidden
  states 2 layers below the top (`hidden_states[-3]`) are kept without the first `crop_start` (the system prompt);
  the token mask goes with them (the transformer takes it as `encoder_attention_mask`);
- the pooled projection is CLIP-L's `pooler_output` (77 tokens);
- the model is guidance-distilled: the guidance scale is an input of the transformer (`guidance = 1000 x g`), and
  one conditional forward gives the guided velocity. The pipeline's true classifier-free guidance
  (`true_cfg_scale > 1` with a negative prompt; default off) is not offered;
- the sigmas are `linspace(1, 0, steps + 1)[:-1]` shifted (ContentV's spacing), Euler steps;
- latents are divided by the VAE's `scaling_factor` before decoding (no per-channel mean / std); the VAE's
  GroupNorms span all frames, so the online trainers' frame decode decodes the whole clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.models.contentv import load_component
from rlhf.models.family import ModelFamily, PromptEncoding
from rlhf.sampling import PromptEmbeds, latent_shape

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # HunyuanVideoPipeline's (prompt tokens after the template's crop)
CLIP_LENGTH = 77
HIDDEN_LAYERS_TO_SKIP = 2  # HunyuanVideoPipeline._get_llama_prompt_embeds' num_hidden_layers_to_skip
# The attention projections of the dual-stream blocks (image and text streams) and of the single-stream blocks
# (to_q/k/v) and the token refiner: the modules diffusers' HunyuanVideo LoRA conversion maps the original
# checkpoints' img_attn_qkv / img_attn_proj / txt_attn_qkv / txt_attn_proj onto.
LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
VAE_SPATIAL_FACTOR = 8


def prompt_template() -> dict[str, Any]:
    """The pipeline's chat template and crop_start (imported, so a diffusers change is followed, not copied)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE


class HunyuanPromptEncoder(PromptEncoding):
    """Llama + CLIP-L tokenizers and encoders, encoding as `HunyuanVideoPipeline.encode_prompt` does."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, tokenizer_2, text_encoder_2: torch.nn.Module,
                 max_sequence_length: int | None = None):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoders = [text_encoder, text_encoder_2]
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        if not self.text_encoders:
            raise RuntimeError("the text encoders were released; encode prompts before releasing them")
        prompts = [str(p) for p in prompts]
        template = prompt_template()
        crop = template["crop_start"]
        tokens = self.tokenizer(
            [template["template"].format(p) for p in prompts],
            max_length=crop + self.max_sequence_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoders[0](input_ids=ids, attention_mask=mask, output_hidden_states=True
                                       ).hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)]
        clip_ids = self.tokenizer_2(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                                    return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoders[1](clip_ids, output_hidden_states=False).pooler_output
        # (B, L, D), (B, P), (B, L): the system prompt's tokens cut, as the pipeline does.
        return PromptEmbeds(hidden[:, crop:], pooled, mask[:, crop:])


class HunyuanVideoFamily(ModelFamily):
    name = "hunyuanvideo"
    pipeline_class = "HunyuanVideoPipeline"
    transformer_class_name = "HunyuanVideoTransformer3DModel"
    vae_class_name = "AutoencoderKLHunyuanVideo"
    text_encoder_folders = ("text_encoder", "text_encoder_2")
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    lora_targets = LORA_TARGETS
    # HunyuanVideoPipeline's call defaults (129 frames of 720x1280, 50 steps, embedded guidance 6); 24 fps is the
    # release's frame rate. The pipeline has no negative prompt.
    sampling_defaults = dict(frames=129, height=720, width=1280, steps=50, guidance=6.0, negative_prompt="",
                             fps=24.0)
    sigma_spacing = "to_zero"
    guidance_distilled = True

    def transformer_class(self) -> type[torch.nn.Module]:
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel

    def claims_transformer(self, transformer_config: Mapping[str, Any]) -> bool:
        # The image-to-video checkpoints share the class and condition on an image: not this family.
        return transformer_config.get("image_condition_type") is None

    def load_transformer(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        return load_component(f"{path / 'transformer'}", self.transformer_class().from_pretrained, path,
                              subfolder="transformer", torch_dtype=dtype)

    def load_vae(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKLHunyuanVideo

        return load_component(f"{path / 'vae'}", AutoencoderKLHunyuanVideo.from_pretrained, path, subfolder="vae",
                              torch_dtype=dtype)

    def load_prompt_encoder(self, path: Path, dtype: torch.dtype, device: torch.device,
                            max_sequence_length: int | None) -> PromptEncoding:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

        tokenizer = load_component(f"{path / 'tokenizer'}", AutoTokenizer.from_pretrained, path, subfolder="tokenizer")
        tokenizer_2 = load_component(f"{path / 'tokenizer_2'}", CLIPTokenizer.from_pretrained, path,
                                     subfolder="tokenizer_2")
        encoders = [
            load_component(f"{path / name}", cls.from_pretrained, path, subfolder=name, dtype=dtype)
            .to(device).eval().requires_grad_(False)
            for name, cls in zip(self.text_encoder_folders, (LlamaModel, CLIPTextModel), strict=True)
        ]
        return HunyuanPromptEncoder(tokenizer, encoders[0], tokenizer_2, encoders[1], max_sequence_length)

    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                 text: PromptEmbeds, guidance: float | None = None) -> torch.Tensor:
        if text.mask is None:
            raise ValueError("HunyuanVideo's transformer needs the prompt's token mask (PromptEmbeds.mask)")
        if guidance is None:
            guidance = float(self.sampling_defaults["guidance"])
        # As the pipeline: the scale in the transformer's dtype, times 1000 (the timestep embedding's range).
        embedded = torch.full((latents.shape[0],), guidance, dtype=latents.dtype, device=latents.device) * 1000.0
        return model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text.prompt_embeds,
            encoder_attention_mask=text.mask,
            pooled_projections=text.pooled,
            guidance=embedded,
            return_dict=False,
        )[0]

    def text_sizes(self, transformer_config: Mapping[str, Any]) -> dict[str, int]:
        return {"text feature size": transformer_config["text_embed_dim"],
                "pooled text size": transformer_config["pooled_projection_dim"]}

    def latent_shape(self, frames: int, height: int, width: int,
                     transformer_config: Mapping[str, Any]) -> tuple[int, int, int, int]:
        if transformer_config.get("patch_size_t", 1) != 1:
            raise ValueError(f"a temporal patch of {transformer_config['patch_size_t']} is not supported "
                             "(HunyuanVideo's is 1)")
        return latent_shape(frames, height, width, transformer_config["patch_size"], transformer_config["in_channels"],
                            spatial_factor=VAE_SPATIAL_FACTOR)

    def decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(vae.parameters()).dtype
        z = latents.to(vae.device, vae_dtype) / vae.config.scaling_factor
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    def decode_frames(self, vae: torch.nn.Module, latents: torch.Tensor, frames: Sequence[int],
                      checkpoint: bool = False) -> torch.Tensor:
        # Unlike the Wan VAE, HunyuanVideo's is not causal as a whole: its GroupNorms take statistics over every
        # frame, so a frame depends on later latent frames and the whole clip is decoded (as `decode`, with the
        # VAE's own temporal tiling); with `checkpoint` its activations are recomputed in the backward pass.
        if checkpoint and torch.is_grad_enabled():
            video = torch.utils.checkpoint.checkpoint(self.decode, vae, latents, use_reentrant=False)
        else:
            video = self.decode(vae, latents)
        video = video[:, :, list(frames)]  # (B, 3, n, H, W) in [-1, 1]
        return ((video.float() + 1) / 2).permute(0, 2, 1, 3, 4)

    def lora_pipeline(self) -> type:
        from diffusers import HunyuanVideoPipeline

        return HunyuanVideoPipeline
