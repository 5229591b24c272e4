"""Load a local ContentV checkpoint (diffusers layout) component by component.

The published `model_index.json` lists the scheduler, text encoders and tokenizers but NOT `transformer/`
and `vae/`, so `DiffusionPipeline.from_pretrained` alone cannot load it; this loader reads each subfolder
explicitly, like ContentV's demo (transformer in bf16, VAE in fp32 by default). Nothing is fetched from a
hub: every load is `local_files_only`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from rlhf import devices
from rlhf.errors import UserError, one_line
from rlhf.sampling import FlowSchedule
from rlhf.text_encoding import PromptEncoder

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
LAYOUT_HINT = (
    "expected a diffusers-layout ContentV folder with model_index.json, transformer/, vae/, scheduler/, "
    "text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/"
)


@dataclass
class ContentVComponents:
    """What `load_contentv` loaded; parts not asked for are None."""

    path: Path
    schedule: FlowSchedule
    transformer: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    prompt_encoder: PromptEncoder | None = None


def _has_weights(folder: Path) -> bool:
    return any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir())


def check_model_dir(
    path: str | Path, transformer: bool = True, vae: bool = True, text_encoders: bool = True
) -> Path:
    """Check that `path` holds the parts to be loaded; raise a `UserError` naming the first missing one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found ({LAYOUT_HINT})")
    index = path / "model_index.json"
    try:
        json.loads(index.read_text())
    except FileNotFoundError:
        raise UserError(f"{index}: missing ({LAYOUT_HINT})") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{index}: not readable JSON ({err})") from None

    required: list[tuple[str, str]] = [("scheduler", "scheduler_config.json")]
    if transformer:
        required.append(("transformer", "config.json"))
    if vae:
        required.append(("vae", "config.json"))
    if text_encoders:
        required += [(name, "config.json") for name in TEXT_ENCODERS]
        required += [(name, "") for name in TOKENIZERS]
    for folder, config_name in required:
        sub = path / folder
        if not sub.is_dir() or not any(sub.iterdir()):
            raise UserError(f"{sub}: missing or empty ({LAYOUT_HINT})")
        if config_name and not (sub / config_name).is_file():
            raise UserError(f"{sub / config_name}: missing ({LAYOUT_HINT})")
        if folder in ("transformer", "vae", *TEXT_ENCODERS) and not _has_weights(sub):
            raise UserError(f"{sub}: no weight files (*.safetensors or *.bin) found ({LAYOUT_HINT})")
    return path


def read_transformer_config(path: str | Path) -> dict:
    """The transformer's init arguments (class defaults + its config.json) without loading weights."""
    import inspect

    from rlhf.models.transformer import SD3Transformer3DModel

    path = check_model_dir(path, vae=False, text_encoders=False)
    config_file = path / "transformer" / "config.json"
    try:
        stored = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{config_file}: not readable JSON ({err})") from None
    defaults = {
        name: p.default for name, p in inspect.signature(SD3Transformer3DModel.__init__).parameters.items()
        if name != "self"
    }
    return {**defaults, **{k: v for k, v in stored.items() if k in defaults}}


def _load(what: str, loader, *args, **kwargs):
    """Turn a loading failure of a present folder (corrupt or mismatched files) into a UserError."""
    try:
        return loader(*args, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise UserError(f"{what}: could not be loaded ({one_line(err)})") from None


def load_contentv(
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
) -> ContentVComponents:
    """Load the parts of a ContentV checkpoint at `path` onto `device`.

    Args:
        dtype: transformer dtype (`bf16` default, as the reference demo).
        vae_dtype: VAE dtype (`fp32` default: the Wan VAE decodes poorly in bf16).
        text_encoder_dtype: text encoders' dtype; defaults to `dtype`.
        load_*: skip parts a stage does not need (training never loads text encoders or the VAE).
        max_sequence_length: T5 tokens per prompt (default: ContentV's 256, or the T5 tokenizer's
            `model_max_length` when shorter).
        quantize: storage of the transformer's block weights (`rlhf.lowmem.quantize_transformer`): `none`,
            `int8_weight_only`, `float8_weight_only` or `nf4`; each layer is quantised on `device`.
    """
    from diffusers import AutoencoderKLWan
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from rlhf.lowmem import quantize_transformer
    from rlhf.models.attention import use_npu_attention
    from rlhf.models.transformer import SD3Transformer3DModel

    dtype = devices.parse_dtype(dtype, "dtype")
    vae_dtype = devices.parse_dtype(vae_dtype, "vae_dtype")
    text_dtype = devices.parse_dtype(text_encoder_dtype, "text_encoder_dtype") if text_encoder_dtype else dtype
    device = torch.device(device)
    path = check_model_dir(path, load_transformer, load_vae, load_text_encoders)

    components = ContentVComponents(
        path=path, schedule=FlowSchedule.from_file(path / "scheduler" / "scheduler_config.json")
    )
    if load_transformer:
        transformer = _load(
            f"{path / 'transformer'}", SD3Transformer3DModel.from_pretrained, path, subfolder="transformer",
            torch_dtype=dtype,
        )
        if device.type == "npu":
            use_npu_attention(transformer)
        quantize_transformer(transformer, quantize, device=device)
        components.transformer = transformer.to(device).eval().requires_grad_(False)
    if load_vae:
        vae = _load(f"{path / 'vae'}", AutoencoderKLWan.from_pretrained, path, subfolder="vae", torch_dtype=vae_dtype)
        components.vae = vae.to(device).eval().requires_grad_(False)
    if load_text_encoders:
        tokenizers = [
            _load(f"{path / name}", cls.from_pretrained, path, subfolder=name)
            for name, cls in zip(TOKENIZERS, (CLIPTokenizer, CLIPTokenizer, T5TokenizerFast), strict=True)
        ]
        encoder_classes = (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)
        encoders = [
            _load(f"{path / name}", cls.from_pretrained, path, subfolder=name, dtype=text_dtype)
            .to(device).eval().requires_grad_(False)
            for name, cls in zip(TEXT_ENCODERS, encoder_classes, strict=True)
        ]
        components.prompt_encoder = PromptEncoder(tokenizers, encoders, max_sequence_length)
    return components
