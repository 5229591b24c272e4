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

Wan2.2 A14B (`wan2.2-a14b`) is WanPipeline with two experts: `transformer` denoises timesteps >= `boundary_ratio x
num_train_timesteps` (high noise), `transformer_2` those below, each with its own guidance scale. The family hands
the rest of the toolkit ONE module, `WanExperts`, that holds both and sends each sample of a batch to the expert of
its timestep: LoRA attaches one adapter to each expert, and a trainer's forward or the sampler's call is unchanged
(which expert a sampled sigma trains follows from the routing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError
from rlhf.models.contentv import decode_wan_vae, load_component, load_wan_vae
from rlhf.models.family import ModelFamily, PromptEncoding, has_second_expert, read_model_index, unwrap
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

    def check_dir(self, path: Path, transformer: bool = True, vae: bool = True, text_encoders: bool = True) -> Path:
        # One expert of a two-expert checkpoint alone would sample something its pipeline never does.
        if transformer and has_second_expert(read_model_index(path)):
            raise UserError(f"{path / 'model_index.json'}: lists transformer_2 (a two-expert Wan2.2 A14B checkpoint); "
                            f"the {self.name} family would load only one expert (use --family wan2.2-a14b)")
        return super().check_dir(path, transformer, vae, text_encoders)

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
        return load_wan_vae(path, dtype)

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


# The low-noise expert's LoRA in an adapter's diffusers export (the high-noise expert's is DIFFUSERS_WEIGHTS):
# `WanPipeline.load_lora_weights(dir, weight_name=EXPERT_2_WEIGHTS, load_into_transformer_2=True)` loads it.
EXPERT_2_WEIGHTS = "pytorch_lora_weights_transformer_2.safetensors"
EXPERTS = ("transformer", "transformer_2")  # folder and attribute names, high-noise expert first


class WanExperts(torch.nn.Module):
    """Wan2.2 A14B's two `WanTransformer3DModel` experts as one module: `transformer` (high noise) for timesteps
    >= `boundary_timestep`, `transformer_2` below, as WanPipeline switches them, but per sample, so a training batch
    of mixed sigmas runs each sample through its own expert (and only that expert receives its gradient).

    The PEFT methods the toolkit calls (`add_adapter`, `set_adapters`, ...) act on both experts: one adapter per
    expert under the same name, whose weights are the module's `transformer.*` / `transformer_2.*` LoRA parameters.
    """

    # The experts' attribute names: rlhf.lowmem.expert_transformers finds them here, so quantisation, block
    # offloading and `auto` checkpointing act on the blocks of both.
    expert_names = EXPERTS

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)

    @property
    def experts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        return self.transformer, self.transformer_2

    @property
    def config(self) -> Any:
        return self.transformer.config  # the experts' configs are equal (checked when loaded)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which samples the high-noise expert takes (`timestep` (B,) or per token (B, tokens))."""
        return timestep.reshape(timestep.shape[0], -1)[:, 0] >= self.boundary_timestep

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        high = self.high_noise(timestep)
        if bool(high.all()) or not bool(high.any()):  # one expert for the whole batch (always when sampling)
            expert = self.transformer if bool(high.all()) else self.transformer_2
            return (expert(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           return_dict=False, **kwargs)[0],)
        outputs, order = [], []
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            index = rows.nonzero().squeeze(1)
            outputs.append(expert(hidden_states=hidden_states[index], timestep=timestep[index],
                                  encoder_hidden_states=encoder_hidden_states[index], return_dict=False, **kwargs)[0])
            order.append(index)
        return (torch.cat(outputs)[torch.cat(order).argsort()],)

    # ---- PEFT and diffusers model methods, on both experts --------------------------------------------------
    @property
    def peft_config(self) -> dict[str, Any]:
        # The experts' (each holds the same config per adapter name), unless peft wrapped this module as a whole
        # (`get_peft_model`), which sets its own.
        own = self.__dict__.get("_own_peft_config")
        return own if own is not None else self.transformer.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, Any]) -> None:
        self.__dict__["_own_peft_config"] = value

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        import copy

        for expert in self.experts:
            expert.add_adapter(copy.deepcopy(adapter_config), adapter_name=adapter_name)

    def set_adapters(self, adapter_names: list[str] | str, weights: Any = None) -> None:
        for expert in self.experts:
            expert.set_adapters(adapter_names, weights=weights)

    def enable_adapters(self) -> None:
        for expert in self.experts:
            expert.enable_adapters()

    def disable_adapters(self) -> None:
        for expert in self.experts:
            expert.disable_adapters()

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        for expert in self.experts:
            expert.delete_adapters(adapter_names)

    def active_adapters(self) -> list[str]:
        return self.transformer.active_adapters()

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict: Any, prefix: str = "transformer",
                          **kwargs: Any) -> None:
        """Load the diffusers export of an adapter: `weight_name` into `transformer`, EXPERT_2_WEIGHTS beside it
        into `transformer_2`."""
        self.transformer.load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix=prefix, **kwargs)
        self.transformer_2.load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix=prefix,
                                             **{**kwargs, "weight_name": EXPERT_2_WEIGHTS})

    def enable_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        for expert in self.experts:
            expert.enable_gradient_checkpointing(*args, **kwargs)

    def disable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.disable_gradient_checkpointing()

    def compile_repeated_blocks(self, *args: Any, **kwargs: Any) -> None:
        for expert in self.experts:
            expert.compile_repeated_blocks(*args, **kwargs)


def _expert_lora_pipeline() -> type:
    """WanPipeline with a `save_lora_weights` that writes each expert's LoRA to its own file (the high-noise
    expert's as DIFFUSERS_WEIGHTS, the low-noise one's as EXPERT_2_WEIGHTS), each loadable by
    `WanPipeline.load_lora_weights` (the second with `load_into_transformer_2=True`)."""
    from diffusers import WanPipeline

    class WanExpertsLoraExport(WanPipeline):
        @classmethod
        def save_lora_weights(cls, save_directory: Any, transformer_lora_layers: dict[str, torch.Tensor],
                              **kwargs: Any) -> None:
            from rlhf.lora import DIFFUSERS_WEIGHTS

            for expert, weight_name in zip(EXPERTS, (DIFFUSERS_WEIGHTS, EXPERT_2_WEIGHTS), strict=True):
                layers = {key.removeprefix(f"{expert}."): value for key, value in transformer_lora_layers.items()
                          if key.startswith(f"{expert}.")}
                WanPipeline.save_lora_weights(save_directory, transformer_lora_layers=layers,
                                              weight_name=weight_name, **kwargs)

    return WanExpertsLoraExport


class Wan22A14BFamily(Wan21Family):
    """Wan2.2 T2V-A14B: WanPipeline with `transformer_2` and `boundary_ratio`, the Wan2.1 VAE (16 channels). Both
    experts are loaded and held (a real A14B: two 14B transformers, about 2 x 28 GB in bf16)."""

    name = "wan2.2-a14b"
    transformer_class_name = "WanExperts"
    transformer_folders = EXPERTS
    # The Wan2.2 T2V-A14B model card's WanPipeline call: 81 frames of 720x1280 at 16 fps, 40 steps, guidance 4.0
    # for the high-noise expert and 3.0 for the low-noise one (Wan2.2's own sample_guide_scale (3.0, 4.0)).
    sampling_defaults = dict(frames=81, height=720, width=1280, steps=40, guidance=4.0, guidance_2=3.0,
                             negative_prompt=NEGATIVE_PROMPT, fps=16.0)

    def check_dir(self, path: Path, transformer: bool = True, vae: bool = True, text_encoders: bool = True) -> Path:
        ModelFamily.check_dir(self, path, transformer, vae, text_encoders)
        if not transformer:
            return path
        index_file = path / "model_index.json"
        ratio = read_model_index(path).get("boundary_ratio")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
            raise UserError(f"{index_file}: boundary_ratio must be a number in (0, 1) for a two-expert Wan2.2 A14B "
                            f"checkpoint, got {ratio!r}")
        sub = path / "transformer_2"
        if not sub.is_dir() or not (sub / "config.json").is_file():
            raise UserError(f"{sub / 'config.json'}: missing (a two-expert Wan2.2 A14B checkpoint has transformer/ "
                            f"and transformer_2/; {self.layout_hint})")
        if not any(f.name.endswith((".safetensors", ".bin")) for f in sub.iterdir()):
            raise UserError(f"{sub}: no weight files (*.safetensors or *.bin) found ({self.layout_hint})")
        return path

    @property
    def layout_hint(self) -> str:
        return super().layout_hint + ", transformer_2/ and boundary_ratio"

    def boundary_timestep(self, path: Path) -> float:
        """WanPipeline's switch: boundary_ratio x the scheduler's num_train_timesteps."""
        return float(read_model_index(path)["boundary_ratio"]) * self.schedule(path).num_train_timesteps

    def load_transformer(self, path: Path, dtype: torch.dtype) -> torch.nn.Module:
        experts = [load_component(f"{path / folder}", self.transformer_class().from_pretrained, path,
                                  subfolder=folder, torch_dtype=dtype) for folder in EXPERTS]
        configs = [{k: v for k, v in dict(e.config).items() if not k.startswith("_")} for e in experts]
        if configs[0] != configs[1]:
            differ = sorted(k for k in configs[0].keys() | configs[1].keys() if configs[0].get(k) != configs[1].get(k))
            raise UserError(f"{path / 'transformer_2' / 'config.json'}: differs from transformer/'s in "
                            f"{', '.join(differ)} (the two experts of Wan2.2 A14B share one architecture)")
        return WanExperts(*experts, boundary_timestep=self.boundary_timestep(path))

    def guidance_scale(self, model: torch.nn.Module, timestep: float, guidance: float,
                       guidance_2: float | None) -> float:
        if guidance_2 is None or timestep >= unwrap(model).boundary_timestep:
            return guidance
        return guidance_2

    def lora_pipeline(self) -> type:
        return _expert_lora_pipeline()
