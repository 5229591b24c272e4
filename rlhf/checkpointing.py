"""Gradient checkpointing of the transformer blocks: full (diffusers' default), selective, none, or auto.

- `full` stores each block's inputs and recomputes the whole block forward in the backward pass: the least
  memory, and about a third more FLOPs per training step (every matmul of the forward runs twice).
- `selective` (torch's selective activation checkpointing) stores the outputs of the matmuls and attention
  inside each block and recomputes only the cheap operations around them (norms, activations, modulation,
  residual adds), so the backward pass repeats almost no FLOPs; memory lies between full checkpointing and
  none (the saved outputs of every projection and MLP matmul). Use it where full checkpointing leaves
  memory to spare and the step is compute-bound. It does not combine with `compile` (torch finds the outputs
  it saved from the compiled blocks mutated), so the trainers refuse that pair of settings.
- `auto` (the trainers' default) runs the first step with full checkpointing while `ActivationProbe` measures
  what one block's forward would keep, then picks the fastest policy whose activations fit in the device's
  free memory (`choose_policy`): none where they fit, else selective, else full. So a model that fits trains
  without recompute (on the mid-size benchmark model, 0.124 -> 0.096 TFLOP per DPO step), and ContentV-8B at
  full resolution keeps full checkpointing. All processes of a launch take the most frugal choice of any.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from rlhf.lowmem import BLOCK_LISTS, expert_transformers
from rlhf.options import CheckpointPolicyName

# What `auto` chooses from, fastest (most memory) first. `full` always fits: it is what the probed step ran.
RESOLVED_POLICIES = ("none", "selective", "full")

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


def enable_checkpointing(transformer: torch.nn.Module, policy: CheckpointPolicyName | str) -> None:
    """Set gradient checkpointing of a diffusers transformer's blocks to `policy` (full, selective or none)."""
    if policy == "selective":
        transformer.enable_gradient_checkpointing(gradient_checkpointing_func=selective_checkpoint)
    elif policy == "full":
        transformer.enable_gradient_checkpointing()
    elif policy == "none":
        transformer.disable_gradient_checkpointing()
    else:
        raise ValueError(f"unknown checkpoint policy {policy!r}; expected full, selective or none")


# ----------------------------------------------------------------------------------------------------- auto


@dataclass
class ActivationEstimate:
    """Activation memory of one training step's transformer forwards, from one block's forward.

    `block_bytes` is what that block's forward keeps for the backward pass without checkpointing (the storages
    autograd saves, parameters apart); `block_saved_bytes` what its matmuls and attention output: what selective
    checkpointing keeps. `forwards` counts the step's transformer forwards that record autograd (all
    micro-batches: an upper bound, as each micro-batch's backward frees its own).
    """

    block_bytes: int = 0
    block_saved_bytes: int = 0
    blocks: int = 0
    forwards: int = 0

    def step_bytes(self, policy: str) -> int:
        """Bytes the step's block activations take under `policy` (full: 0 beyond what the probed step held)."""
        per_block = {"none": self.block_bytes, "selective": self.block_saved_bytes, "full": 0}[policy]
        return per_block * self.blocks * self.forwards


def choose_policy(estimate: ActivationEstimate, available_bytes: int | None,
                  allowed: Sequence[str] = RESOLVED_POLICIES, headroom: float = 0.75) -> str:
    """The fastest of `allowed` whose activations fit: `estimate.step_bytes(policy) <= headroom * available`.

    `available_bytes` is the device's free memory after the probed step (None, unknown: full). `full` is
    always chosen last, as it is what that step ran with.
    """
    if available_bytes is None:
        return "full"
    for policy in allowed:
        if policy == "full" or estimate.step_bytes(policy) <= headroom * available_bytes:
            return policy
    return "full"


def _storage(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of a tensor's storage; None for tensor subclasses without one (quantised weights)."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


class _SavedOpBytes(TorchDispatchMode):
    """Sums the bytes output by the operations selective checkpointing keeps (matmuls, attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in SAVED_OPS:
            self.bytes += sum(key[1] for t in tree_leaves(out)
                              if isinstance(t, torch.Tensor) and (key := _storage(t)) is not None)
        return out


def block_lists(transformer: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """Every non-empty list of checkpointed blocks of a diffusers transformer, in `BLOCK_LISTS` order."""
    lists = [blocks for name in BLOCK_LISTS
             if isinstance(blocks := getattr(transformer, name, None), torch.nn.ModuleList) and len(blocks)]
    if not lists:
        raise ValueError(f"{type(transformer).__name__} has no {' / '.join(BLOCK_LISTS)} to checkpoint")
    return lists


class ActivationProbe:
    """What `auto` checkpointing needs to know of a training step: see `ActivationEstimate`.

    Inside `measuring()` (around one step), the transformer's forwards that record autograd are counted and the
    first block's first such call has its inputs kept. `measure()`, after the step, runs that block once more on
    them, with autograd recording, and sums the storages autograd saves: one block forward, outside the step
    (which it leaves unchanged, FLOP count included).

    A transformer with several kinds of block (HunyuanVideo: dual-stream then single-stream blocks,
    `block_lists`) has the first block of each list watched: `blocks` counts them all and one block's bytes are
    the mean over them, each list's first block standing for its list.

    A module of several experts (Wan2.2 A14B's `WanExperts`, rlhf.lowmem.expert_transformers) sends each sample of
    a forward to one expert's blocks: the first block of every expert is watched, a step that runs any of them is
    measured, and one block's bytes are the sum over the experts measured (each on the samples it took). That sum
    is what a forward's samples keep together, or more (at most once per expert) when the kept inputs came from different
    forwards: an upper bound, as `forwards` is.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        lists = [block_lists(part) for _, part in expert_transformers(transformer)]
        # (the first block of each list of each expert, how many blocks it stands for)
        self.blocks = [(blocks[0], len(blocks)) for expert in lists for blocks in expert]
        self.estimate = ActivationEstimate(blocks=sum(len(blocks) for blocks in lists[0]))  # experts share one layout
        self.inputs: dict[int, tuple[tuple, dict]] = {}  # index in `blocks` -> its first inputs with autograd

    @property
    def measured(self) -> bool:
        """Whether a step has run inside `measuring()` and given a block's inputs."""
        return bool(self.inputs)

    def _count_forward(self, module, args) -> None:
        if torch.is_grad_enabled():
            self.estimate.forwards += 1

    def _keep_inputs(self, index: int, args: tuple, kwargs: dict) -> None:
        if index not in self.inputs and torch.is_grad_enabled():
            # Detached from the step's graph, but still requiring grad where they did: autograd saves more for an
            # input it must differentiate (a gated residual keeps its input only then).
            detach = lambda value: value.detach().requires_grad_(value.requires_grad) \
                if isinstance(value, torch.Tensor) else value  # noqa: E731
            self.inputs[index] = (tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()})

    @contextlib.contextmanager
    def measuring(self) -> Iterator[ActivationEstimate]:
        handles = [self.transformer.register_forward_pre_hook(self._count_forward)]
        for index, (block, _) in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: self._keep_inputs(index, args, kwargs), with_kwargs=True))
        try:
            yield self.estimate
        finally:
            for handle in handles:
                handle.remove()

    def measure(self) -> ActivationEstimate:
        """Run the block(s) on the kept inputs (call it under the step's autocast) and fill in its bytes."""
        assert self.inputs, "measure() after a step inside measuring()"
        kept_total = saved_total = 0  # over the blocks each measured one stands for
        for index, (args, kwargs) in sorted(self.inputs.items()):
            block, count = self.blocks[index]
            kept, saved = self._block_bytes(block, args, kwargs)
            kept_total += kept * count
            saved_total += saved * count
        self.estimate.block_bytes = -(-kept_total // self.estimate.blocks)  # rounded up: an upper bound
        self.estimate.block_saved_bytes = -(-saved_total // self.estimate.blocks)
        return self.estimate

    @staticmethod
    def _block_bytes(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        """(what autograd saves, what the matmuls and attention output) of one forward of `block`."""
        parameters = {key[0] for p in block.parameters() if (key := _storage(p)) is not None}
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = _storage(tensor)
            if key is not None and key[0] not in parameters:
                saved[key[0]] = key[1]
            return tensor

        saved_ops = _SavedOpBytes()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), saved_ops:
            block(*args, **kwargs)
        return sum(saved.values()), saved_ops.bytes
