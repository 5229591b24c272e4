"""Model families: everything that differs between text-to-video checkpoints, behind one interface.

A *family* (ContentV-8B, Wan2.1, ...) owns what the rest of the toolkit must not know: which diffusers /
transformers classes load each component of a local folder, how prompts are encoded (and so what the rollout
store caches per prompt), how the transformer is called, the latent shape and frame rule, how latents are
decoded, the sampling defaults (negative prompt, size, steps, guidance), the sigma spacing of the sampler, the
LoRA target modules and the diffusers pipeline whose `save_lora_weights` / `load_lora_weights` format adapters
are exported in. Trainers, the sampler, the rollout store and the rewards call this interface and never name a
family. docs/models.md lists what each family sets.

The family of a folder is read from `model_index.json`'s `_class_name` (the diffusers pipeline class), or
named explicitly (`--family`). The family of a loaded transformer is read from its class (and, where families
share one, its config), so code that only holds the transformer (a trainer's forward) calls it the family's way
without being told the family.

Registry (style.md practice 7): a plain mapping of name -> "module:Class", imported lazily.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rlhf.errors import UserError, one_line

if TYPE_CHECKING:  # torch is imported where used: rlhf.options reads FAMILIES and must stay light (`--help`)
    import torch

    from rlhf.sampling import FlowSchedule, PromptEmbeds

FAMILIES: dict[str, str] = {
    "contentv": "rlhf.models.contentv:ContentVFamily",
    "wan2.1": "rlhf.models.wan:Wan21Family",
    "wan2.2-ti2v": "rlhf.models.wan:Wan22TI2VFamily",
    "wan2.2-a14b": "rlhf.models.wan:Wan22A14BFamily",
    "hunyuanvideo": "rlhf.models.hunyuan:HunyuanVideoFamily",
}
# model_index.json `_class_name` -> family. Wan2.2 checkpoints also name WanPipeline: TI2V-5B sets
# `expand_timesteps` (-> wan2.2-ti2v); the two-expert A14B models set `transformer_2` / `boundary_ratio`
# (-> wan2.2-a14b).
PIPELINE_FAMILIES: dict[str, str] = {"ContentVPipeline": "contentv", "WanPipeline": "wan2.1",
                                     "HunyuanVideoPipeline": "hunyuanvideo"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class PromptEncoding(abc.ABC):
    """A family's tokenizers and text encoders: prompts -> `PromptEmbeds`, computed once per prompt."""

    text_encoders: list[torch.nn.Module]

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeddings for `prompts` on the encoders' device, in the encoders' dtype."""

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def to(self, device: torch.device | str) -> PromptEncoding:
        for encoder in self.text_encoders:
            encoder.to(device)
        return self

    def release(self) -> None:
        """Drop the encoders (and free their accelerator memory); `encode` is unusable afterwards."""
        from rlhf import devices

        device = self.device
        self.text_encoders = []
        devices.empty_cache(device)


class ModelFamily(abc.ABC):
    """What one family of checkpoints sets. Subclasses are stateless: one instance per family."""

    name: ClassVar[str]  # the `--family` value, e.g. "wan2.1"
    pipeline_class: ClassVar[str]  # model_index.json `_class_name`
    transformer_class_name: ClassVar[str]  # how a loaded transformer is recognised (its class or a base class)
    text_encoder_folders: ClassVar[tuple[str, ...]]
    tokenizer_folders: ClassVar[tuple[str, ...]]
    lora_targets: ClassVar[tuple[str, ...]]  # module-name suffixes adapted by default
    # Sampling defaults of the family's reference pipeline (SamplingOptions fields + fps); a model folder's
    # sampling_defaults.json and the config override them.
    sampling_defaults: ClassVar[Mapping[str, Any]]
    # How the sampler spaces sigmas before the scheduler's shift (rlhf.sampling.FlowSchedule.spacing).
    sigma_spacing: ClassVar[str]
    # A guidance-distilled transformer (HunyuanVideo) takes the guidance scale as an input: `velocity` is called
    # with `guidance=`, the sampler runs no classifier-free guidance, and trainers embed the guidance their
    # samples were drawn at (docs/models.md).
    guidance_distilled: ClassVar[bool] = False
    # How a loaded VAE is recognised (`vae_family`); the Wan VAE is ContentV's, Wan2.1's and Wan2.2's.
    vae_class_name: ClassVar[str] = "AutoencoderKLWan"
    # The folders holding transformer weights (several for a model of several experts): merge fuses into each.
    transformer_folders: ClassVar[tuple[str, ...]] = ("transformer",)

    # ---- the folder ----------------------------------------------------------------------------
    @property
    def layout_hint(self) -> str:
        folders = ("transformer", "vae", "scheduler", *self.text_encoder_folders, *self.tokenizer_folders)
        return f"expected a diffusers-layout {self.pipeline_class} folder with model_index.json, " + \
            ", ".join(f"{f}/" for f in folders)

    def check_dir(self, path: Path, transformer: bool = True, vae: bool = True, text_encoders: bool = True) -> Path:
        """Check that `path` holds the parts to be loaded; raise a `UserError` naming the first missing one."""
        required: list[tuple[str, str]] = [("scheduler", "scheduler_config.json")]
        if transformer:
            required.append(("transformer", "config.json"))
        if vae:
            required.append(("vae", "config.json"))
        if text_encoders:
            required += [(name, "config.json") for name in self.text_encoder_folders]
            required += [(name, "") for name in self.tokenizer_folders]
        weighted = ("transformer", "vae", *self.text_encoder_folders)
        for folder, config_name in required:
            sub = path / folder
            if not sub.is_dir() or not any(sub.iterdir()):
                raise UserError(f"{sub}: missing or empty ({self.layout_hint})")
            if config_name and not (sub / config_name).is_file():
                raise UserError(f"{sub / config_name}: missing ({self.layout_hint})")
            if folder in weighted and not any(f.name.endswith(WEIGHT_SUFFIXES) for f in sub.iterdir()):
                raise UserError(f"{sub}: no weight files (*.safetensors or *.bin) found ({self.layout_hint})")
        return path

    @abc.abstractmethod
    def transformer_class(self) -> type[torch.nn.Module]:
        """The transformer's class (imported on demand)."""

    def claims_transformer(self, transformer_config: Mapping[str, Any]) -> bool:
        """Whether a transformer of this family's class with this config is this family's (families that share a
        transformer class tell theirs apart by its config; default: every one)."""
        return True

    def read_transformer_config(self, path: Path) -> dict[str, Any]:
        """The transformer's init arguments (class defaults + its config.json) without loading weights."""
        import inspect

        config_file = path / "transformer" / "config.json"
        try:
            stored = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{config_file}: not readable JSON ({one_line(err)})") from None
        parameters = inspect.signature(self.transformer_class().__init__).parameters
        defaults = {name: p.default for name, p in parameters.items() if name not in ("self", "args", "kwargs")}
        return {**defaults, **{k: v for k, v in stored.items() if k in defaults}}

    def schedule(self, path: Path) -> FlowSchedule:
        """The checkpoint's sigma schedule (its scheduler config and the family's sigma spacing)."""
        from rlhf.sampling import FlowSchedule

        return FlowSchedule.from_file(path / "scheduler" / "scheduler_config.json", spacing=self.sigma_spacing)

    @abc.abstractmethod
    def load_transformer(self, path: Path, dtype: torch.dtype) -> torch.nn.Module: ...

    @abc.abstractmethod
    def load_vae(self, path: Path, dtype: torch.dtype) -> torch.nn.Module: ...

    @abc.abstractmethod
    def load_prompt_encoder(self, path: Path, dtype: torch.dtype, device: torch.device,
                            max_sequence_length: int | None) -> PromptEncoding: ...

    # ---- the transformer -------------------------------------------------------------------------
    def use_device_attention(self, transformer: torch.nn.Module, device: torch.device) -> None:
        """Swap in a faster attention kernel for `device` where the family has one (default: keep SDPA)."""
        return None

    @abc.abstractmethod
    def velocity(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                 text: PromptEmbeds) -> torch.Tensor:
        """The transformer's prediction for `latents` (B, C, T, H, W) at `timestep` (B,) (= sigma * T_train). A
        `guidance_distilled` family's also takes `guidance: float | None` (the scale it embeds; None: its default)."""

    def guidance_scale(self, model: torch.nn.Module, timestep: float, guidance: float,
                       guidance_2: float | None) -> float:
        """The guidance scale of the step at `timestep` (families of one model: `guidance`; Wan2.2 A14B's low-noise
        expert takes `guidance_2`). Whether guidance runs at all is decided by `guidance` alone, as WanPipeline does."""
        return guidance

    @abc.abstractmethod
    def text_sizes(self, transformer_config: Mapping[str, Any]) -> dict[str, int]:
        """Feature sizes the transformer expects of `PromptEmbeds`: {"text feature size", "pooled text size"}
        (0 when the family has no pooled embedding)."""

    @abc.abstractmethod
    def latent_shape(self, frames: int, height: int, width: int,
                     transformer_config: Mapping[str, Any]) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one sample's latents; raises ValueError for sizes the family cannot sample."""

    # ---- the VAE ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) -> video (B, 3, T, H, W) in [-1, 1], in the VAE's dtype."""

    def decode_frames(self, vae: torch.nn.Module, latents: torch.Tensor, frames: Sequence[int],
                      checkpoint: bool = False) -> torch.Tensor:
        """Differentiably decode video frames `frames` of normalised latents (B, C, t, h, w) -> (B, n, 3, H, W) in
        [0, 1], decoding only the latent prefix they need (the online trainers' decode). Default: the Wan VAE's
        causal decoder one latent frame at a time, each recomputed in the backward pass with `checkpoint`."""
        from rlhf.video import decode_wan_frames

        return decode_wan_frames(vae, latents, frames, checkpoint)

    # ---- LoRA ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def lora_pipeline(self) -> type:
        """The diffusers pipeline whose `save_lora_weights` writes (and `load_lora_weights` reads) adapters."""


_instances: dict[str, ModelFamily] = {}


def family_named(name: str, source: str = "--family") -> ModelFamily:
    """The family registered as `name`; a UserError naming `source` and the known names otherwise."""
    import importlib

    if name not in FAMILIES:
        raise UserError(f"{source}: unknown model family {name!r} (expected one of {', '.join(FAMILIES)})")
    if name not in _instances:
        module, _, cls = FAMILIES[name].partition(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def read_model_index(path: str | Path) -> dict[str, Any]:
    """`model_index.json` of a model folder; a UserError for a missing folder or file, or bad JSON."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found (expected a diffusers-layout model folder with "
                        f"model_index.json; make a tiny one with `contentv-rlhf tiny-model DIR`)")
    index = path / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except FileNotFoundError:
        raise UserError(f"{index}: missing (expected a diffusers-layout model folder: one of "
                        f"{', '.join(PIPELINE_FAMILIES)})") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{index}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{index}: expected a JSON object")
    return data


def family_for(path: str | Path, family: str | None = None) -> ModelFamily:
    """The family of the model folder `path`: `family` when given, else the one its pipeline class names."""
    index = read_model_index(path)
    if family is not None:
        return family_named(family)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINE_FAMILIES:
        raise UserError(f"{Path(path) / 'model_index.json'}: _class_name {pipeline!r} is not a supported pipeline "
                        f"(expected one of {', '.join(PIPELINE_FAMILIES)}; or name the family with --family)")
    if pipeline == "WanPipeline":
        if has_second_expert(index) or index.get("boundary_ratio") is not None:
            return family_named("wan2.2-a14b")  # its check_dir names a missing transformer_2 or boundary_ratio
        if index.get("expand_timesteps"):
            return family_named("wan2.2-ti2v")
    return family_named(PIPELINE_FAMILIES[pipeline])


def has_second_expert(index: Mapping[str, Any]) -> bool:
    """Whether a WanPipeline model_index.json lists a `transformer_2` (diffusers writes [null, null] for none)."""
    return index.get("transformer_2") not in (None, [None, None])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside DDP's and DeepSpeed's `.module`, torch.compile's `_orig_mod` and peft's `PeftModel`."""
    import torch

    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, DeepSpeed
        inner = inner.module
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile of the whole model
    if callable(getattr(inner, "get_base_model", None)):  # a peft PeftModel
        inner = inner.get_base_model()
    return inner


def transformer_family(model: torch.nn.Module) -> ModelFamily:
    """The family of a loaded transformer, from its class (through the wrappers `unwrap` looks through) and, where
    families share a class, its config (`ModelFamily.claims_transformer`)."""
    inner = unwrap(model)
    names = {cls.__name__ for cls in type(inner).__mro__}  # FSDP2 subclasses the model's class
    for name in FAMILIES:
        family = family_named(name)
        if family.transformer_class_name in names and family.claims_transformer(getattr(inner, "config", {})):
            return family
    raise TypeError(f"{type(inner).__name__} is not the transformer of a known model family ({', '.join(FAMILIES)})")


def vae_family(vae: torch.nn.Module) -> ModelFamily:
    """A family whose VAE `vae` is (by class; families sharing a VAE decode it alike)."""
    names = {cls.__name__ for cls in type(vae).__mro__}
    for name in FAMILIES:
        if family_named(name).vae_class_name in names:
            return family_named(name)
    raise TypeError(f"{type(vae).__name__} is not the VAE of a known model family ({', '.join(FAMILIES)})")


def velocity(model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: PromptEmbeds,
             guidance: float | None = None) -> torch.Tensor:
    """`model`'s prediction, called the way its family calls it (`ModelFamily.velocity`); `guidance` is the scale a
    guidance-distilled family embeds (None: its default) and is ignored by the others (their guidance is CFG)."""
    family = transformer_family(model)
    if family.guidance_distilled:
        return family.velocity(model, latents, timestep, text, guidance=guidance)
    return family.velocity(model, latents, timestep, text)
