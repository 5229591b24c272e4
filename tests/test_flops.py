"""FLOP accounting (rlhf/flops.py): torch's counter against the MM-DiT's FLOPs written out by hand, the
gradient-checkpoint recompute counted apart, the CPU attention kernels counted, the measured peak."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rlhf.flops import (
    EXTRA_FLOP_FORMULAS,
    count_flops,
    flop_counter,
    measure_matmul_flops,
    published_peak_flops,
    utilisation,
)
from rlhf.lora import add_lora
from rlhf.models.transformer import SD3Transformer3DModel

D, HEADS, J, P, C, PATCH = 32, 2, 40, 24, 16, 2  # width, heads, text features, pooled, latent channels, patch
CONFIG = dict(in_channels=C, out_channels=C, patch_size=PATCH, num_attention_heads=HEADS,
              attention_head_dim=D // HEADS, joint_attention_dim=J, pooled_projection_dim=P)
B, T, H, W, L = 2, 2, 8, 12, 5  # batch, latent frames, latent height and width, text tokens
SV = T * (H // PATCH) * (W // PATCH)  # video tokens per sample: 48


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(B, C, T, H, W, generator=generator),
                encoder_hidden_states=torch.randn(B, L, J, generator=generator),
                pooled_projections=torch.randn(B, P, generator=generator),
                timestep=torch.tensor([100.0, 900.0]))


def linear(tokens: int, fan_in: int, fan_out: int) -> int:
    """A weight (fan_in -> fan_out) applied to `tokens` rows: one multiply and one add per weight per row."""
    return 2 * tokens * fan_in * fan_out


def hand_forward_flops(layers: int) -> int:
    """Every matmul of one forward of the ContentV MM-DiT, stream by stream (elementwise ops count zero)."""
    nv, nt, s = B * SV, B * L, SV + L  # video rows, text rows, joint sequence per sample
    # 1. Patch embedding: a p x p conv from C channels is a (C p p -> D) weight on each video token.
    flops = linear(nv, C * PATCH * PATCH, D)
    # Timestep MLP (256 -> D -> D) and pooled-text MLP (P -> D -> D): once per sample. Text projection J -> D.
    flops += linear(B, 256, D) + linear(B, D, D) + linear(B, P, D) + linear(B, D, D)
    flops += linear(nt, J, D)
    for index in range(layers):
        last = index == layers - 1  # the last block's text stream stops after attention (context_pre_only)
        # 2. AdaLN modulation from the conditioning vector: video D -> 6D; text D -> 6D (last block: D -> 2D).
        flops += linear(B, D, 6 * D) + linear(B, D, 2 * D if last else 6 * D)
        # 3. Q, K, V: the image-stream weights see only video tokens, the context-stream weights only text tokens.
        flops += 3 * linear(nv, D, D) + 3 * linear(nt, D, D)
        # 4. Joint attention over video + text tokens, per head: QK^T (s x d) @ (d x s), then AV (s x s) @ (s x d).
        flops += B * HEADS * (2 * s * (D // HEADS) * s + 2 * s * s * (D // HEADS))
        # 5. Output projections: video always, text except in the last block.
        flops += linear(nv, D, D) + (0 if last else linear(nt, D, D))
        # 6. Feed-forward D -> 4D -> D: video always, text except in the last block.
        flops += linear(nv, D, 4 * D) + linear(nv, 4 * D, D)
        flops += 0 if last else linear(nt, D, 4 * D) + linear(nt, 4 * D, D)
    # 7. Output AdaLN (D -> 2D per sample) and the projection to p x p x C values per video token.
    return flops + linear(B, D, 2 * D) + linear(nv, D, PATCH * PATCH * C)


@pytest.mark.parametrize("layers", [1, 2])
def test_counter_equals_hand_written_forward_flops(layers):
    model = SD3Transformer3DModel(num_layers=layers, **CONFIG).eval()
    with torch.no_grad(), count_flops(model) as flops:
        model(**inputs())
    assert flops.hardware == hand_forward_flops(layers)
    assert flops.recompute == 0 and flops.model == flops.hardware


def test_cpu_attention_kernels_are_counted():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=generator, requires_grad=True) for _ in range(3))
    with flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    forward = 2 * (2 * 2 * 3 * 40 * 40 * 8)  # QK^T and AV
    assert counter.get_total_flops() == forward
    with flop_counter() as counter:
        out.sum().backward()
    # torch's flash-attention backward formula: QK^T again (the kernel recomputes the scores), dV, dP, dQ, dK.
    assert counter.get_total_flops() == 5 * forward // 2


def test_counting_leaves_every_number_as_it_is():
    """A counted step must equal an uncounted one bit for bit (a resumed run counts a different step than the
    straight run, and both must end with the same weights), and count what torch's own counter counts."""
    torch.manual_seed(0)
    model = SD3Transformer3DModel(num_layers=2, **CONFIG)
    model.requires_grad_(False)
    add_lora(model, rank=4, alpha=4)
    conv = torch.nn.Conv3d(C, 3, 3, padding=1)  # a VAE-like tail: SiLU then a 3-D convolution

    def step(counter=None) -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        with counter or contextlib.nullcontext():
            out = model(**inputs()).sample
            F.silu(conv(F.silu(out.contiguous(memory_format=torch.channels_last_3d)))).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, counter.get_total_flops() if counter else 0

    plain, _ = step()
    counted, flops = step(flop_counter())
    assert all(torch.equal(plain[n], counted[n]) for n in plain)
    _, torch_flops = step(FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS))
    assert flops == torch_flops > 0


def test_checkpoint_recompute_is_counted_apart():
    torch.manual_seed(0)
    model = SD3Transformer3DModel(num_layers=2, **CONFIG)
    model.requires_grad_(False)
    add_lora(model, rank=4, alpha=4)
    model.enable_gradient_checkpointing()
    model.train()
    checkpoint_func = model._gradient_checkpointing_func

    def step() -> None:
        model(**inputs()).sample.square().mean().backward()

    with count_flops(model) as checkpointed:
        step()
    assert model._gradient_checkpointing_func is checkpoint_func  # restored
    model.disable_gradient_checkpointing()
    with count_flops(model) as plain:
        step()
    assert plain.recompute == 0
    assert checkpointed.recompute > 0
    # Model FLOPs of the checkpointed step == everything the same step runs without checkpointing.
    assert checkpointed.model == plain.hardware
    # The recompute is one more forward of the blocks (LoRA included), stopped early once every tensor the backward
    # needs is back (torch skips the trailing projections): most of the blocks' matmuls, less than a whole forward.
    blocks = hand_forward_flops(2) - hand_forward_flops(0)
    assert blocks // 2 < checkpointed.recompute < hand_forward_flops(2) + blocks // 2


def test_peak_and_utilisation():
    cpu = torch.device("cpu")
    assert published_peak_flops(cpu, torch.float32) is None  # measured on the CPU, never looked up
    rate = measure_matmul_flops(cpu, torch.float32, (64, 64, 64), seconds=0.05)
    assert 1e6 < rate < 1e15
    assert utilisation(2e12, 4.0, 1e12) == pytest.approx(0.5)


def test_every_training_step_logs_its_flops_and_utilisation(tiny_pairs, tmp_path, capsys):
    """metrics.jsonl carries each step's TFLOP (the same for every DPO step, with checkpoint recompute only in
    the hardware figure) and MFU / HFU = TFLOP / step_seconds / peak."""
    from tests.conftest import call_cli
    from tests.test_dpo_trainer import metrics, train_args

    rows = {}
    for checkpointing in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        out = tmp_path / checkpointing
        code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "3", "--save-every", "0",
                                                    checkpointing))
        assert code == 0, err
        rows[checkpointing] = metrics(out)
    plain, checkpointed = rows["--no-gradient-checkpointing"], rows["--gradient-checkpointing"]
    assert len({r["model_tflop"] for r in plain}) == 1  # counted once, the same work every step
    assert all(r["hardware_tflop"] == r["model_tflop"] > 0 for r in plain)
    # Checkpointing recomputes the forward of the policy's blocks: more hardware FLOPs, the same model FLOPs.
    assert checkpointed[0]["model_tflop"] == pytest.approx(plain[0]["model_tflop"], rel=1e-9)
    assert checkpointed[0]["hardware_tflop"] > 1.1 * checkpointed[0]["model_tflop"]
    for row in plain + checkpointed:
        peak = row["model_tflop"] * 1e12 / row["step_seconds"] / row["mfu"]
        assert row["hfu"] == pytest.approx(row["hardware_tflop"] * 1e12 / row["step_seconds"] / peak, rel=1e-6)
        assert 0 < row["mfu"] <= row["hfu"]


def test_utilisation_is_not_counted_under_compile_or_when_off(tiny_pairs, tmp_path, capsys):
    from tests.conftest import call_cli
    from tests.test_dpo_trainer import metrics, train_args

    out = tmp_path / "off"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "2", "--save-every", "0",
                                                "--no-log-utilisation"))
    assert code == 0, err
    assert not {"model_tflop", "mfu", "hfu"} & set(metrics(out)[-1])


def test_a_quantised_base_counts_the_same_flops(tiny_pairs, tmp_path, capsys):
    """Weight-only quantisation changes how weights are stored, not the matmuls a step runs."""
    pytest.importorskip("torchao")
    from tests.conftest import call_cli
    from tests.test_dpo_trainer import metrics, train_args

    flops = {}
    for mode in ("none", "int8_weight_only"):
        out = tmp_path / mode
        code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "1", "--save-every", "0",
                                                    "--quantize", mode))
        assert code == 0, err
        flops[mode] = metrics(out)[0]["model_tflop"]
    assert flops["int8_weight_only"] == pytest.approx(flops["none"], rel=1e-9)
