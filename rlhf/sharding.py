"""The trainable state (LoRA weights and optimiser state) of a run, whatever its parallel layout.

Three layouts come out of `accelerate launch`:
- "replicated": one process, or DDP: every rank holds full parameters and full optimiser state.
- "fsdp": FSDP2 (`fully_shard`): parameters and optimiser state are DTensor shards.
- "deepspeed": ZeRO-2: full bf16 parameters; their fp32 masters and the optimiser state are partitioned.

Checkpoints store the *full* state under the module's parameter names, so one written by 8 FSDP ranks can
be read by one process and vice versa ("replicated" and "fsdp" share the format). DeepSpeed keeps its own
partitioned optimiser files (its engine restores them, for the same world size).

Every function here that gathers is collective: call it on all ranks.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Layout = Literal["replicated", "fsdp", "deepspeed"]


def layout_of(accelerator: Any) -> Layout:
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed"
    return "replicated"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a possibly sharded tensor (a DTensor's local shard, else the tensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimiser state (moments) this process holds, through accelerate's and DeepSpeed's wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return sum(local(value).numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor) and value.dim() > 0)


def _options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_trainable(model: torch.nn.Module, layout: Layout) -> dict[str, torch.Tensor]:
    """Full fp32 values of the trainable parameters, on the CPU, by module name (complete on rank 0)."""
    if layout == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        # The module holds bf16 copies; the fp32 masters live partitioned in the ZeRO optimiser.
        return {name: safe_get_full_fp32_param(param).detach().float().cpu()
                for name, param in model.named_parameters() if param.requires_grad}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))
    return {name: value.float() for name, value in state.items()}


def gather_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimiser state keyed by parameter name, on the CPU (complete on rank 0). Not for DeepSpeed."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_trainable(model: torch.nn.Module, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   optimizer_state: dict[str, Any]) -> None:
    """Set the trainable parameters and the optimiser from full states (every rank passes the same)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=params, optim_state_dict=optimizer_state,
                   options=_options(strict=False))
