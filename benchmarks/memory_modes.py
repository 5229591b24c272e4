"""Memory modes of the frozen transformer (`quantize`, `group_offload`): what a Flow-DPO step on ContentV-8B needs
per mode, and what the modes cost and save, measured on the CPU.

Part 1, arithmetic (no weights: the ContentV-8B shape built on the meta device, as benchmarks/full_size_step.py
builds it): for one Flow-DPO step (one pair: winner and loser in one policy forward with gradients + one
reference forward without) at --height x --width and --frames, the exact bytes of
- weights: every parameter, the blocks' linear weights in the mode's storage (data + scales, counted by quantising
  a CPU tensor of each distinct shape with the same torchao call `quantize` uses);
- LoRA (fp32), its gradients, AdamW's two moments (fp32);
- checkpointed activations: the tensors a gradient-checkpointed policy forward keeps for the backward pass (every
  block's inputs, plus what autograd saves outside the blocks: embedders, output head, loss), recorded from the
  real `dpo_step` on the meta model;
- the backward working set of one block: what its recomputed forward saves (attention counted as flash / memory-
  efficient SDPA keeps it: q, k, v, output and the log-sum-exp, not the T x T scores), plus, for int8 / float8,
  the block's dequantised weights that the matmuls save.
Their sum is compared with one 24 GB card (24 GiB, less a 1.5 GiB reserve for the CUDA context and allocator
fragmentation). The same arithmetic for the mid-size CPU model is printed beside its measured peak tensor bytes.
Group offloading is for sampling only (README "Using the real ContentV-8B"): for generate the table gives the
weight bytes resident on the device with and without it.

Part 2, measured on the CPU (the modes one after another, the peak RSS reset before each) on a mid-size model built in code (random weights,
--mid-layers x --mid-heads x 64): peak RSS, wall and CPU time of one generate (--mid-steps Euler steps with CFG +
decode with the shapes world's VAE) and of one Flow-DPO optimiser step (after a warm-up step), the step's peak
tensor bytes (torch profiler), and the quality cost against the unquantised model: the PSNR of the decoded
frames, and the cosine between the LoRA gradients of the same DPO step. The same quality figures on the shipped
shapes-world model (trained weights) come from tests/test_lowmem.py's functions.

    python benchmarks/memory_modes.py [--record]
    python benchmarks/memory_modes.py --only arithmetic          # seconds; no CPU timing
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402

MODES = ("none", "int8_weight_only", "float8_weight_only", "nf4")
GIB = 2**30
CARD_BYTES, RESERVE_BYTES = 24 * GIB, int(1.5 * GIB)
TEXT_TOKENS, JOINT_DIM, POOLED_DIM = 77 + 256, 4096, 2048


# ---- shared pieces -------------------------------------------------------------------------------------------
def build_transformer(layers: int, heads: int, head_dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    """ContentV's transformer class at the given size, built in `dtype` on `device` (random N(0, 0.02) weights)."""
    from rlhf.models.transformer import SD3Transformer3DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of the weights
    try:
        with torch.device(device):
            model = SD3Transformer3DModel(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim)
    finally:
        torch.set_default_dtype(previous)
    if device != "meta":
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(std=0.02)
    return model.requires_grad_(False)


def dpo_batch(shape: tuple[int, ...], text_tokens: int, seed: int = 0):
    from dpo.data import PairBatch
    from rlhf.sampling import PromptEmbeds

    g = torch.Generator().manual_seed(seed)
    return PairBatch(latents_w=torch.randn(1, *shape, generator=g), latents_l=torch.randn(1, *shape, generator=g),
                     text=PromptEmbeds(torch.randn(1, text_tokens, JOINT_DIM, generator=g),
                                       torch.randn(1, POOLED_DIM, generator=g)),
                     weights=torch.ones(1), pair_ids=["w>l"])


def tensor_set_bytes(tensors: dict[int, torch.Tensor]) -> int:
    from rlhf.lowmem import tensor_bytes

    return sum(tensor_bytes(t) for t in tensors.values())


# ---- part 1: arithmetic on the meta device ------------------------------------------------------------------
@functools.cache
def quantized_bytes(shape: tuple[int, int], mode: str) -> int:
    """Bytes of one bf16 linear weight of `shape` stored in `mode` (quantised for real on the CPU, then counted)."""
    from rlhf.lowmem import nf4_fits, quantize_transformer, tensor_bytes

    if mode == "none":
        return shape[0] * shape[1] * 2
    holder = torch.nn.Module()
    holder.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(shape[1], shape[0], bias=False,
                                                                     dtype=torch.bfloat16)])
    if mode == "nf4" and not nf4_fits(holder.transformer_blocks[0].weight):
        return shape[0] * shape[1] * 2
    quantize_transformer(holder, mode)
    return tensor_bytes(holder.transformer_blocks[0].weight)


def weight_bytes(model: torch.nn.Module, mode: str) -> tuple[int, int, int]:
    """(all weights, the largest block's, all blocks') in `mode`, bf16 elsewhere (the checkpoint's dtype)."""
    total, blocks = 0, {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if name.startswith("transformer_blocks.") and type(module) is torch.nn.Linear and pname == "weight":
                size = quantized_bytes(tuple(param.shape), mode)
            else:
                size = param.numel() * 2
            total += size
            if name.startswith("transformer_blocks."):
                index = name.split(".")[1]
                blocks[index] = blocks.get(index, 0) + size
    return total, max(blocks.values()), sum(blocks.values())


class SavedTensors:
    """Tensors autograd saves for the backward pass while active (outside checkpointed regions), by identity."""

    def __init__(self):
        self.tensors: dict[int, torch.Tensor] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors[id(tensor)] = tensor
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def flash_equivalent_bytes(saved: SavedTensors, tokens: int) -> tuple[int, int]:
    """Saved bytes with any (.., T, T) attention-score tensor replaced by the fp32 log-sum-exp flash SDPA keeps
    (the meta device may run the math SDPA); and how many score tensors were replaced."""
    total, replaced = 0, 0
    for tensor in saved.tensors.values():
        if tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] == tokens:
            total += math.prod(tensor.shape[:-1]) * 4  # (B, H, T) fp32
            replaced += 1
        else:
            total += tensor.numel() * tensor.element_size()
    return total, replaced


def activation_bytes(model: torch.nn.Module, latent: tuple[int, ...], text_tokens: int) -> dict:
    """Checkpointed activations of one DPO step's policy forward, and one block's recompute (meta tensors)."""
    from dpo.config import DPOConfig
    from dpo.trainer import dpo_step
    from rlhf.sampling import FlowSchedule
    from rlhf.training import BareRun, step_generator

    device = torch.device("meta")
    block_inputs: dict[int, torch.Tensor] = {}

    def keep_inputs(_module, args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                block_inputs[id(arg)] = arg

    handles = [block.register_forward_pre_hook(keep_inputs) for block in model.transformer_blocks]
    outside = SavedTensors()
    model.enable_gradient_checkpointing()
    config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
    batch = dpo_batch(latent, text_tokens)
    with outside.hooks():
        dpo_step(BareRun(model, device), batch, config, FlowSchedule(shift=3.0), step_generator(0, 0))
    for handle in handles:
        handle.remove()
    checkpointed = tensor_set_bytes(block_inputs) + tensor_set_bytes(
        {k: t for k, t in outside.tensors.items() if k not in block_inputs})

    # One block's recomputed forward (what its backward holds), with the inputs the policy forward gave it.
    block = model.transformer_blocks[0]
    tokens_video = math.prod(latent[1:]) // 4  # (T, H/2, W/2) tokens
    hidden = torch.empty(2, tokens_video, model.inner_dim if hasattr(model, "inner_dim") else
                         model.config.num_attention_heads * model.config.attention_head_dim,
                         device=device, dtype=torch.bfloat16, requires_grad=True)
    context = torch.empty(2, text_tokens, hidden.shape[-1], device=device, dtype=torch.bfloat16, requires_grad=True)
    temb = torch.empty(2, hidden.shape[-1], device=device, dtype=torch.bfloat16)
    inside = SavedTensors()
    with inside.hooks():
        block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    recompute, replaced = flash_equivalent_bytes(inside, tokens_video + text_tokens)
    # Its backward also holds the gradients arriving at the block's outputs and leaving to its inputs.
    gradients = 2 * (hidden.numel() + context.numel()) * hidden.element_size()
    return {"checkpointed": checkpointed, "block_recompute": recompute + gradients, "tokens": tokens_video + text_tokens,
            "attention_score_tensors_replaced": replaced}


def lora_bytes(model: torch.nn.Module, rank: int) -> int:
    from rlhf.lora import add_lora

    add_lora(model, rank=rank, alpha=rank)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return trainable * 4  # fp32


def arithmetic(layers: int, heads: int, head_dim: int, frames: int, height: int, width: int, rank: int,
               text_tokens: int = TEXT_TOKENS) -> dict:
    """Bytes of one Flow-DPO step per mode for the given transformer shape (no weights are allocated)."""
    from rlhf.sampling import latent_shape

    model = build_transformer(layers, heads, head_dim, "meta", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    per_mode_weights = {mode: weight_bytes(model, mode) for mode in MODES}
    block_linear_bf16 = sum(m.weight.numel() * 2 for n, m in model.named_modules()
                            if n.startswith("transformer_blocks.0.") and type(m) is torch.nn.Linear)
    lora = lora_bytes(model, rank)
    for name, param in model.named_parameters():  # LoRA computes in bf16 under autocast: measure it so
        if "lora_" in name:
            param.data = param.data.to(torch.bfloat16)
            param.requires_grad_(True)
    latent = latent_shape(frames, height, width)
    acts = activation_bytes(model, latent, text_tokens)
    rows = {}
    for mode in MODES:
        weights, block, blocks = per_mode_weights[mode]
        dequantised = block_linear_bf16 if mode in ("int8_weight_only", "float8_weight_only") else 0
        parts = {"weights": weights, "lora_fp32": lora, "lora_grads": lora, "adamw_moments": 2 * lora,
                 "checkpointed_activations": acts["checkpointed"],
                 "block_backward": acts["block_recompute"] + dequantised}
        total = sum(parts.values())
        rows[mode] = {**{k: v for k, v in parts.items()}, "total": total,
                      "total_gib": round(total / GIB, 2), "fits_24gb": total <= CARD_BYTES - RESERVE_BYTES,
                      "generate_weights_on_device_gib": round(weights / GIB, 2),
                      # group offload: the non-block modules + the running block + the one being prefetched
                      "generate_weights_on_device_group_offload_gib": round(
                          (weights - blocks + 2 * block) / GIB, 3)}
    return {"shape": f"{layers} layers x {heads} heads x {head_dim}", "parameters": params,
            "video": f"{frames} frames {height}x{width}, latent {list(latent)}, {acts['tokens']} tokens",
            "lora_rank": rank, "attention": f"flash-SDPA saves ({acts['attention_score_tensors_replaced']} "
            "T x T score tensors of the meta run replaced by their log-sum-exp)", "modes": rows}


# ---- part 2: measured on the CPU -----------------------------------------------------------------------------
def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def settle() -> int:
    """Free what can be freed, return it to the OS, reset the peak RSS; the RSS now."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    return rss_bytes("VmRSS")


def measure_mode(task: str, mode: str, args, out: Path) -> dict:
    """One task (generate or dpo) in one mode, in this process. Tensors for the quality figures go to `out`."""
    from benchmarks.dpo_step import peak_tensor_bytes
    from dpo.config import DPOConfig
    from dpo.trainer import dpo_step
    from rlhf.lora import add_lora
    from rlhf.lowmem import parameter_bytes, quantize_transformer
    from rlhf.sampling import FlowSchedule, PromptEmbeds, denoise, initial_noise, latent_shape
    from rlhf.training import BareRun, step_generator

    torch.set_num_threads(args.threads)
    model = build_transformer(args.mid_layers, args.mid_heads, 64, "cpu", torch.bfloat16)
    quantize_transformer(model, mode)
    shape = latent_shape(args.mid_frames, args.mid_size, args.mid_size)
    result = {"weights_mib": round(parameter_bytes(model) / 2**20, 1)}
    if task == "generate":
        from diffusers import AutoencoderKLWan

        from rlhf.video import decode_latents
        from rlhf.world import MODEL_DIR

        vae = AutoencoderKLWan.from_pretrained(MODEL_DIR, subfolder="vae", local_files_only=True).eval()
        g = torch.Generator().manual_seed(1)
        cond = PromptEmbeds(torch.randn(1, args.mid_text, JOINT_DIM, generator=g), torch.randn(1, POOLED_DIM,
                                                                                              generator=g))
        uncond = PromptEmbeds(torch.zeros(1, args.mid_text, JOINT_DIM), torch.zeros(1, POOLED_DIM))
        sigmas = FlowSchedule(shift=3.0).sigmas(args.mid_steps)
        before = settle()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            latents = denoise(model, initial_noise(shape, [0]), sigmas, cond.to("cpu", torch.bfloat16),
                              uncond.to("cpu", torch.bfloat16), guidance_scale=4.0, batch_cfg=True,
                              num_train_timesteps=1000)
            video = decode_latents(vae, latents.float())
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        torch.save(video, out)
    else:
        add_lora(model, rank=args.mid_rank, alpha=args.mid_rank)
        g = torch.Generator().manual_seed(2)
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                if "lora_B" in name:  # non-zero, the same in every mode: lora_A gets gradients too
                    param.data = torch.randn(param.shape, generator=g) * 0.02
                param.data = param.data.float()
                param.requires_grad_(True)
        model.enable_gradient_checkpointing()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
        run = BareRun(model)
        batch = dpo_batch(shape, args.mid_text)

        def step(index: int, keep_grads: bool = False) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate's autocast wraps the trainer's step
                loss, _ = dpo_step(run, batch, config, FlowSchedule(shift=3.0), step_generator(0, index))
            loss.backward()
            if keep_grads:
                torch.save(torch.cat([p.grad.flatten() for p in params]), out)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(0, keep_grads=True)  # warm-up (optimiser state allocated); its gradients are the quality figure
        before = settle()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(1)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        peak_after_step = rss_bytes("VmHWM")
        result["step_peak_tensor_mib"] = round(peak_tensor_bytes(lambda: step(2)) / 2**20, 1)
        result.update(peak_rss_mib=round(peak_after_step / 2**20, 1),
                      peak_rss_above_start_mib=round((peak_after_step - before) / 2**20, 1),
                      rss_before_mib=round(before / 2**20, 1), seconds=round(seconds, 2),
                      cpu_seconds=round(cpu_seconds, 2))
        return result
    peak = rss_bytes("VmHWM")
    result.update(peak_rss_mib=round(peak / 2**20, 1), peak_rss_above_start_mib=round((peak - before) / 2**20, 1),
                  rss_before_mib=round(before / 2**20, 1), seconds=round(seconds, 2),
                  cpu_seconds=round(cpu_seconds, 2))
    return result


def measured(args) -> dict:
    results: dict = {"generate": {}, "dpo": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("generate", "dpo"):
            for mode in MODES:
                # One process for all: the peak RSS is reset (/proc/self/clear_refs) before each measured run, after
                # the previous mode's model is freed and returned to the OS (malloc_trim).
                results[task][mode] = measure_mode(task, mode, args, Path(tmp) / f"{task}-{mode}.pt")
            reference = torch.load(Path(tmp) / f"{task}-none.pt")
            for mode in MODES[1:]:
                other = torch.load(Path(tmp) / f"{task}-{mode}.pt")
                if task == "generate":
                    from rlhf.lowmem import video_psnr

                    results[task][mode]["psnr_db_vs_none"] = round(video_psnr(reference, other), 2)
                else:
                    cosine = torch.nn.functional.cosine_similarity(reference.double(), other.double(), dim=0)
                    results[task][mode]["grad_cosine_vs_none"] = round(cosine.item(), 5)
    return results


def world_quality() -> dict:
    """PSNR and DPO-gradient cosine on the shipped shapes-world model (trained weights), via the tests' helpers."""
    from rlhf.lowmem import video_psnr
    from rlhf.world import MODEL_DIR
    from tests.test_lowmem import dpo_lora_gradients, world_video

    reference = world_video()[1]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        full = dpo_lora_gradients(MODEL_DIR, "none", Path(tmp) / "none")
        for mode in MODES[1:]:
            grads = dpo_lora_gradients(MODEL_DIR, mode, Path(tmp) / mode)
            rows[mode] = {"psnr_db_vs_none": round(video_psnr(reference, world_video(mode)[1]), 2),
                          "grad_cosine_vs_none": round(torch.nn.functional.cosine_similarity(
                              full, grads, dim=0).item(), 5)}
    return rows


def table(arith: dict) -> str:
    lines = ["| mode | weights | LoRA + grads + AdamW | checkpointed acts | block backward | total | fits 24 GB |",
             "|---|---|---|---|---|---|---|"]
    for mode, row in arith["modes"].items():
        lora = row["lora_fp32"] + row["lora_grads"] + row["adamw_moments"]
        lines.append(f"| {mode} | {row['weights'] / GIB:.2f} GiB | {lora / GIB:.2f} GiB | "
                     f"{row['checkpointed_activations'] / GIB:.2f} GiB | {row['block_backward'] / GIB:.2f} GiB | "
                     f"{row['total'] / GIB:.2f} GiB | {'yes' if row['fits_24gb'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=432)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--only", choices=["arithmetic", "measured"])
    parser.add_argument("--mid-layers", type=int, default=6)
    parser.add_argument("--mid-heads", type=int, default=8)
    parser.add_argument("--mid-frames", type=int, default=9)
    parser.add_argument("--mid-size", type=int, default=128)
    parser.add_argument("--mid-text", type=int, default=32, help="text tokens of the mid-size model")
    parser.add_argument("--mid-steps", type=int, default=4, help="Euler steps of the measured generate")
    parser.add_argument("--mid-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    result: dict = {"benchmark": "memory_modes", "cpu_load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    if args.only != "measured":
        result["contentv_8b_dpo_step"] = arithmetic(38, 38, 64, args.frames, args.height, args.width, args.lora_rank)
        result["budget"] = f"24 GiB card less {RESERVE_BYTES / GIB:g} GiB reserve (CUDA context, fragmentation)"
    if args.only != "arithmetic":
        mid = arithmetic(args.mid_layers, args.mid_heads, 64, args.mid_frames, args.mid_size, args.mid_size,
                         args.mid_rank, text_tokens=args.mid_text)
        result["mid_size_arithmetic"] = mid
        result["mid_size_measured_cpu"] = measured(args)
        result["world_model_quality"] = world_quality()
        load = os.getloadavg()
        result["cpu_load_average_1_5_15"] = [round(x, 2) for x in load]
        result["timing_note"] = ("seconds: wall time; cpu_seconds: this process's CPU time (one thread), the "
                                 "figure to compare when other processes share the 2 cores (see the load average)")
    print(json.dumps(result, indent=2))
    if "contentv_8b_dpo_step" in result:
        print(table(result["contentv_8b_dpo_step"]))
    if args.record:
        text = json.dumps(result, indent=2)
        if "contentv_8b_dpo_step" in result:
            text = table(result["contentv_8b_dpo_step"]) + "\n\n" + text
        record("memory_modes", None, text=text)


if __name__ == "__main__":
    main()
