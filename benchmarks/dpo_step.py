"""One Flow-DPO optimiser step: our trainer's step vs a reference-style step, side by side in one run.

Reference style (the public Diffusion-DPO examples): the step receives pixels and text, VAE-encodes the
winner and loser videos and encodes the prompt inside the step, then runs the policy and the reference on
winner and loser as separate forwards. Ours (`dpo.trainer.dpo_step`): cached latents and prompt embeddings
from the rollout store, winner and loser batched in one policy forward and one reference forward.

Same model (tiny ContentV built on the fly, LoRA r8), same pairs, same optimiser. Each variant runs in its
own process so allocator caches do not leak between them. Printed:
- seconds per optimiser step (median of --steps after one warm-up step);
- peak step memory: on CUDA `max_memory_allocated` during one step; on CPU the peak of the tensors allocated
  during one step (torch profiler memory timeline): activations, temporaries, gradients and optimiser
  updates — not the weights both variants already hold.

    python benchmarks/dpo_step.py [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402

PROMPTS = ["a red ball bouncing", "a calm lake at dawn", "a dog on a beach", "city lights at night"]


def peak_tensor_bytes(fn) -> int:
    """Peak bytes of tensors allocated while `fn()` runs (torch profiler memory timeline, CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        path = Path(tmp) / "memory.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    del torch
    return max((sum(per_category) for per_category in sizes), default=0)


def prepare(work: Path, frames: int, size: int) -> tuple[Path, Path]:
    """Tiny model, a rollout store with decoded videos, and best-vs-worst pairs."""
    from rewards.pairs import PairsConfig, build_pairs, save_pairs
    from rlhf.cli import main
    from rlhf.models.tiny import build_tiny_model
    from rollouts.store import RolloutStore

    model = build_tiny_model(work / "model")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert main(["rollout", "--model", str(model), "--prompts", str(work / "prompts.txt"), "--out",
                 str(work / "store"), "--frames", str(frames), "--height", str(size), "--width", str(size),
                 "--steps", "2", "--samples-per-prompt", "2", "--save-frames", "0", "--save-videos",
                 "--dtype", "fp32"]) == 0
    store = RolloutStore(work / "store")
    rows = [{"sample_id": r["sample_id"], "prompt_id": r["prompt_id"], "scores": {"r": float(i % 2)}}
            for i, r in enumerate(store.manifest())]
    pairs, summary = build_pairs(rows, PairsConfig(min_margin=0.0, normalize="none"))
    save_pairs(pairs, summary, work / "pairs", {"store": str(store.root)})
    return store.root, work / "pairs"


def measure(variant: str, store_dir: Path, pairs_dir: Path, steps: int, device_name: str) -> dict:
    import torch

    from dpo.config import DPOConfig
    from dpo.data import PairData
    from dpo.losses import flow_dpo_loss, flow_matching_error
    from dpo.trainer import dpo_step, velocity
    from rlhf import devices
    from rlhf.generation import VideoGenerator
    from rlhf.options import ModelOptions
    from rlhf.sampling import FlowSchedule
    from rlhf.training import TrainingRun, step_generator
    from rlhf.video import read_video
    from rollouts.store import RolloutStore

    store = RolloutStore(store_dir)
    model_dir = store.settings["model"]
    config = DPOConfig(pairs=str(pairs_dir), output_dir=str(store_dir.parent / f"run-{variant}"), dtype="fp32",
                       mixed_precision="no", lora_rank=8, lora_alpha=8, report_to="none", device=device_name,
                       gradient_checkpointing=False)
    data = PairData(pairs_dir, store)
    schedule = FlowSchedule.from_file(Path(model_dir) / "scheduler" / "scheduler_config.json")
    run = TrainingRun(config, config, device_name, config)
    run.prepare(run.load_policy(model_dir, "fp32"))
    device = run.device

    if variant == "reference":
        # The reference step needs the VAE and the text encoders, and pixels + text as its data.
        parts = VideoGenerator(ModelOptions(model=model_dir, device=device_name, dtype="fp32"))
        vae, encoder = parts.vae, parts.prompt_encoder
        prompts = store.read_prompts()

        def pixels(sample_id: str) -> torch.Tensor:
            frames = torch.from_numpy(read_video(store.video_path(sample_id))).float() / 127.5 - 1
            return frames.permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W)

        def encode_latents(video: torch.Tensor) -> torch.Tensor:
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            return (vae.encode(video.to(device)).latent_dist.sample() - mean.to(device)) / std.to(device)

    def one_step(index: int) -> None:
        generator = step_generator(0, index)
        batch = data.batch([index % len(data)])
        if variant == "ours":
            loss, _ = dpo_step(run, batch, config, schedule, generator)
        else:
            row = data.rows[index % len(data)]
            with torch.no_grad():
                x_w = encode_latents(pixels(row["chosen_id"]))
                x_l = encode_latents(pixels(row["rejected_id"]))
                text = encoder.encode([prompts[row["prompt_id"]]]).to(device)
            noise = torch.randn(x_w.shape, generator=generator).to(device)
            sigma = torch.rand(1, generator=generator).to(device)
            errors = {}
            for name, x0 in (("w", x_w), ("l", x_l)):
                x_t = (1 - sigma) * x0 + sigma * noise
                errors[f"policy_{name}"] = flow_matching_error(
                    velocity(run.policy, x_t, sigma, text, schedule.num_train_timesteps), noise, x0)
                with torch.no_grad():
                    run.unwrapped.disable_adapters()
                    errors[f"ref_{name}"] = flow_matching_error(
                        velocity(run.unwrapped, x_t, sigma, text, schedule.num_train_timesteps), noise, x0)
                    run.unwrapped.enable_adapters()
            loss, _ = flow_dpo_loss(errors["policy_w"], errors["policy_l"], errors["ref_w"], errors["ref_l"],
                                    beta=config.beta)
        loss.backward()
        run.optimizer_step(True, [])

    one_step(0)  # warm-up
    times = []
    for index in range(1, steps + 1):
        devices.synchronize(device)
        start = time.perf_counter()
        one_step(index)
        devices.synchronize(device)
        times.append(time.perf_counter() - start)
    devices.reset_peak_memory(device)
    if device.type == "cpu":
        peak = peak_tensor_bytes(lambda: one_step(steps + 1))
    else:
        one_step(steps + 1)
        peak = devices.peak_memory_bytes(device)
    return {"seconds_per_step": round(statistics.median(times), 4), "peak_step_memory_mb": round(peak / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    parser.add_argument("--variant", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from rlhf.cli import configure_logging

    configure_logging()
    if args.variant:  # child process: measure one variant, print JSON
        work = Path(args.work)
        result = measure(args.variant, work / "store", work / "pairs", args.steps, args.device)
        print("RESULT " + json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.frames, args.size)
        results = {}
        for variant in ("ours", "reference"):
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--work", str(work), "--steps", str(args.steps),
                 "--device", args.device], capture_output=True, text=True, check=True,
            ).stdout
            results[variant] = json.loads(out.split("RESULT ", 1)[1])

    ours, ref = results["ours"], results["reference"]
    result = {
        "benchmark": "dpo_step",
        "device": args.device,
        "shape": f"1 pair, {args.frames}x{args.size}x{args.size} video, tiny ContentV, LoRA r8",
        "memory_measure": "peak tensor bytes allocated during the step (profiler)" if args.device == "cpu"
                          else "max_memory_allocated during the step",
        "ours": ours,
        "reference": ref,
        "speedup": round(ref["seconds_per_step"] / ours["seconds_per_step"], 2),
        "memory_ratio": round(ours["peak_step_memory_mb"] / ref["peak_step_memory_mb"], 3),
    }
    print(json.dumps(result, indent=2))
    if args.record:
        record("dpo_step", result)


if __name__ == "__main__":
    main()
