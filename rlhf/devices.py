"""The one place that knows about accelerators: CUDA, Ascend NPU (torch_npu) or CPU.

Everything else asks this module for a device, an autocast context, or memory figures, so no
`torch.cuda.*` call appears elsewhere in the code base.
"""

from __future__ import annotations

import contextlib
import os

import torch

from rlhf.errors import UserError
from rlhf.options import DEVICE_CHOICES, DTYPE_CHOICES, device_name_problem

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """Map `bf16` / `fp16` / `fp32` (or their long names) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"{field}: unknown dtype {name!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[key]


def _npu_requested_by_env() -> bool:
    return os.environ.get("USE_ASCEND_NPU", "0").strip() not in ("", "0", "false", "False")


def _import_torch_npu() -> bool:
    """Import torch_npu and route `torch.cuda` calls of third-party code to the NPU."""
    try:
        import torch_npu  # noqa: F401
        from torch_npu.contrib import transfer_to_npu  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """Pick the device for `name` in {auto, cuda, npu, cpu} (an index such as `cuda:1` is allowed).

    `auto` picks the NPU when `USE_ASCEND_NPU=1` is set, else CUDA, else an NPU if torch_npu is installed,
    else the CPU. Asking for a device that is not present is a `UserError`. Under a multi-process launcher
    (torchrun / accelerate), an accelerator without an index becomes the process's `LOCAL_RANK` device.
    """
    if device_name_problem(str(name)):
        raise UserError(f"device: unknown device {name!r}; expected one of {', '.join(DEVICE_CHOICES)} "
                        "or an indexed device such as cuda:1")
    kind, _, index = str(name).partition(":")
    if kind == "auto":
        if _npu_requested_by_env():
            kind = "npu"
        elif torch.cuda.is_available():
            kind = "cuda"
        elif _import_torch_npu():
            kind = "npu"
        else:
            return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("device: 'cuda' was requested but torch sees no CUDA device")
    if kind == "npu" and not _import_torch_npu():
        why = "USE_ASCEND_NPU=1 is set" if _npu_requested_by_env() else "'npu' was requested"
        raise UserError(f"device: {why} but torch_npu is not installed or sees no NPU "
                        "(pip install 'contentv-rlhf[npu]')")
    if kind == "cpu":
        return torch.device("cpu")
    if not index and "LOCAL_RANK" in os.environ:
        index = os.environ["LOCAL_RANK"]
    return torch.device(f"{kind}:{index}" if index else kind)


def _backend(device: torch.device):
    """The torch.<backend> module for memory calls, or None on CPU."""
    if device.type == "cuda":
        return torch.cuda
    if device.type == "npu":
        return torch.npu
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed-precision context for `device`; a no-op when `dtype` is None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def empty_cache(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.empty_cache()


def synchronize(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    backend = _backend(device)
    if backend is not None:
        backend.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by tensors on an accelerator since the last reset; None on CPU."""
    backend = _backend(device)
    return None if backend is None else int(backend.max_memory_allocated(device))


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory of an accelerator (its driver's figure), or on CPU the kernel's MemAvailable; None if unknown."""
    backend = _backend(device)
    if backend is not None:
        return int(backend.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    """The accelerator's product name (e.g. "NVIDIA H100 80GB HBM3"); "cpu" on the CPU."""
    backend = _backend(device)
    return "cpu" if backend is None else str(backend.get_device_name(device))


def manual_seed_all(seed: int) -> None:
    """Seed torch on the CPU and every accelerator backend present."""
    torch.manual_seed(seed)
    for backend in (torch.cuda, getattr(torch, "npu", None)):
        if backend is not None and backend.is_available():
            backend.manual_seed_all(seed)


def rng_state(device: torch.device) -> torch.Tensor | None:
    """The accelerator's RNG state for `device` (None on CPU), for exact resumes."""
    backend = _backend(device)
    return None if backend is None else backend.get_rng_state(device)


def set_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    backend = _backend(device)
    if backend is not None and state is not None:
        backend.set_rng_state(state, device)
