"""Gradient checkpointing of the transformer blocks: full (diffusers' default) or selective.

- `full` stores each block's inputs and recomputes the whole block forward in the backward pass: the least
  memory, and about a third more FLOPs per training step (every matmul of the forward runs twice).
- `selective` (torch's selective activation checkpointing) stores the outputs of the matmuls and attention
  inside each block and recomputes only the cheap operations around them (norms, activations, modulation,
  residual adds), so the backward pass repeats almost no FLOPs; memory lies between full checkpointing and
  none (the saved outputs of every projection and MLP matmul). Use it where full checkpointing leaves
  memory to spare and the step is compute-bound. It does not combine with `compile` (torch finds the outputs
  it saved from the compiled blocks mutated), so the trainers refuse that pair of settings.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from rlhf.options import CheckpointPolicyName

_aten = torch.ops.aten
# Operations whose outputs selective checkpointing keeps: the matmuls and the attention kernels of each backend.
SAVED_OPS = {
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm,
    _aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention, _aten._scaled_dot_product_flash_attention_for_cpu,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.overloadpacket in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """`context_fn` of `torch.utils.checkpoint.checkpoint`: save matmul and attention outputs, recompute the rest."""
    return create_selective_checkpoint_contexts(_keep_matmuls)


def selective_checkpoint(module: torch.nn.Module, *args):
    """A diffusers `gradient_checkpointing_func` (called as `func(block, *inputs)`) that checkpoints selectively."""
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=selective_contexts)


# rlhf.flops counts recompute through the same contexts (a counted checkpoint keeps the policy it replaces).
selective_checkpoint.context_fn = selective_contexts  # type: ignore[attr-defined]


def enable_checkpointing(transformer: torch.nn.Module, policy: CheckpointPolicyName) -> None:
    """Turn on gradient checkpointing of a diffusers transformer's blocks with `policy`."""
    if policy == "selective":
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=selective_checkpoint)
    elif policy == "full":
        transformer.enable_gradient_checkpointing()
    else:
        raise ValueError(f"unknown checkpoint policy {policy!r}; expected full or selective")

