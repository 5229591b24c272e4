"""The declared dependency floors: satisfied by this environment, each explained in docs/dependencies.md.

`.ci/floors` installs every dependency AT its floor in a scratch venv and runs the key tests there with
CONTENTV_RLHF_AT_FLOORS=1, which makes `test_installed_versions_satisfy_the_floors` demand equality.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

import pytest

from tests.conftest import REPO

FLOOR = re.compile(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)"')


def declared_floors() -> dict[str, str]:
    """{package: floor} of [project] dependencies and the optional extras, read from pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    text = text[text.index("\ndependencies = ["):]  # not [build-system]
    return {name.lower().replace("_", "-"): floor for name, floor in FLOOR.findall(text)}


def documented_floors() -> dict[str, str]:
    """{package: floor} of the table in docs/dependencies.md (rows `| package | floor | ... |`)."""
    rows = re.findall(r"^\| `([A-Za-z0-9_.-]+)` \| ([0-9][0-9.]*) \|", (REPO / "docs" / "dependencies.md").read_text(),
                      flags=re.MULTILINE)
    return {name.lower().replace("_", "-"): floor for name, floor in rows}


def test_installed_versions_satisfy_the_floors():
    from packaging.version import Version

    at_floors = os.environ.get("CONTENTV_RLHF_AT_FLOORS") == "1"
    problems = []
    for name, floor in declared_floors().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an optional extra that is not installed (npu, deepspeed)
        installed_version = Version(Version(installed).base_version)  # 2.5.1+cpu -> 2.5.1
        if installed_version < Version(floor) or (at_floors and installed_version != Version(floor)
                                                   and name not in {"pytest", "ruff", "packaging"}):
            problems.append(f"{name} {installed} (floor {floor})")
    assert not problems, f"installed versions vs declared floors: {problems}"


def test_every_floor_is_documented_with_the_api_that_sets_it():
    declared, documented = declared_floors(), documented_floors()
    runtime = {k: v for k, v in declared.items() if k not in {"pytest", "ruff", "packaging", "torch-npu"}}
    assert {k: documented.get(k) for k in runtime} == runtime


def test_trl_is_neither_declared_nor_imported():
    assert "trl" not in declared_floors()
    sources = [p for d in ("rlhf", "rewards", "rollouts", "dpo", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert sources and not [p for p in sources if re.search(r"^\s*(import trl|from trl)\b", p.read_text(), re.M)]


def test_the_apis_that_set_the_floors_exist():
    import inspect

    from accelerate.utils import FullyShardedDataParallelPlugin
    from diffusers.loaders import peft as diffusers_peft
    from diffusers.utils import apply_lora_scale  # noqa: F401  (diffusers >= 0.37)
    from open_clip import factory
    from transformers import modeling_utils

    # diffusers >= 0.38: set_adapters(weights=...) on a model class diffusers does not know.
    assert "SD3Transformer3DModel" in diffusers_peft._SET_ADAPTER_SCALE_FN_MAPPING or \
        hasattr(diffusers_peft._SET_ADAPTER_SCALE_FN_MAPPING, "default_factory")
    assert "fsdp_version" in inspect.signature(FullyShardedDataParallelPlugin).parameters  # accelerate >= 1.6
    assert "local-dir:" in inspect.getsource(factory)  # open_clip >= 3.0
    assert 'kwargs.pop("dtype"' in inspect.getsource(modeling_utils.PreTrainedModel.from_pretrained)  # >= 4.56


@pytest.mark.parametrize("module", ["av", "datasets", "pyarrow", "safetensors", "tokenizers", "sentencepiece"])
def test_declared_runtime_modules_import(module):
    __import__(module)
