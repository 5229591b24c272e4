"""load_contentv on the tiny checkpoint: dtypes, the model_index quirk, round trips, clear errors."""

import json
import shutil

import pytest
import torch

from rlhf.errors import UserError
from rlhf.models.loader import load_contentv
from rlhf.models.transformer import SD3Transformer3DModel


def test_loads_components_not_listed_in_model_index(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert "transformer" not in index and "vae" not in index
    parts = load_contentv(tiny_model_dir)
    assert isinstance(parts.transformer, SD3Transformer3DModel)
    assert parts.transformer.dtype == torch.bfloat16  # reference demo: transformer bf16
    assert next(parts.vae.parameters()).dtype == torch.float32  # VAE fp32
    assert parts.schedule.shift == json.loads((tiny_model_dir / "scheduler/scheduler_config.json").read_text())["shift"]
    assert not any(p.requires_grad for p in parts.transformer.parameters())


def test_transformer_round_trip_same_outputs(tiny_model_dir, tmp_path):
    transformer = load_contentv(tiny_model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    transformer.save_pretrained(tmp_path / "transformer")
    reloaded = SD3Transformer3DModel.from_pretrained(tmp_path / "transformer")
    inputs = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4), encoder_hidden_states=torch.randn(1, 333, 32),
        pooled_projections=torch.randn(1, 24), timestep=torch.tensor([600.0]),
    )
    with torch.no_grad():
        assert torch.equal(transformer(**inputs).sample, reloaded(**inputs).sample)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="nowhere: model directory not found"):
        load_contentv(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("model_index.json", "model_index.json: missing"),
        ("transformer/config.json", "transformer/config.json: missing"),
        ("vae", "vae: missing or empty"),
        ("tokenizer_3", "tokenizer_3: missing or empty"),
    ],
)
def test_incomplete_directory_names_the_missing_part(model_copy, remove, message):
    target = model_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=message):
        load_contentv(model_copy)


def test_corrupt_weights_are_a_user_error(model_copy):
    weights = next((model_copy / "transformer").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="transformer: could not be loaded"):
        load_contentv(model_copy, load_vae=False, load_text_encoders=False)


def test_bad_dtype_and_device_names():
    from rlhf.devices import parse_dtype, resolve_device

    with pytest.raises(UserError, match="unknown dtype 'bf17'"):
        parse_dtype("bf17")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")
