"""FLOP accounting for utilisation figures: FLOPs counted by torch, a device peak, MFU and HFU.

- FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; elementwise ops
  count zero), never from a per-parameter formula: the image-stream weights of an MM-DiT see only video tokens,
  its context-stream weights only text tokens, and a frozen base runs no weight-gradient matmuls, which a
  "2 FLOPs per parameter per token" rule gets wrong.
- `count_flops` splits what ran into *hardware* FLOPs (everything executed, gradient-checkpoint recompute
  included) and *model* FLOPs (the same step without recompute).
- The peak is the published dense figure of a known accelerator for the dtype, otherwise (CPU, unlisted
  devices) measured in the same process by timing a matmul of the step's dtype and typical shape.
- MFU = model FLOPs / (seconds x peak); HFU = hardware FLOPs / (seconds x peak).

Counting runs the step eagerly (a compiled region hides its ops from the counter): count one eager step, time
the others.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    _FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from rlhf import devices

_aten = torch.ops.aten

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, by a substring of the device name and dtype.
PUBLISHED_PEAK_FLOPS: dict[tuple[str, torch.dtype], float] = {
    ("H100", torch.bfloat16): 989e12, ("H100", torch.float16): 989e12,
    ("H200", torch.bfloat16): 989e12, ("H200", torch.float16): 989e12,
    ("A100", torch.bfloat16): 312e12, ("A100", torch.float16): 312e12,
    ("910B", torch.bfloat16): 376e12, ("910B", torch.float16): 376e12,
}


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The CPU flash-attention kernels that `scaled_dot_product_attention` dispatches to are missing from torch's
# FLOP registry: without these entries every attention FLOP on the CPU counts as zero.
EXTRA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


class _RunAsIs(_FlopCounterMode):
    """Torch's counting dispatch mode without its one side effect: it decomposes every operator that has a
    composite implementation (`silu_backward` among them) before running it, which changes the last bits of the
    gradients. Here each operator runs as it would uncounted; the FLOP-bearing ones (matmuls, convolutions,
    attention) have no such decomposition, so the count is the same."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):
            return super().__torch_dispatch__(func, types, args, kwargs)
        kwargs = kwargs or {}
        return self.counter._count_flops(func._overloadpacket, func(*args, **kwargs), args, kwargs)


class StepFlopCounter(FlopCounterMode):
    """A silent `FlopCounterMode` that also counts the CPU attention kernels and leaves the numbers untouched: a
    counted step gives bit-identical gradients to an uncounted one, so a resumed run (which counts a different
    step than the straight run) ends with the same weights."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)

    def __enter__(self) -> StepFlopCounter:
        # `FlopCounterMode.__enter__` with `_RunAsIs` in place of torch's dispatch mode.
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _RunAsIs(self)
        self.mode.__enter__()
        return self


def flop_counter() -> FlopCounterMode:
    """A counter for one block of work; see `StepFlopCounter`."""
    return StepFlopCounter()


@dataclass
class StepFlops:
    """FLOPs of what ran inside `count_flops`: `hardware` includes the gradient-checkpoint recompute, `model` not."""

    hardware: int = 0
    recompute: int = 0

    @property
    def model(self) -> int:
        return self.hardware - self.recompute


class _RecomputeCounter:
    """Entered by torch.utils.checkpoint around each recompute: counts its FLOPs in a nested counter. The
    checkpoint's own recompute context (selective checkpointing's cache) is entered inside the counter, so the
    operations it serves from saved outputs are not counted: they do not run."""

    def __init__(self, flops: StepFlops, inner: contextlib.AbstractContextManager):
        self.flops, self.inner = flops, inner
        self.counter: FlopCounterMode | None = None

    def __enter__(self) -> None:
        self.counter = flop_counter()
        self.counter.__enter__()
        self.inner.__enter__()

    def __exit__(self, *exc) -> None:
        assert self.counter is not None
        self.inner.__exit__(*exc)
        self.counter.__exit__(*exc)
        self.flops.recompute += self.counter.get_total_flops()
        self.counter = None


def _counting_checkpoint(flops: StepFlops, context_fn, module: torch.nn.Module, *args):
    # The checkpoint function it replaces (diffusers' default, non-reentrant, or a selective one with its
    # `context_fn`), plus a recompute context that counts.
    def contexts():
        forward, recompute = context_fn() if context_fn else (contextlib.nullcontext(), contextlib.nullcontext())
        return forward, _RecomputeCounter(flops, recompute)

    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, context_fn=contexts)


@contextlib.contextmanager
def count_flops(*models: torch.nn.Module) -> Iterator[StepFlops]:
    """Count the FLOPs of the block (forward and backward) into the `StepFlops` it yields.

    Gradient checkpointing of `models` (diffusers models: `enable_gradient_checkpointing()`) runs through a
    non-reentrant checkpoint whose recompute is counted apart, so `model` excludes it. Checkpointing done by other
    code inside the block is not told apart (its recompute counts as model FLOPs): turn it off while counting.
    """
    flops = StepFlops()
    patched = [module for model in models for module in model.modules()
               if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func")]
    saved = [module._gradient_checkpointing_func for module in patched]
    for module in patched:
        module._gradient_checkpointing_func = functools.partial(
            _counting_checkpoint, flops, getattr(module._gradient_checkpointing_func, "context_fn", None))
    counter = flop_counter()
    try:
        with counter:
            yield flops
    finally:
        flops.hardware = counter.get_total_flops()
        for module, func in zip(patched, saved, strict=True):
            module._gradient_checkpointing_func = func


def published_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str] | None:
    """The data-sheet dense peak for `device` and `dtype` with its source, or None when none is listed."""
    if device.type == "cpu":
        return None
    name = devices.device_name(device)
    for (key, key_dtype), value in PUBLISHED_PEAK_FLOPS.items():
        if key in name and key_dtype == dtype:
            return value, f"published dense {str(dtype).removeprefix('torch.')} peak of {name}"
    return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
                         seconds: float = 1.0, rounds: int = 5) -> float:
    """The best FLOP/s of `(m, k) @ (k, n)` matmuls over `rounds` rounds of about `seconds / rounds` each."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device, dtype)
    b = torch.randn(k, n, generator=generator).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: thread pool, kernel selection
        torch.mm(a, b, out=out)
    devices.synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    devices.synchronize(device)
    per_round = max(1, int(seconds / rounds / max(time.perf_counter() - start, 1e-9)))
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            torch.mm(a, b, out=out)
        devices.synchronize(device)
        best = max(best, 2 * m * k * n * per_round / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int],
               seconds: float = 2.0) -> tuple[float, str]:
    """The device's peak FLOP/s for `dtype` and how it was obtained: the published figure, else the better of
    two measured matmuls, the step's typical `shape` and a 2048-square one (a small shape alone can sit below
    the machine's rate and make utilisation read high)."""
    published = published_peak_flops(device, dtype)
    if published is not None:
        return published
    shapes = [shape, (2048, 2048, 2048)]
    rates = [measure_matmul_flops(device, dtype, s, seconds / len(shapes)) for s in shapes]
    best = max(range(len(shapes)), key=rates.__getitem__)
    m, k, n = shapes[best]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return (rates[best], f"measured: best {str(dtype).removeprefix('torch.')} matmul {m}x{k} @ {k}x{n} "
                         f"on {device.type}{threads}")


def utilisation(flops: float, seconds: float, peak: float) -> float:
    """FLOPs done in `seconds` as a fraction of `peak` FLOP/s (MFU with model FLOPs, HFU with hardware FLOPs)."""
    return flops / seconds / peak
