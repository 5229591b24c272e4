"""Reward-gradient step: peak memory and time vs K (steps with gradients) and vs decoded frames.

One optimiser step of `dpo.reward_gradient.reward_gradient_step` (sample, decode, reward, backward, AdamW) on a
tiny ContentV whose transformer is widened (6 layers, inner dim 256) so that transformer activations dominate
the step, with and without gradient checkpointing (transformer blocks and per-latent-frame VAE decoder passes
together). Rows vary K in (1, 2, 4) with the first frame decoded, then the decoded frames (1, 3, all) with
K = 1. Printed per row:
- peak step memory: on CUDA `max_memory_allocated` during one step; on CPU the peak of the tensors allocated
  during one step (torch profiler memory timeline, `benchmarks/dpo_step.py`'s `peak_tensor_bytes`):
  activations, temporaries, gradients and optimiser updates, not the weights held before the step;
- seconds per step (median of --repeats after one warm-up step).

Without checkpointing, each extra step with gradients keeps a full set of transformer activations; with it,
only each block's inputs, so memory grows with K far more slowly.

    python benchmarks/reward_gradient_memory.py [--record]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402

PROMPTS = ["a red ball bouncing", "a calm lake at dawn", "a dog on a beach", "city lights at night"]
WIDE_TRANSFORMER = {"num_layers": 6, "num_attention_heads": 4, "attention_head_dim": 64}


def build_model(work: Path) -> Path:
    """The tiny checkpoint with a wider, deeper transformer (same text and latent sizes)."""
    import torch

    from rlhf.models.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_model
    from rlhf.models.transformer import SD3Transformer3DModel

    model = build_tiny_model(work / "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **WIDE_TRANSFORMER})
    transformer.save_pretrained(model / "transformer", safe_serialization=True)
    return model


def cases(frames: int) -> list[tuple[int, str, int | None, str]]:
    """(K, decode_frames, num_decode_frames, label of decoded frames) per row."""
    rows = [(k, "first", None, "1") for k in (1, 2, 4)]
    rows += [(1, "k_evenly_spaced", 3, "3"), (1, "k_evenly_spaced", frames, f"all ({frames})")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed optimiser steps per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (1: tiny ops are overhead-bound, and timings stay sane on a busy box)")
    parser.add_argument("--record", action="store_true", help="append the table and the command to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from rlhf.cli import configure_logging

    configure_logging()
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.dpo_step import peak_tensor_bytes
    from dpo.reward_gradient import load_frozen_parts, reward_gradient_step
    from dpo.reward_gradient_config import RewardGradientConfig
    from rlhf import devices
    from rlhf.training import TrainingRun, step_generator

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work)
        (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        (work / "rewards.yaml").write_text(f"scorers:\n  brightness: {{weight: 1.0}}\ndevice: {args.device}\n")
        base = RewardGradientConfig(
            model=str(model), prompts=str(work / "prompts.txt"), rewards=str(work / "rewards.yaml"),
            output_dir=str(work / "run"), device=args.device, dtype="fp32", mixed_precision="no", report_to="none",
            frames=args.frames, height=args.size, width=args.size, steps=args.steps, guidance=4.0,
            max_sequence_length=16, lora_rank=8, lora_alpha=8,
        )
        run = TrainingRun(base, base, args.device, base)
        parts = load_frozen_parts(base, run.device)
        run.prepare(run.load_policy(base.model, base.dtype))
        device = run.device

        def one_step(config: RewardGradientConfig, index: int) -> None:
            loss, _ = reward_gradient_step(run, parts, [index % len(PROMPTS)], config, step_generator(0, index))
            loss.backward()
            run.optimizer_step(True, [])

        for checkpointing in (False, True):
            if checkpointing:
                run.unwrapped.enable_gradient_checkpointing()
            else:
                run.unwrapped.disable_gradient_checkpointing()
            for k, mode, count, label in cases(args.frames):
                config = dataclasses.replace(base, grad_steps=k, decode_frames=mode, num_decode_frames=count,
                                             vae_gradient_checkpointing=checkpointing)
                one_step(config, 0)  # warm-up
                times = []
                for index in range(1, args.repeats + 1):
                    devices.synchronize(device)
                    start = time.perf_counter()
                    one_step(config, index)
                    devices.synchronize(device)
                    times.append(time.perf_counter() - start)
                devices.reset_peak_memory(device)
                if device.type == "cpu":
                    peak = peak_tensor_bytes(lambda config=config: one_step(config, args.repeats + 1))
                else:
                    one_step(config, args.repeats + 1)
                    peak = devices.peak_memory_bytes(device)
                rows.append(("on" if checkpointing else "off", k, label, peak / 2**20, statistics.median(times)))
                print(f"checkpointing {rows[-1][0]:>3}  K={k}  frames {label:<8}  {rows[-1][3]:8.1f} MB  "
                      f"{rows[-1][4]:.3f} s", flush=True)

    memory = ("peak tensor bytes allocated during the step (profiler)" if args.device == "cpu"
              else "max_memory_allocated during the step")
    header = (f"tiny ContentV (transformer {WIDE_TRANSFORMER['num_layers']} layers, inner "
              f"{WIDE_TRANSFORMER['num_attention_heads'] * WIDE_TRANSFORMER['attention_head_dim']}), "
              f"{args.frames}x{args.size}x{args.size} video, {args.steps} sampling steps, CFG batched, batch 1, "
              f"LoRA r8, device {args.device}"
              f"{f' ({args.threads} thread(s))' if args.device == 'cpu' else ''}; memory: {memory}")
    table = ["| checkpointing | K | decoded frames | peak step memory (MB) | s/step |", "|---|---|---|---|---|"]
    table += [f"| {c} | {k} | {label} | {mb:.1f} | {sec:.3f} |" for c, k, label, mb, sec in rows]
    print("\n" + header + "\n\n" + "\n".join(table))
    if args.record:
        record("reward_gradient_memory", None, text=header + "\n\n" + "\n".join(table))


if __name__ == "__main__":
    main()
