"""LoRA adapters: both saved formats reload to the same outputs; diffusers' own loader accepts ours."""

import pytest
import torch

from rlhf.errors import UserError
from rlhf.lora import DIFFUSERS_WEIGHTS, PEFT_WEIGHTS, add_lora, load_adapter, save_adapter
from rlhf.models.loader import load_contentv
from tests.conftest import tiny_forward as forward


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
