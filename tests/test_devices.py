"""The device layer: names, dtypes, the Ascend switch, and that no other module talks to CUDA directly."""

import re
from pathlib import Path

import pytest
import torch

from rlhf import devices
from rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_and_auto_on_this_machine(monkeypatch):
    monkeypatch.delenv("USE_ASCEND_NPU", raising=False)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "auto:0", ""])
def test_unknown_device_names(name):
    with pytest.raises(UserError, match="device: unknown device"):
        devices.resolve_device(name)


def test_use_ascend_npu_is_honoured(monkeypatch):
    monkeypatch.setenv("USE_ASCEND_NPU", "1")
    monkeypatch.setattr(devices, "_import_torch_npu", lambda: False)
    with pytest.raises(UserError, match="USE_ASCEND_NPU=1 is set but torch_npu is not installed"):
        devices.resolve_device("auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_rank_picks_the_accelerator_index(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert devices.resolve_device("cuda") == torch.device("cuda:0")


def test_dtypes():
    assert devices.parse_dtype("bf16") is torch.bfloat16
    assert devices.parse_dtype("float32") is torch.float32
    with pytest.raises(UserError, match="dtype: unknown dtype 'int8'"):
        devices.parse_dtype("int8")


def test_memory_calls_are_noops_on_cpu():
    cpu = torch.device("cpu")
    devices.empty_cache(cpu)
    devices.reset_peak_memory(cpu)
    assert devices.peak_memory_bytes(cpu) is None


def test_no_cuda_only_calls_outside_the_device_layer():
    pattern = re.compile(r"torch\\.cuda\\.|\\.cuda\\(\\)|torch_npu")
    allowed = {ROOT / "rlhf" / "devices.py", ROOT / "rlhf" / "models" / "attention.py"}
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("rlhf", "rewards", "rollouts", "dpo")
        for path in (ROOT / folder).rglob("*.py")
        if path not in allowed and pattern.search(path.read_text())
    ]
    assert offenders == []
