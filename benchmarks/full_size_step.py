"""Training and sampling steps on a ContentV-shaped model: seconds, FLOPs counted by torch, MFU and HFU.

Steps (random weights; ContentV-8B's shape by default: 38 layers, 38 heads x 64, 432x768, LoRA r64, bf16):
- `dpo`: one Flow-DPO optimiser step, one pair (winner and loser in one policy forward with gradients + one
  reference forward), at the largest frame count of --frames that fits;
- `reward_gradient`: one reward-gradient optimiser step (K=1: --rg-steps CFG-batched denoising steps, the last
  with gradients; the first frame decoded by the Wan VAE with gradients; a differentiable brightness reward);
- `rollout_step`: one denoising step of a rollout, CFG batched (conditional + unconditional in one forward);
- `vae_decode`: one Wan VAE decode of the video's latents (the full Wan 2.1 architecture; --no-full-vae: a tiny one).

Gradient checkpointing of the transformer is the trainers' default, `auto` (rlhf/checkpointing.py): the first
training step runs with full checkpointing while its activations are measured, and the fastest policy that fits in
the device's free memory (none, selective, full) is kept for every step after it (printed as `auto -> ...`; every
step is counted again after it). The reward step's VAE decode runs without it (one frame), so every recompute is
the transformer's and is counted apart.

FLOPs (rlhf/flops.py): `torch.utils.flop_counter.FlopCounterMode` over one eager step of each kind (CPU attention
kernels included). Model FLOPs exclude the gradient-checkpoint recompute, hardware FLOPs include it. As a check,
the DPO step is counted again with checkpointing off: that count must equal the model FLOPs (printed as
`model_flops_check`). Peak: the published dense figure of a known GPU for the dtype, else (CPU) measured in this
run with a matmul of the step's dtype and the feed-forward shape (batch x video tokens, D) @ (D, 4D).
MFU = model FLOPs / (seconds x peak), HFU = hardware FLOPs / (seconds x peak). Seconds: median of --steps timed
steps after a warm-up step. With --compile the same steps are timed again with the transformer blocks compiled
(rlhf/compiling.py): compile time is reported apart.

    python benchmarks/full_size_step.py --device cuda [--record]            # on a lent GPU
    OMP_NUM_THREADS=2 python benchmarks/full_size_step.py --device cpu --layers 4 --heads 8 --head-dim 64 \\
        --height 128 --width 128 --frames 9 --lora-rank 16 --dtype fp32 --rg-steps 4 --threads 2   # CPU mid-size

Text conditioning is random (333 tokens x 4096, pooled 2048), as the trainer reads cached embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import record  # noqa: E402
from dpo.config import DPOConfig  # noqa: E402
from dpo.data import PairBatch  # noqa: E402
from dpo.trainer import dpo_step  # noqa: E402
from rlhf import devices  # noqa: E402
from rlhf.checkpointing import ActivationProbe, choose_policy, enable_checkpointing  # noqa: E402
from rlhf.compiling import CompileTimer, compile_blocks  # noqa: E402
from rlhf.flops import count_flops, peak_flops, utilisation  # noqa: E402
from rlhf.lora import add_lora  # noqa: E402
from rlhf.models.transformer import SD3Transformer3DModel  # noqa: E402
from rlhf.sampling import FlowSchedule, PromptEmbeds, denoise, latent_shape  # noqa: E402
from rlhf.training import BareRun, step_generator  # noqa: E402
from rlhf.video import decode_latents  # noqa: E402

TEXT_TOKENS = 77 + 256
STEP_KINDS = ("dpo", "reward_gradient", "rollout_step", "vae_decode")


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
    if args.gradient_checkpointing:  # auto: full until the first training step is measured (main)
        enable_checkpointing(model, "full" if args.checkpoint_policy == "auto" else args.checkpoint_policy)
    return model.train()


def build_vae(args, device: torch.device) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae_kwargs = {} if args.full_vae else {"base_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
    with torch.device(device):
        return AutoencoderKLWan(**vae_kwargs).requires_grad_(False).eval()  # the real Wan 2.1 VAE architecture


def random_text(generator: torch.Generator, batch: int = 1) -> PromptEmbeds:
    return PromptEmbeds(torch.randn(batch, TEXT_TOKENS, 4096, generator=generator),
                        torch.randn(batch, 2048, generator=generator))


# ---- the steps: each returns (step(index), info); a step is one unit of work, timed and counted whole ----------
def make_dpo(model, vae, frames: int, args, device, dtype) -> tuple[Callable[[int], None], dict]:
    shape = latent_shape(frames, args.height, args.width)
    generator = torch.Generator().manual_seed(0)
    batch = PairBatch(latents_w=torch.randn(1, *shape, generator=generator),
                      latents_l=torch.randn(1, *shape, generator=generator),
                      text=random_text(generator), weights=torch.ones(1), pair_ids=["w>l"])
    config = DPOConfig(pairs="-", output_dir="-", beta=500.0)
    run = BareRun(model, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(index: int) -> None:
        with devices.autocast(device, dtype):  # as accelerate's autocast wraps the trainer's step
            loss, _ = dpo_step(run, batch, config, FlowSchedule(shift=3.0), step_generator(0, index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"latent_shape": list(shape), "batch": 2}


def make_reward_gradient(model, vae, frames: int, args, device, dtype) -> tuple[Callable[[int], None], dict]:
    from dpo.reward_gradient import FrozenParts, reward_gradient_step
    from dpo.reward_gradient_config import RewardGradientConfig
    from rewards.build import build_scorers

    generator = torch.Generator().manual_seed(0)
    parts = FrozenParts(
        schedule=FlowSchedule(shift=3.0), vae=vae, reward_device=device, prompts=["a prompt"],
        text=random_text(generator), negative=random_text(generator),
        scorers=build_scorers({"scorers": {"brightness": {"weight": 1.0}}, "device": device.type}),
    )
    config = RewardGradientConfig(model="-", prompts="-", rewards="-", output_dir="-", frames=frames,
                                  height=args.height, width=args.width, steps=args.rg_steps, grad_steps=1,
                                  decode_frames="first", vae_gradient_checkpointing=False)
    run = BareRun(model, device, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(index: int) -> None:
        loss, _ = reward_gradient_step(run, parts, [0], config, step_generator(0, index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"denoising_steps": args.rg_steps, "grad_steps": 1, "decoded_frames": 1, "batch": 2}


def make_rollout_step(model, vae, frames: int, args, device, dtype) -> tuple[Callable[[int], None], dict]:
    generator = torch.Generator().manual_seed(0)
    shape = latent_shape(frames, args.height, args.width)
    noise = torch.randn(1, *shape, generator=generator).to(device)
    cond, uncond = random_text(generator).to(device, dtype), random_text(generator).to(device, dtype)
    sigmas = FlowSchedule(shift=3.0).sigmas(50)[:2]  # the first of 50 steps

    @torch.no_grad()
    def step(index: int) -> None:
        with devices.autocast(device, dtype):
            denoise(model, noise, sigmas, cond, uncond, guidance_scale=6.0, batch_cfg=True)

    return step, {"batch": 2, "cfg": "batched"}


def make_vae_decode(model, vae, frames: int, args, device, dtype) -> tuple[Callable[[int], None], dict]:
    shape = latent_shape(frames, args.height, args.width)
    latents = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def step(index: int) -> None:
        decode_latents(vae, latents)

    return step, {"vae": "full Wan 2.1" if args.full_vae else "tiny Wan", "vae_dtype": "fp32"}


MAKERS = {"dpo": make_dpo, "reward_gradient": make_reward_gradient, "rollout_step": make_rollout_step,
          "vae_decode": make_vae_decode}


def timed(step: Callable[[int], None], steps: int, device: torch.device) -> dict:
    """Warm-up step (with any compilation in it), then the median of `steps` timed steps."""
    with CompileTimer() as timer:
        devices.synchronize(device)
        start = time.perf_counter()
        step(0)
        devices.synchronize(device)
        first = time.perf_counter() - start
    devices.reset_peak_memory(device)
    times = []
    for index in range(1, steps + 1):
        start = time.perf_counter()
        step(index)
        devices.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = devices.peak_memory_bytes(device)
    return {"seconds": statistics.median(times), "first_step_seconds": first, "compile_seconds": timer.seconds,
            "peak_memory_gib": round(peak / 2**30, 2) if peak is not None else None}


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
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each kind (median reported)")
    parser.add_argument("--rg-steps", type=int, default=10, help="denoising steps of the reward-gradient step")
    parser.add_argument("--full-vae", action=argparse.BooleanOptionalAction, default=True,
                        help="full-size Wan VAE (default) or a tiny one (--no-full-vae, for CPU tests)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="checkpoint the transformer blocks in the training steps (the trainers' default)")
    parser.add_argument("--checkpoint-policy", choices=("auto", "full", "selective"), default="auto",
                        help="with checkpointing: auto (the trainers' default), full or selective "
                             "(rlhf/checkpointing.py)")
    parser.add_argument("--only", nargs="+", choices=STEP_KINDS, default=list(STEP_KINDS), help="step kinds to run")
    parser.add_argument("--compile", action="store_true",
                        help="also time every step with the transformer blocks compiled (regional torch.compile)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s of --dtype (default: published or "
                                                          "measured)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.compile and args.gradient_checkpointing and args.checkpoint_policy != "full":
        parser.error("--compile times the eager steps' policy compiled too: give --checkpoint-policy full (selective "
                     "does not combine with compile; auto is full under compile in the trainers)")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.resolve_device(args.device)
    dtype = devices.parse_dtype(args.dtype)
    model = build(args, device, dtype)
    vae = build_vae(args, device)
    result = {"benchmark": "full_size_step", "device": devices.device_name(device), "dtype": args.dtype,
              "gradient_checkpointing": args.gradient_checkpointing,
              "checkpoint_policy": args.checkpoint_policy if args.gradient_checkpointing else None,
              "threads": torch.get_num_threads() if device.type == "cpu" else None, "layers": args.layers,
              "heads": args.heads, "head_dim": args.head_dim, "lora_rank": args.lora_rank,
              "size": f"{args.height}x{args.width}", "steps": {}, "tried": [],
              "load_average_before": os.getloadavg()[0]}  # other work on the machine skews the timings

    # 1. Build each kind of step at the largest frame count that fits, and count its FLOPs on one eager step.
    #    With auto checkpointing, the first training step's activations decide the policy of every step after it.
    made = {}
    probe = ActivationProbe(model) if args.gradient_checkpointing and args.checkpoint_policy == "auto" else None
    for kind in args.only:
        for frames in sorted(args.frames, reverse=True):
            try:
                step, info = MAKERS[kind](model, vae, frames, args, device, dtype)
                probing = probe is not None and kind in ("dpo", "reward_gradient")
                with count_flops(model, vae) as flops, probe.measuring() if probing else contextlib.nullcontext():
                    step(-1)
                if probing:
                    with devices.autocast(device, dtype):
                        estimate = probe.measure()
                    choice = choose_policy(estimate, devices.available_memory_bytes(device))
                    result["checkpoint_policy"] = f"auto -> {choice}"
                    result["activation_estimate_gb"] = {policy: estimate.step_bytes(policy) / 1e9
                                                        for policy in ("none", "selective")}
                    probe = None
                    enable_checkpointing(model, choice)
                    with count_flops(model, vae) as flops:  # counted again under the policy it keeps
                        step(-1)
                made[kind] = step
                result["steps"][kind] = {"frames": frames, **info, "model_tflop": flops.model / 1e12,
                                         "hardware_tflop": flops.hardware / 1e12}
                break
            except torch.OutOfMemoryError:
                result["tried"].append({"step": kind, "frames": frames, "fits": False})
                devices.empty_cache(device)
    if "dpo" in made and model.gradient_checkpointing:  # the recompute split checked: the step without checkpointing, counted whole
        model.gradient_checkpointing = False
        with count_flops(model) as plain:
            made["dpo"](-2)
        model.gradient_checkpointing = True
        counted = result["steps"]["dpo"]["model_tflop"] * 1e12
        result["model_flops_check"] = {"dpo_without_checkpointing_tflop": plain.hardware / 1e12,
                                       "relative_difference": abs(plain.hardware - counted) / plain.hardware}

    # 2. Peak FLOP/s per dtype: published, or the better of a matmul of the feed-forward shape and a square one,
    #    measured now and again after the timed steps (the higher reading counts: a busy machine reads low).
    frames = next((entry["frames"] for entry in result["steps"].values()), min(args.frames))
    tokens = 2 * latent_shape(frames, args.height, args.width)[1] * (args.height // 16) * (args.width // 16)
    width = args.heads * args.head_dim
    peaks = {}
    for name, peak_dtype in (("transformer", dtype), ("vae", torch.float32)):
        if args.peak_tflops and peak_dtype == dtype:
            peaks[name] = (args.peak_tflops * 1e12, "--peak-tflops")
        elif name == "vae" and peak_dtype == dtype:
            peaks[name] = peaks["transformer"]
        else:
            peaks[name] = peak_flops(device, peak_dtype, (tokens, width, 4 * width))

    # 3. Time every step eagerly, then (--compile) with the transformer blocks compiled.
    variants = ["eager", "compiled"] if args.compile else ["eager"]
    for variant in variants:
        if variant == "compiled":
            compile_blocks(model)
        for kind, step in made.items():
            if variant == "compiled" and kind == "vae_decode":
                continue  # only the transformer's blocks are compiled
            result["steps"][kind][variant] = timed(step, args.steps, device)
    for name, peak_dtype in (("transformer", dtype), ("vae", torch.float32)):
        if not args.peak_tflops or peak_dtype != dtype:
            again = peak_flops(device, peak_dtype, (tokens, width, 4 * width))
            peaks[name] = max(peaks[name], again, key=lambda reading: reading[0])
    if dtype == torch.float32 and not args.peak_tflops:  # one dtype: one peak, the best of every reading
        peaks["transformer"] = peaks["vae"] = max(peaks.values(), key=lambda reading: reading[0])
    result["peak"] = {name: {"tflops": value / 1e12, "source": source} for name, (value, source) in peaks.items()}
    result["load_average_after"] = os.getloadavg()[0]
    for kind, entry in result["steps"].items():
        peak = peaks["vae" if kind == "vae_decode" else "transformer"][0]
        for variant in [v for v in variants if v in entry]:
            timing = entry[variant]
            timing["mfu"] = utilisation(entry["model_tflop"] * 1e12, timing["seconds"], peak)
            timing["hfu"] = utilisation(entry["hardware_tflop"] * 1e12, timing["seconds"], peak)
            if variant == "compiled":
                timing["speedup"] = entry["eager"]["seconds"] / timing["seconds"]

    table = render(result, variants)
    print(json.dumps(result, indent=2))
    print(table)
    if args.record:
        record("full_size_step", None, text=table)


def render(result: dict, variants: list[str]) -> str:
    lines = [f"{result['device']} ({result['threads']} threads)" if result["threads"] else result["device"],
             f"model: {result['layers']} layers, {result['heads']} heads x {result['head_dim']}, LoRA r"
             f"{result['lora_rank']}, {result['dtype']}, {result['size']}, gradient checkpointing "
             f"{result.get('checkpoint_policy') or 'off'}",
             *(f"peak ({name}): {p['tflops']:.4g} TFLOP/s, {p['source']}" for name, p in result["peak"].items()),
             f"1-minute load average: {result['load_average_before']:.2f} before, {result['load_average_after']:.2f} "
             "after (above the thread count: other work ran beside the timings)"]
    if "model_flops_check" in result:
        check = result["model_flops_check"]
        lines.append(f"model FLOPs check (DPO step recounted without checkpointing): "
                     f"{check['dpo_without_checkpointing_tflop']:.5g} TFLOP, difference {check['relative_difference']:.2%}")
    lines += ["", "| step | frames | variant | s/step | model TFLOP | hardware TFLOP | MFU | HFU | compile s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind, entry in result["steps"].items():
        for variant in [v for v in variants if v in entry]:
            t = entry[variant]
            lines.append(f"| {kind} | {entry['frames']} | {variant} | {t['seconds']:.3f} | {entry['model_tflop']:.4g} "
                         f"| {entry['hardware_tflop']:.4g} | {t['mfu']:.1%} | {t['hfu']:.1%} | "
                         f"{t['compile_seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
