"""Load a local diffusers-layout checkpoint of any model family, component by component.

`load_model` reads the family from the folder (`model_index.json`'s pipeline class, rlhf/models/family.py) or
takes it by name, and lets the family load each part: some checkpoints (ContentV) do not list every part in
`model_index.json`, so `DiffusionPipeline.from_pretrained` alone cannot load them. Nothing is fetched from a
hub: every load is `local_files_only`. `load_contentv` is the former name of `load_model`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf import devices
from rlhf.errors import UserError
from rlhf.models.family import ModelFamily, PromptEncoding, family_for
from rlhf.sampling import FlowSchedule

logger = logging.getLogger(__name__)


@dataclass
class ModelComponents:
    """What `load_model` loaded; parts not asked for are None."""

    path: Path
    family: ModelFamily
    schedule: FlowSchedule
    transformer: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    prompt_encoder: PromptEncoding | None = None


ContentVComponents = ModelComponents  # the former name


def check_model_dir(
    path: str | Path, transformer: bool = True, vae: bool = True, text_encoders: bool = True,
    family: str | None = None,
) -> Path:
    """Check that `path` holds the parts to be loaded; raise a `UserError` naming the first missing one."""
    path = Path(path)
    return family_for(path, family).check_dir(path, transformer, vae, text_encoders)


def read_transformer_config(path: str | Path, family: str | None = None) -> dict[str, Any]:
    """The transformer's init arguments (class defaults + its config.json) without loading weights."""
    path = check_model_dir(path, vae=False, text_encoders=False, family=family)
    return family_for(path, family).read_transformer_config(path)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "bf16",
    device: str | torch.device = "cpu",
    *,
    vae_dtype: str | torch.dtype = "fp32",
    text_encoder_dtype: str | torch.dtype | None = None,
    load_transformer: bool = True,
    load_vae: bool = True,
    load_text_encoders: bool = True,
    max_sequence_length: int | None = None,
    quantize: str = "none",
    family: str | None = None,
) -> ModelComponents:
    """Load the parts of the checkpoint at `path` onto `device`.

    Args:
        dtype: transformer dtype (`bf16` default, as the reference demos).
        vae_dtype: VAE dtype (`fp32` default: the Wan VAE decodes poorly in bf16).
        text_encoder_dtype: text encoders' dtype; defaults to `dtype`.
        load_*: skip parts a stage does not need (training never loads text encoders or the VAE).
        max_sequence_length: text tokens per prompt (default: the family's, capped by its tokenizer's
            `model_max_length`).
        quantize: storage of the transformer's block weights (`rlhf.lowmem.quantize_transformer`): `none`,
            `int8_weight_only`, `float8_weight_only` or `nf4`; each layer is quantised on `device`.
        family: the model family's name (`rlhf.models.family.FAMILIES`); default: the folder's.
    """
    from rlhf.lowmem import quantize_transformer

    dtype = devices.parse_dtype(dtype, "dtype")
    vae_dtype = devices.parse_dtype(vae_dtype, "vae_dtype")
    text_dtype = devices.parse_dtype(text_encoder_dtype, "text_encoder_dtype") if text_encoder_dtype else dtype
    device = torch.device(device)
    path = Path(path)
    model_family = family_for(path, family)
    model_family.check_dir(path, load_transformer, load_vae, load_text_encoders)

    components = ModelComponents(path=path, family=model_family, schedule=model_family.schedule(path))
    if load_transformer:
        transformer = model_family.load_transformer(path, dtype)
        if not model_family.claims_transformer(transformer.config):  # e.g. --family naming a sibling family
            raise UserError(f"{path / 'transformer'}: not a {model_family.name} transformer (its config does not fit "
                            f"the family: {model_family.layout_hint}); check --family")
        model_family.use_device_attention(transformer, device)
        quantize_transformer(transformer, quantize, device=device)
        components.transformer = transformer.to(device).eval().requires_grad_(False)
    if load_vae:
        components.vae = model_family.load_vae(path, vae_dtype).to(device).eval().requires_grad_(False)
    if load_text_encoders:
        components.prompt_encoder = model_family.load_prompt_encoder(path, text_dtype, device, max_sequence_length)
    return components


load_contentv = load_model  # the former name, kept for callers not yet renamed
