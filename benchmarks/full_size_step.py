"""Full-size training steps: the ContentV-8B-shaped transformer, random bf16 weights, LoRA r64.

- One Flow-DPO step (one pair: winner and loser in one policy forward with gradients + one reference forward)
  at 432x768 with the largest frame count that fits (tried from --frames, largest first).
- One reward-gradient step (K=1: --rg-steps denoising steps, the last with gradients; the first frame
  decoded by a full-size Wan VAE with gradients; a differentiable brightness reward) at the same size.
Both with gradient checkpointing. Prints peak device memory, seconds per step and model FLOP utilisation
(MFU: model FLOPs of the step / (seconds x peak FLOP/s); recomputation by checkpointing is not counted).

    python benchmarks/full_size_step.py --device cuda [--record]            # on a lent GPU
    python benchmarks/full_size_step.py --device cpu --layers 2 --heads 2 --head-dim 32 \\
        --height 64 --width 64 --frames 5 --lora-rank 4 --dtype fp32 --no-full-vae --rg-steps 2   # CPU test

Text conditioning is random (333 tokens x 4096, pooled 2048), as the trainer reads cached embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import record  # noqa: E402
from dpo.config import DPOConfig  # noqa: E402
from dpo.data import PairBatch  # noqa: E402
from dpo.trainer import dpo_step  # noqa: E402
from rlhf import devices  # noqa: E402
from rlhf.lora import add_lora  # noqa: E402
from rlhf.models.transformer import SD3Transformer3DModel  # noqa: E402
from rlhf.sampling import FlowSchedule, PromptEmbeds, latent_shape  # noqa: E402
from rlhf.training import step_generator  # noqa: E402

# Dense bf16 peak FLOP/s of known accelerators (SXM parts), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "910B": 376e12}
TEXT_TOKENS = 77 + 256


class BenchRun:
    """The parts of `rlhf.training.TrainingRun` the step functions use, around a model built here."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.policy = self.unwrapped = model
        self.device = device
        self.accelerator = SimpleNamespace(autocast=lambda: devices.autocast(device, dtype))

    @contextlib.contextmanager
    def reference_mode(self):
        self.unwrapped.disable_adapters()
        try:
            yield self.unwrapped
        finally:
            self.unwrapped.enable_adapters()


def transformer_flops(params: int, layers: int, width: int, tokens: int, batch: int) -> float:
    """Forward FLOPs: 2 per parameter per token, plus attention scores and values (4 * tokens^2 * width)."""
    return batch * (2 * params * tokens + layers * 4 * tokens**2 * width)


def build(args, device: torch.device, dtype: torch.dtype) -> SD3Transformer3DModel:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the storage dtype: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = SD3Transformer3DModel(num_layers=args.layers, num_attention_heads=args.heads,
                                          attention_head_dim=args.head_dim)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.02)
    model.requires_grad_(False)
    add_lora(model, rank=args.lora_rank, alpha=args.lora_rank)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    model.enable_gradient_checkpointing()
    return model.train()


def dpo_step_at(model, frames: int, args, device, dtype) -> dict:
    shape = latent_shape(frames, args.height, args.width)
    generator = torch.Generator().manual_seed(0)
    batch = PairBatch(
        latents_w=torch.randn(1, *shape, generator=generator), latents_l=torch.randn(1, *shape, generator=generator),
        text=PromptEmbeds(torch.randn(1, TEXT_TOKENS, 4096, generator=generator),
                          torch.randn(1, 2048, generator=generator)),
        weights=torch.ones(1), pair_ids=["w>l"],
    )
    config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
    run = BenchRun(model, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(index: int) -> None:
        with devices.autocast(device, dtype):  # as accelerate's autocast wraps the trainer's step
            loss, _ = dpo_step(run, batch, config, FlowSchedule(shift=3.0), step_generator(0, index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocator, kernels)
    devices.synchronize(device)
    devices.reset_peak_memory(device)
    start = time.perf_counter()
    for index in range(1, args.steps + 1):
        step(index)
    devices.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    video_tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    tokens = video_tokens + TEXT_TOKENS
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    forward = transformer_flops(base_params, args.layers, args.heads * args.head_dim, tokens, batch=2)
    flops = 3 * forward + forward  # policy forward + backward (3x), reference forward (1x)
    peak = devices.peak_memory_bytes(device)
    return {"frames": frames, "latent_shape": list(shape), "tokens": tokens, "seconds_per_step": round(seconds, 3),
            "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None, "model_tflops": float(f"{flops / 1e12:.4g}"),
            "achieved_tflops_per_s": float(f"{flops / seconds / 1e12:.4g}")}


def reward_gradient_step_at(model, frames: int, args, device, dtype) -> dict:
    from diffusers import AutoencoderKLWan

    from dpo.reward_gradient import FrozenParts, reward_gradient_step
    from dpo.reward_gradient_config import RewardGradientConfig
    from rewards.build import build_scorers

    generator = torch.Generator().manual_seed(0)
    vae_kwargs = {} if args.full_vae else {"base_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
    with torch.device(device):
        vae = AutoencoderKLWan(**vae_kwargs).requires_grad_(False)  # the real Wan 2.1 VAE architecture
    text = PromptEmbeds(torch.randn(1, TEXT_TOKENS, 4096, generator=generator), torch.randn(1, 2048, generator=generator))
    parts = FrozenParts(
        schedule=FlowSchedule(shift=3.0), vae=vae, reward_device=device, prompts=["a prompt"], text=text,
        negative=PromptEmbeds(torch.randn(1, TEXT_TOKENS, 4096), torch.randn(1, 2048)),
        scorers=build_scorers({"scorers": {"brightness": {"weight": 1.0}}, "device": device.type}),
    )
    config = RewardGradientConfig(model="-", prompts="-", rewards="-", output_dir="-", frames=frames,
                                  height=args.height, width=args.width, steps=args.rg_steps, grad_steps=1,
                                  decode_frames="first")
    run = BenchRun(model, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(index: int) -> None:
        loss, _ = reward_gradient_step(run, parts, [0], config, step_generator(0, index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    devices.synchronize(device)
    devices.reset_peak_memory(device)
    start = time.perf_counter()
    step(1)
    devices.synchronize(device)
    seconds = time.perf_counter() - start
    shape = latent_shape(frames, args.height, args.width)
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2) + TEXT_TOKENS
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    forward = transformer_flops(base_params, args.layers, args.heads * args.head_dim, tokens, batch=2)  # CFG
    flops = (args.rg_steps - 1) * forward + 3 * forward  # no-grad steps + the last step forward/backward
    peak = devices.peak_memory_bytes(device)
    return {"frames": frames, "denoising_steps": args.rg_steps, "grad_steps": 1, "decoded_frames": 1,
            "full_vae": args.full_vae, "seconds_per_step": round(seconds, 3),
            "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
            "achieved_tflops_per_s": float(f"{flops / seconds / 1e12:.4g}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--layers", type=int, default=38)
    parser.add_argument("--heads", type=int, default=38)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--height", type=int, default=432)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--frames", type=int, nargs="+", default=[125, 97, 73, 49, 25, 9])
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rg-steps", type=int, default=10, help="denoising steps of the reward-gradient step")
    parser.add_argument("--full-vae", action=argparse.BooleanOptionalAction, default=True,
                        help="full-size Wan VAE (default) or a tiny one (--no-full-vae, for CPU tests)")
    parser.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOP/s (default: by device name)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    device = devices.resolve_device(args.device)
    dtype = devices.parse_dtype(args.dtype)
    model = build(args, device, dtype)
    result = {"benchmark": "full_size_step", "device": str(device), "layers": args.layers,
              "heads": args.heads, "head_dim": args.head_dim, "lora_rank": args.lora_rank,
              "size": f"{args.height}x{args.width}", "dpo": None, "reward_gradient": None, "tried": []}
    for name, step_at in (("dpo", dpo_step_at), ("reward_gradient", reward_gradient_step_at)):
        for frames in sorted(args.frames, reverse=True):  # the largest frame count that fits
            try:
                result[name] = step_at(model, frames, args, device, dtype)
                break
            except torch.OutOfMemoryError:
                result["tried"].append({"frames": frames, "fits": False, "step": name})
                devices.empty_cache(device)
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak_flops is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_flops = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        result["device"] = name
    for step in ("dpo", "reward_gradient"):
        if result[step] and peak_flops:
            result[step]["mfu"] = round(result[step]["achieved_tflops_per_s"] * 1e12 / peak_flops, 3)
    print(json.dumps(result, indent=2))
    if args.record:
        record("full_size_step", result)


if __name__ == "__main__":
    main()
