"""Regional torch.compile (rlhf/compiling.py): a compiled Flow-DPO step gives the eager step's loss and gradients."""

import shutil

import pytest
import torch

from dpo.config import DPOConfig
from dpo.data import PairBatch
from dpo.trainer import dpo_step
from rlhf.compiling import CompileTimer, compile_blocks
from rlhf.lora import add_lora
from rlhf.models.transformer import SD3Transformer3DModel
from rlhf.sampling import FlowSchedule, PromptEmbeds
from rlhf.training import BareRun, step_generator

# Inductor turns each compiled graph into C++ on the CPU: without a compiler torch.compile cannot run here.
pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="torch.compile's CPU backend needs a C compiler (none on PATH)")

TINY = dict(in_channels=16, out_channels=16, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=16,
            joint_attention_dim=32, pooled_projection_dim=24)
LOSS_RTOL = 1e-4  # fp32: a fused kernel may reorder sums, nothing more
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-6


def policy() -> torch.nn.Module:
    torch.manual_seed(0)
    model = SD3Transformer3DModel(**TINY)
    model.requires_grad_(False)
    add_lora(model, rank=4, alpha=4)
    with torch.no_grad():  # a non-zero adapter, so that policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.enable_gradient_checkpointing()
    return model.train()


def batch() -> PairBatch:
    generator = torch.Generator().manual_seed(1)
    return PairBatch(latents_w=torch.randn(1, 16, 2, 4, 4, generator=generator),
                     latents_l=torch.randn(1, 16, 2, 4, 4, generator=generator),
                     text=PromptEmbeds(torch.randn(1, 7, 32, generator=generator), torch.randn(1, 24, generator=generator)),
                     weights=torch.ones(1), pair_ids=["w>l"])


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
    loss, _ = dpo_step(BareRun(model), batch(), config, FlowSchedule(shift=3.0), step_generator(0, 0))
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_compiled_dpo_step_equals_eager():
    model = policy()
    eager_loss, eager_grads = loss_and_grads(model)
    assert compile_blocks(model) == TINY["num_layers"]
    with CompileTimer() as timer:
        compiled_loss, compiled_grads = loss_and_grads(model)
    assert timer.seconds > 0 and timer.compilations > 0  # it did compile, and the time was measured apart
    assert compiled_loss == pytest.approx(eager_loss, rel=LOSS_RTOL)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
    with CompileTimer() as timer:  # the same step again: nothing left to compile
        again, _ = loss_and_grads(model)
    assert timer.compilations == 0 and again == pytest.approx(compiled_loss, rel=LOSS_RTOL)
