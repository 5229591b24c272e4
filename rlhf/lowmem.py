"""Running the frozen transformer in less device memory: weight quantisation and block offloading.

- `quantize_transformer` stores the weights of the linear layers of the transformer blocks (99% of ContentV-8B's
  parameters; both experts' blocks of Wan2.2 A14B, `expert_transformers`) in 8 or 4 bits with torchao:
  `int8_weight_only` (per-row int8, `Int8WeightOnlyConfig`), `float8_weight_only` (per-row float8 e4m3,
  `Float8WeightOnlyConfig`) and `nf4` (QLoRA's 4-bit NormalFloat, blocks of 64, `to_nf4`). Activations stay in
  the compute dtype: every matmul sees the dequantised weight, so the same code runs on CUDA, on the CPU (the
  tests) and, through plain torch ops, on other accelerators. The embedders, `norm_out` and `proj_out` (0.5% of
  the parameters) keep the checkpoint's precision.
  peft wraps a torchao layer as `TorchaoLoraLinear` and an nf4 one as its plain `lora.Linear` (the nf4 tensor
  implements `F.linear` with a backward to the input), so a LoRA trains on top and the Flow-DPO reference
  (adapters disabled) runs on the same quantised weights. Merging into quantised weights is never done:
  `merge` fuses adapters into the full-precision release files.
- `enable_block_offload` keeps the transformer on the CPU and moves one block at a time to the device right
  before it runs (diffusers' group offloading, block level); on CUDA the next block is copied on a side stream
  while the current one computes. It is for sampling (generate, rollout, eval): a training backward needs the
  block's weights on the device again after its forward has offloaded them (and offloading would move the
  trained LoRA weights too), so the trainers do not offer it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch

from rlhf.errors import UserError

logger = logging.getLogger("contentv-rlhf")
# The lists of repeated blocks in the families' transformers, whose linear layers are quantised: ContentV's and
# HunyuanVideo's dual-stream `transformer_blocks`, HunyuanVideo's `single_transformer_blocks`, Wan's `blocks`.
# Anything outside them (embedders, output head) keeps the checkpoint's precision.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao's to_nf4 defaults (QLoRA's block sizes)
# peft warns once per wrapped layer that merge()/unmerge() need the requantisation recipe; we never merge into
# quantised weights (merge fuses into the full-precision files), so the warning says nothing to our users.
PEFT_TORCHAO_MERGE_WARNING = r".*instantiated without `get_apply_tensor_subclass`.*"


@dataclass
class QuantizationReport:
    """What `quantize_transformer` did: layers quantised, layers kept in full precision, bytes before/after."""

    mode: str
    quantized_layers: int
    kept_layers: int
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        return (f"quantize {self.mode}: {self.quantized_layers} linear layers of the blocks quantised "
                f"({self.kept_layers} kept), transformer weights {self.bytes_before / 2**30:.3f} GiB -> "
                f"{self.bytes_after / 2**30:.3f} GiB")


def require_torchao() -> None:
    """A UserError naming the field when torchao (the optional extra `quant`) is missing."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UserError("quantize: needs torchao (pip install 'contentv-rlhf[quant]')") from None


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting a quantised tensor subclass by its inner tensors (data + scales)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(p) for p in module.parameters())


def is_quantized(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(type(tensor), "__tensor_flatten__")


def nf4_fits(weight: torch.Tensor) -> bool:
    """to_nf4 needs whole blocks of 64 values and whole groups of 256 block scales."""
    return weight.numel() % NF4_BLOCK == 0 and (weight.numel() // NF4_BLOCK) % NF4_SCALER_BLOCK == 0


def block_list_name(module_name: str) -> str | None:
    """The block list (`BLOCK_LISTS`) a module of the transformer belongs to, e.g. "blocks" for "blocks.3.ffn"."""
    head = module_name.split(".", 1)[0]
    return head if head in BLOCK_LISTS and "." in module_name else None


def expert_transformers(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, module) of each diffusers transformer inside `transformer`: the experts of a module that holds
    several (Wan2.2 A14B's `WanExperts`, whose class lists them in `expert_names`: "transformer." and
    "transformer_2."), else ("", transformer) itself. Quantisation, block offloading and `auto` checkpointing act
    on the block lists of each."""
    names = getattr(type(transformer), "expert_names", None)
    if not names:
        return [("", transformer)]
    return [(f"{name}.", getattr(transformer, name)) for name in names]


def block_linears(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers inside the transformer's blocks (every expert's, for a module of several experts): what
    `quantize_transformer` quantises, named as in `transformer.named_modules()`."""
    return [(prefix + name, m) for prefix, part in expert_transformers(transformer) for name, m in part.named_modules()
            if block_list_name(name) is not None and type(m) is torch.nn.Linear]


def quantize_transformer(transformer: torch.nn.Module, mode: str,
                         device: torch.device | None = None) -> QuantizationReport | None:
    """Quantise the blocks' linear weights of `transformer` in place (None for mode `none`).

    Call it before any LoRA adapter is attached (peft picks its layer class from the base weight's type).
    `device`: each layer is moved there before it is quantised, so a full-precision copy of the whole model
    never sits on the device (the rest of the model stays where it is).
    """
    if mode == "none":
        return None
    require_torchao()
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_, to_nf4

    warnings.filterwarnings("ignore", message=PEFT_TORCHAO_MERGE_WARNING)
    before = parameter_bytes(transformer)
    layers = block_linears(transformer)
    chosen = {id(m) for _, m in layers if mode != "nf4" or nf4_fits(m.weight)}
    if mode == "nf4":
        for _, module in layers:
            if id(module) in chosen:
                if device is not None:
                    module.to(device)
                module.weight = torch.nn.Parameter(to_nf4(module.weight.data, NF4_BLOCK, NF4_SCALER_BLOCK),
                                                   requires_grad=False)
    else:
        # set_inductor_config=False: quantising must not change torch.compile's global settings.
        config = {"int8_weight_only": Int8WeightOnlyConfig(set_inductor_config=False),
                  "float8_weight_only": Float8WeightOnlyConfig(set_inductor_config=False)}.get(mode)
        if config is None:
            raise UserError(f"quantize: unknown mode {mode!r}")
        quantize_(transformer, config, filter_fn=lambda module, _: id(module) in chosen, device=device)
    report = QuantizationReport(mode, len(chosen), len(layers) - len(chosen), before, parameter_bytes(transformer))
    logger.info(report.describe())
    return report


def video_psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR in dB of `other` against `reference`, both videos in [-1, 1] (peak-to-peak 2); inf when equal."""
    mse = torch.mean((reference.double() - other.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(2.0**2 / mse)


def enable_block_offload(transformer: torch.nn.Module, device: torch.device) -> bool:
    """Offload `transformer` (on the CPU, with every adapter already attached) block by block to `device`.

    Returns whether a side stream prefetches the next block (CUDA only). Attach adapters before calling it:
    the streamed copies are made here, and a layer added later would have none. A module of several experts
    (`expert_transformers`) has each expert offloaded on its own: its blocks one at a time, the rest of it (embedders,
    output head) while it runs, so the device holds one expert's non-block weights and one block at a time.
    """
    from diffusers.hooks import apply_group_offloading

    use_stream = device.type == "cuda"
    for _, part in expert_transformers(transformer):
        apply_group_offloading(part, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)
    return use_stream
