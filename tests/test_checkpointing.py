"""Selective gradient checkpointing (rlhf/checkpointing.py): the same gradients as no checkpointing and as full
checkpointing, with (almost) no recomputed FLOPs, and the recompute of each policy counted by rlhf.flops."""

import json

import pytest
import torch

from rlhf.checkpointing import ActivationEstimate, ActivationProbe, choose_policy, enable_checkpointing
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
    with pytest.raises(ValueError, match="selective or none"):
        enable_checkpointing(model, "partial")  # type: ignore[arg-type]


def test_selective_checkpointing_with_compile_is_refused_before_any_work(tiny_pairs, tmp_path, capsys):
    from tests.conftest import call_cli
    from tests.test_dpo_trainer import train_args

    code, _, err = call_cli(capsys, *train_args(tiny_pairs, tmp_path / "run", "--gradient-checkpointing",
                                                "--checkpoint-policy", "selective", "--compile"))
    assert code == 2 and "checkpoint_policy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------- auto


def saved_tensor_bytes(model, **kwargs) -> int:
    """What autograd really keeps of a forward without checkpointing: the bytes of each storage saved for
    backward (parameters apart), counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**kwargs)
    return sum(storages.values())


def lora_model(layers: int) -> SD3Transformer3DModel:
    torch.manual_seed(0)
    model = SD3Transformer3DModel(num_layers=layers, **CONFIG)
    model.requires_grad_(False)
    add_lora(model, rank=4, alpha=4)
    return model


def test_activation_probe_bounds_what_the_step_keeps():
    model = lora_model(3)
    enable_checkpointing(model, "full")
    probe = ActivationProbe(model)
    with probe.measuring() as estimate:
        with torch.no_grad():  # a reference forward records no autograd: not counted
            model(**inputs())
        model(**inputs()).sample.square().mean().backward()  # its recompute is not measured again
        model(**inputs()).sample.square().mean().backward()
    assert probe.measured and estimate.blocks == 3 and estimate.forwards == 2
    probe.measure()
    # What one block keeps: a 3-layer model's saved bytes less a 2-layer one's (the last block of each is a
    # context-pre-only block; what the blocks share differs a little between the two models).
    kept = saved_tensor_bytes(lora_model(3), **inputs()) - saved_tensor_bytes(lora_model(2), **inputs())
    assert abs(estimate.block_bytes - kept) <= 0.1 * kept
    # Selective keeps every matmul's and attention's output: of the order of what autograd keeps.
    assert 0.3 * kept < estimate.block_saved_bytes < 3 * kept
    assert estimate.step_bytes("none") == estimate.block_bytes * 3 * 2
    assert estimate.step_bytes("full") == 0


def test_choose_policy_takes_the_fastest_that_fits_in_the_headroom():
    estimate = ActivationEstimate(block_bytes=100, block_saved_bytes=40, blocks=2, forwards=1)  # 200 and 80
    assert choose_policy(estimate, 1000) == "none"
    assert choose_policy(estimate, 200) == "selective"  # 200 > 0.75 * 200 >= 80
    assert choose_policy(estimate, 100) == "full"
    assert choose_policy(estimate, None) == "full"
    assert choose_policy(estimate, 1000, allowed=("full",)) == "full"


def test_auto_trains_without_recompute_when_memory_allows_and_gives_the_same_weights(tiny_pairs, tmp_path,
                                                                                    capsys):
    from safetensors.torch import load_file

    from tests.conftest import call_cli
    from tests.test_dpo_trainer import train_args

    runs = {}
    for policy in ("auto", "full"):
        out = tmp_path / policy
        code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--gradient-checkpointing",
                                                    "--checkpoint-policy", policy, "--max-steps", "3"))
        assert code == 0, err
        runs[policy] = (json.loads((out / "summary.json").read_text()),
                        load_file(str(out / "adapter" / "adapter_model.safetensors")),
                        [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()])
    (auto_summary, auto_weights, auto_metrics), (full_summary, full_weights, full_metrics) = runs["auto"], runs["full"]
    assert auto_summary["checkpoint_policy"] == "none" and full_summary["checkpoint_policy"] == "full"
    assert auto_weights.keys() == full_weights.keys()
    for name in auto_weights:  # recompute changes no number
        assert torch.equal(auto_weights[name], full_weights[name]), name
    # Step 0 ran with full checkpointing in both; from step 1 on the auto run recomputes nothing.
    if "hardware_tflop" in auto_metrics[0]:
        assert auto_metrics[0]["hardware_tflop"] == full_metrics[0]["hardware_tflop"]
        assert auto_metrics[1]["hardware_tflop"] == auto_metrics[1]["model_tflop"] < full_metrics[1]["hardware_tflop"]


def hunyuan_transformer(dual: int, single: int):
    from diffusers import HunyuanVideoTransformer3DModel

    from rlhf.models.tiny_hunyuan import TINY_HUNYUAN_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**{**TINY_HUNYUAN_TRANSFORMER_CONFIG, "num_layers": dual,
                                              "num_single_layers": single})
    model.requires_grad_(False)
    add_lora(model, rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0"))
    return model


def hunyuan_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=generator), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=generator),
                encoder_attention_mask=torch.ones(1, 6, dtype=torch.long),
                pooled_projections=torch.randn(1, 8, generator=generator), guidance=torch.tensor([4000.0]))


def test_activation_probe_counts_every_block_list():
    """HunyuanVideo runs 20 dual-stream then 40 single-stream blocks: the probe must count both kinds, each at
    its own size (the single-stream blocks alone would be two thirds of the activations at full size)."""
    model = hunyuan_transformer(dual=1, single=3)
    probe = ActivationProbe(model)
    with probe.measuring() as estimate:
        model(**hunyuan_inputs()).sample.square().mean().backward()
    probe.measure()
    assert estimate.blocks == 4 and len(probe.inputs) == 2
    # What each kind of block keeps, from whole models that differ by one block of that kind.
    dual = saved_tensor_bytes(hunyuan_transformer(2, 3), **hunyuan_inputs()) - \
        saved_tensor_bytes(hunyuan_transformer(1, 3), **hunyuan_inputs())
    single = saved_tensor_bytes(hunyuan_transformer(1, 3), **hunyuan_inputs()) - \
        saved_tensor_bytes(hunyuan_transformer(1, 2), **hunyuan_inputs())
    assert dual != single
    assert abs(estimate.step_bytes("none") - (dual + 3 * single)) <= 0.1 * (dual + 3 * single)
