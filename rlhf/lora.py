"""LoRA adapters on the transformer (peft), saved in two formats and loaded from either.

An adapter directory holds:
- `adapter_config.json` + `adapter_model.safetensors`: peft's format, exactly as `PeftModel.save_pretrained`
  writes it (keys under `base_model.model.`), so `PeftModel.from_pretrained(transformer, dir)` loads it; our
  trainer resumes from it too;
- `pytorch_lora_weights.safetensors`: diffusers' LoRA format (keys under `transformer.`) with the adapter
  metadata embedded, written by the model family's diffusers pipeline (`save_lora_weights`; ContentV:
  StableDiffusion3Pipeline's, Wan2.1: WanPipeline's), so that pipeline's `load_lora_weights(dir)` loads it, and
  `transformer.load_lora_adapter(dir, weight_name=DIFFUSERS_WEIGHTS, prefix="transformer")` too (without the
  metadata diffusers would lose `lora_alpha` whenever it differs from the rank; without `weight_name` diffusers'
  model-level loader looks for a `.bin` file).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError

from rlhf.errors import UserError, one_line
from rlhf.options import DEFAULT_LORA_TARGETS  # noqa: F401  ContentV's targets, imported from here by older callers

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
# `PeftModel` wraps the transformer as `base_model.model`; its files name every weight from there.
PEFT_MODEL_PREFIX = "base_model.model."


def _check_targets(model: torch.nn.Module, targets: Sequence[str], source: str) -> None:
    # Any module type counts: a layer already wrapped by another adapter is no longer an nn.Linear.
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        # The first block's layers, whatever the family calls its block list (transformer_blocks, blocks).
        first = next((n.split(".", 2)[0] for n in linear if n.split(".", 2)[1:2] == ["0"]), "")
        examples = sorted({n.split(".", 2)[-1] for n in linear if n.startswith(f"{first}.0.")})
        raise UserError(
            f"{source}: LoRA target module(s) {', '.join(missing)} not found in the transformer; "
            f"linear layers of a block are: {', '.join(examples)}"
        )


def add_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Sequence[str] | None = None,
    adapter_name: str = "default",
) -> None:
    """Attach a fresh LoRA adapter (B = 0, so the model's outputs are unchanged) and make it trainable.

    `targets` (module-name suffixes) default to the model family's (`ModelFamily.lora_targets`)."""
    from peft import LoraConfig

    from rlhf.models.family import transformer_family

    if targets is None:
        targets = transformer_family(transformer).lora_targets

    _check_targets(transformer, targets, "lora_targets")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        init_lora_weights=True)
    transformer.add_adapter(config, adapter_name=adapter_name)


def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def peft_keys(module_state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights of `adapter_name` from a module state dict, under peft's keys (adapter name removed)."""
    marker = f".{adapter_name}."
    return {k.replace(marker, "."): v for k, v in module_state.items() if "lora_" in k and marker in k}


def module_keys(peft_state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The inverse of `peft_keys`: peft's keys (with or without the file's `base_model.model.` prefix) ->
    the module's parameter names for `adapter_name`."""
    renamed = {}
    for key, value in peft_state.items():
        head, sep, leaf = key.removeprefix(PEFT_MODEL_PREFIX).rpartition(".")
        renamed[f"{head}.{adapter_name}{sep}{leaf}"] = value
    return renamed


def save_adapter(transformer: torch.nn.Module, out_dir: str | Path, adapter_name: str = "default",
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter in peft and diffusers formats into `out_dir`, atomically (tmp dir + rename).

    `state` (peft keys) replaces the weights read from `transformer`: sharded trainers pass the gathered
    full weights, because their modules hold only a shard (the adapter's config is read from the module).
    """
    from safetensors.torch import save_file

    from rlhf.models.family import transformer_family

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if state is None:
        state = lora_state_dict(transformer, adapter_name)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = transformer.peft_config[adapter_name]
    config.save_pretrained(tmp)
    # The keys and header metadata `PeftModel.save_pretrained` writes: without the prefix
    # `PeftModel.from_pretrained` matches no weight and silently returns the base model.
    save_file({PEFT_MODEL_PREFIX + k: v for k, v in state.items()}, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
    transformer_family(transformer).lora_pipeline().save_lora_weights(
        tmp,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config.to_dict(),
        safe_serialization=True,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_peft_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA weights of a peft-format adapter under peft's keys for a bare module (prefix removed).

    Adapters written before the prefix was added (and by tools that omit it) read the same.
    """
    from safetensors.torch import load_file

    return {k.removeprefix(PEFT_MODEL_PREFIX): v for k, v in load_file(Path(adapter_dir) / PEFT_WEIGHTS).items()}


@contextlib.contextmanager
def several_adapters_allowed() -> Iterator[None]:
    """Silence peft's "Already found a `peft_config` attribute" warning: several named adapters on one
    transformer are what `eval` and `compare` ask for, not a mistake to warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        yield


def load_adapter(
    transformer: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = "default", scale: float = 1.0
) -> None:
    """Attach the adapter saved in `adapter_dir` (peft format preferred, else diffusers format)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: adapter directory not found")
    peft_config, peft_weights = adapter_dir / PEFT_CONFIG, adapter_dir / PEFT_WEIGHTS
    try:
        if peft_config.is_file() and peft_weights.is_file():
            config = LoraConfig(**{k: v for k, v in json.loads(peft_config.read_text()).items()
                                   if k in LoraConfig.__dataclass_fields__})
            _check_targets(transformer, sorted(config.target_modules), str(peft_config))
            with several_adapters_allowed():
                transformer.add_adapter(config, adapter_name=adapter_name)
            result = set_peft_model_state_dict(transformer, read_peft_weights(adapter_dir), adapter_name=adapter_name)
            if result.unexpected_keys:
                raise UserError(f"{peft_weights}: {len(result.unexpected_keys)} weights do not match the "
                                f"transformer (e.g. {result.unexpected_keys[0]})")
        elif (adapter_dir / DIFFUSERS_WEIGHTS).is_file():
            with several_adapters_allowed():
                transformer.load_lora_adapter(
                    str(adapter_dir), weight_name=DIFFUSERS_WEIGHTS, prefix="transformer", adapter_name=adapter_name
                )
        else:
            raise UserError(f"{adapter_dir}: no LoRA adapter found (expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
                            f"or {DIFFUSERS_WEIGHTS})")
    except (ValueError, RuntimeError, OSError, KeyError, SafetensorError) as err:
        raise UserError(f"{adapter_dir}: adapter could not be loaded ({one_line(err)})") from None
    if scale != 1.0:
        transformer.set_adapters([adapter_name], weights=[scale])


def use_adapter(transformer: torch.nn.Module, adapter_name: str | None) -> None:
    """Run `transformer` with only the named loaded adapter, or as the base model (adapters disabled) for None."""
    if adapter_name is None:
        transformer.disable_adapters()
    else:
        transformer.enable_adapters()
        transformer.set_adapters([adapter_name])
