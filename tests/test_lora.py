"""LoRA adapters: both saved formats reload to the same outputs; peft's and diffusers' own loaders, called as
docs/formats.md documents them, load ours verbatim and `generate` then writes the frames of `--adapter`."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rlhf.generation
import rlhf.video
from rlhf.errors import UserError
from rlhf.lora import (
    DIFFUSERS_WEIGHTS,
    PEFT_MODEL_PREFIX,
    PEFT_WEIGHTS,
    add_lora,
    load_adapter,
    read_peft_weights,
    save_adapter,
)
from rlhf.models.loader import load_contentv
from tests.conftest import REPO, call_cli
from tests.conftest import tiny_forward as forward

FORMATS_DOC = REPO / "docs" / "formats.md"
GENERATE = ["generate", "--prompt", "a red ball on grass", "--frames", "5", "--height", "32", "--width", "32",
            "--steps", "2", "--guidance", "3", "--dtype", "fp32", "--seed", "1"]


def fresh_transformer(model_dir):
    return load_contentv(model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer


@pytest.fixture(scope="module")
def adapted(tiny_model_dir, tmp_path_factory):
    model = fresh_transformer(tiny_model_dir)
    base = forward(model)
    add_lora(model, rank=4, alpha=8)  # alpha != rank: the scaling must survive the round trip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    out = save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")
    return model, base, forward(model), out


def test_fresh_lora_is_identity(tiny_model_dir):
    model = fresh_transformer(tiny_model_dir)
    base = forward(model)
    add_lora(model, rank=4, alpha=4)
    assert torch.equal(forward(model), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_peft_format_round_trip(tiny_model_dir, adapted):
    _, base, expected, adapter_dir = adapted
    model = fresh_transformer(tiny_model_dir)
    load_adapter(model, adapter_dir)
    out = forward(model)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, base)


def test_diffusers_format_loads_with_diffusers(tiny_model_dir, adapted, tmp_path):
    _, _, expected, adapter_dir = adapted
    model = fresh_transformer(tiny_model_dir)
    model.load_lora_adapter(str(adapter_dir), weight_name=DIFFUSERS_WEIGHTS, prefix="transformer")
    torch.testing.assert_close(forward(model), expected)
    # And our loader falls back to the diffusers file when the peft files are absent.
    only_diffusers = tmp_path / "only_diffusers"
    only_diffusers.mkdir()
    (only_diffusers / DIFFUSERS_WEIGHTS).write_bytes((adapter_dir / DIFFUSERS_WEIGHTS).read_bytes())
    model = fresh_transformer(tiny_model_dir)
    load_adapter(model, only_diffusers)
    torch.testing.assert_close(forward(model), expected)


def test_adapter_scale_zero_is_base(tiny_model_dir, adapted):
    _, base, _, adapter_dir = adapted
    model = fresh_transformer(tiny_model_dir)
    load_adapter(model, adapter_dir, scale=0.0)
    torch.testing.assert_close(forward(model), base)


def test_bad_adapters(tiny_model_dir, adapted, tmp_path):
    model = fresh_transformer(tiny_model_dir)
    with pytest.raises(UserError, match="not_there: adapter directory not found"):
        load_adapter(model, tmp_path / "not_there")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no LoRA adapter found"):
        load_adapter(model, tmp_path / "empty")
    with pytest.raises(UserError, match="attn.to_qq"):
        add_lora(model, rank=2, alpha=2, targets=["attn.to_qq"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapted[3] / "adapter_config.json").read_bytes())
    (broken / PEFT_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(UserError, match="broken: adapter could not be loaded"):
        load_adapter(model, broken)


def test_two_adapters_on_one_transformer(tiny_model_dir, adapted):
    _, base, expected, adapter_dir = adapted
    model = fresh_transformer(tiny_model_dir)
    load_adapter(model, adapter_dir, adapter_name="first")
    load_adapter(model, adapter_dir, adapter_name="second")
    model.set_adapters(["first"])
    torch.testing.assert_close(forward(model), expected)
    model.disable_adapters()
    torch.testing.assert_close(forward(model), base)


# ---- loading with peft and diffusers, as docs/formats.md says ------------------------------------------------


def documented_call(loader: str) -> str:
    """The Python call docs/formats.md gives for `loader` ("peft" or "diffusers"), e.g. ``PeftModel...``."""
    match = re.search(rf"^- {loader}: `([^`]+)`", FORMATS_DOC.read_text(), re.M)
    assert match, f"docs/formats.md documents no {loader} call"
    return match.group(1)


def load_as_documented(loader: str, transformer: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Run the documented call on `transformer`; returns the model to use (peft wraps it, diffusers does not)."""
    from peft import PeftModel

    call = documented_call(loader).replace('"ADAPTER"', repr(str(adapter_dir)))
    scope = {"PeftModel": PeftModel, "transformer": transformer}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft reports unmatched keys only as a warning
        exec(call, scope)  # noqa: S102 - the documented snippet itself is what is under test
    return scope.get("model", transformer)


@pytest.mark.parametrize("loader", ["peft", "diffusers"])
def test_documented_loaders_give_the_trained_adapter_verbatim(tiny_model_dir, adapted, loader):
    model, base, expected, adapter_dir = adapted
    loaded = load_as_documented(loader, fresh_transformer(tiny_model_dir), adapter_dir)
    out = forward(loaded)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, base)
    trained, got = lora_tensors(model), lora_tensors(loaded)
    assert trained and got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)


def lora_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights by module path, whatever the adapter is named (diffusers names it `default_0`)."""
    return {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k.removeprefix(PEFT_MODEL_PREFIX)): v
            for k, v in model.state_dict().items() if "lora_" in k}


def test_peft_file_is_what_peft_itself_saves(tiny_model_dir, adapted, tmp_path):
    """Same keys, tensors, header metadata and config as `PeftModel.save_pretrained` of the loaded adapter."""
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, _, _, adapter_dir = adapted
    PeftModel.from_pretrained(fresh_transformer(tiny_model_dir), str(adapter_dir)).save_pretrained(tmp_path)
    ours, peft_own = load_file(adapter_dir / PEFT_WEIGHTS), load_file(tmp_path / PEFT_WEIGHTS)
    assert ours.keys() == peft_own.keys()
    assert all(torch.equal(ours[k], peft_own[k]) for k in ours)
    with safe_open(adapter_dir / PEFT_WEIGHTS, "pt") as a, safe_open(tmp_path / PEFT_WEIGHTS, "pt") as b:
        assert a.metadata() == b.metadata()
    assert read_peft_weights(adapter_dir).keys() == {k.removeprefix(PEFT_MODEL_PREFIX) for k in ours}


def test_generate_writes_the_same_frames_for_each_documented_loader(tiny_model_dir, adapted, tmp_path,
                                                                      monkeypatch, capsys):
    """`generate --adapter` (our loader) vs `generate` on a transformer loaded by peft / by diffusers."""
    adapter_dir = adapted[3]
    written: list[np.ndarray] = []
    write_mp4 = rlhf.video.write_mp4
    monkeypatch.setattr(rlhf.video, "write_mp4", lambda path, frames, **kw: (written.append(frames.copy()),
                                                                              write_mp4(path, frames, **kw))[1])
    load_model_ = rlhf.generation.load_model

    def generate(*extra: str, loader: str | None = None) -> np.ndarray:
        def load_then_attach(*args, **kwargs):
            parts = load_model_(*args, **kwargs)
            parts.transformer = load_as_documented(loader, parts.transformer, adapter_dir)
            return parts

        with monkeypatch.context() as patch:
            if loader:
                patch.setattr(rlhf.generation, "load_model", load_then_attach)
            # Each video replaces the last (generate, like every command, replaces its output only when told).
            code, _, err = call_cli(capsys, *GENERATE, "--model", tiny_model_dir, "--out", tmp_path / "v.mp4",
                                    "--overwrite", *extra)
        assert code == 0, err
        return written[-1]

    ours = generate("--adapter", adapter_dir)
    assert not np.array_equal(ours, generate())  # the adapter changes the video
    for loader in ("peft", "diffusers"):
        np.testing.assert_array_equal(generate(loader=loader), ours, err_msg=loader)
