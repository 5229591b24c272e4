"""Where a Flow-DPO step spends its time: torch.profiler self time of every op, summed by category.

Same model and step as `benchmarks/full_size_step.py` (its `build` and `make_dpo`), at the CPU mid-size by
default. Categories of the leaf ops (self time, so nothing is counted twice):
- attention: the fused scaled-dot-product-attention kernels, forward and backward;
- base matmuls: matmuls of the frozen weights (every `mm`/`addmm`/`bmm` with no dimension equal to the LoRA rank);
- LoRA matmuls: matmuls with a dimension equal to the LoRA rank (the A and B projections and their gradients);
- norms / modulation / activations: layer and RMS norms, AdaLN scale-shift, GELU/SiLU, residual adds (elementwise);
- data movement: copies, concatenations, dtype and layout changes, fills;
- optimiser: AdamW's update of the LoRA weights;
- other: everything else (convolutions, reductions, loss arithmetic).

    OMP_NUM_THREADS=2 python benchmarks/profile_step.py --threads 2 [--record]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.full_size_step import build, build_vae, make_dpo  # noqa: E402
from benchmarks.results import record  # noqa: E402
from rlhf import devices  # noqa: E402

ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
NORMS_ELEMENTWISE = {
    "aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::_fused_rms_norm",
    "aten::_fused_rms_norm_backward", "aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward",
    "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::addcmul", "aten::sub", "aten::rsqrt",
    "aten::pow", "aten::mean", "aten::div", "aten::neg", "aten::tanh", "aten::tanh_backward", "aten::where",
}
DATA_MOVEMENT = {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to",
                 "aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::empty_like", "aten::index",
                 "aten::_unsafe_view", "aten::reshape", "aten::stack", "aten::split", "aten::slice_backward",
                 "aten::new_zeros"}


def category(name: str, shapes: list, rank: int) -> str:
    if any(key in name for key in ATTENTION):
        return "attention"
    if name in MATMULS:
        dims = {d for shape in shapes if isinstance(shape, list) for d in shape}
        return "LoRA matmuls" if rank in dims else "base matmuls"
    if name.startswith("aten::_foreach") or "adam" in name.lower():
        return "optimiser"
    if name in NORMS_ELEMENTWISE:
        return "norms / modulation / activations"
    if name in DATA_MOVEMENT:
        return "data movement"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--top", type=int, default=12, help="ops listed below the category table")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--checkpoint-policy", choices=("full", "selective"), default="full",
                        help="gradient checkpointing of the blocks: full (the trainers' default) or selective")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    args.full_vae = False  # the DPO step has no VAE
    args.gradient_checkpointing = True  # the trainers' default

    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.resolve_device(args.device)
    dtype = devices.parse_dtype(args.dtype)
    model = build(args, device, dtype)
    step, _ = make_dpo(model, build_vae(args, device), args.frames, args, device, dtype)
    step(0)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for index in range(1, args.steps + 1):
            step(index)
        devices.synchronize(device)

    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[tuple[str, str], float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        self_us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        kind = category(event.key, event.input_shapes, args.lora_rank)
        by_category[kind] += self_us
        by_op[(kind, event.key)] += self_us
    total = sum(by_category.values())
    lines = [f"Flow-DPO step, {args.layers} layers, {args.heads} heads x {args.head_dim}, {args.frames}x{args.height}x"
             f"{args.width}, LoRA r{args.lora_rank}, {args.dtype}, {device.type}"
             + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
             + f"; profiler self time over {args.steps} steps: {total / 1e6 / args.steps:.3f} s/step", "",
             "| category | s/step | share |", "|---|---|---|"]
    for kind, us in sorted(by_category.items(), key=lambda item: -item[1]):
        lines.append(f"| {kind} | {us / 1e6 / args.steps:.4f} | {us / total:.1%} |")
    lines += ["", "| op | category | s/step | share |", "|---|---|---|---|"]
    for (kind, op), us in sorted(by_op.items(), key=lambda item: -item[1])[: args.top]:
        lines.append(f"| {op} | {kind} | {us / 1e6 / args.steps:.4f} | {us / total:.1%} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("profile_step", None, text=table)


if __name__ == "__main__":
    main()
