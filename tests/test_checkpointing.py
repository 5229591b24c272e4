"""Selective gradient checkpointing (rlhf/checkpointing.py): the same gradients as no checkpointing and as full
checkpointing, with (almost) no recomputed FLOPs, and the recompute of each policy counted by rlhf.flops."""

import pytest
import torch

from rlhf.checkpointing import enable_checkpointing
from rlhf.flops import count_flops
from rlhf.lora import add_lora
from rlhf.models.transformer import SD3Transformer3DModel
from tests.test_flops import CONFIG, inputs


def lora_gradients(policy: str | None) -> tuple[dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    model = SD3Transformer3DModel(num_layers=2, **CONFIG)
    model.requires_grad_(False)
    add_lora(model, rank=4, alpha=4)
    with torch.no_grad():  # a non-zero adapter, so that every LoRA matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    if policy is not None:
        enable_checkpointing(model, policy)
    model.train()
    with count_flops(model) as flops:
        model(**inputs()).sample.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, flops


def test_selective_checkpointing_gives_the_same_gradients_with_almost_no_recompute():
    plain, plain_flops = lora_gradients(None)
    full, full_flops = lora_gradients("full")
    selective, selective_flops = lora_gradients("selective")
    assert plain and plain.keys() == full.keys() == selective.keys()
    for name in plain:
        torch.testing.assert_close(full[name], plain[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(selective[name], plain[name], rtol=1e-5, atol=1e-7)
    # Model FLOPs are the same work in all three; the recompute is what each policy adds.
    assert full_flops.model == selective_flops.model == plain_flops.hardware
    assert full_flops.recompute > 0.2 * plain_flops.hardware
    # Matmuls and attention come from saved outputs: no counted FLOP is recomputed.
    assert selective_flops.recompute == 0


def test_unknown_policy_is_refused():
    model = SD3Transformer3DModel(num_layers=1, **CONFIG)
    with pytest.raises(ValueError, match="selective"):
        enable_checkpointing(model, "partial")  # type: ignore[arg-type]


def test_selective_checkpointing_with_compile_is_refused_before_any_work(tiny_pairs, tmp_path, capsys):
    from tests.conftest import call_cli
    from tests.test_dpo_trainer import train_args

    code, _, err = call_cli(capsys, *train_args(tiny_pairs, tmp_path / "run", "--gradient-checkpointing",
                                                "--checkpoint-policy", "selective", "--compile"))
    assert code == 2 and "checkpoint_policy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
