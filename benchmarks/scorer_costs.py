"""What each scorer costs: CPU seconds per video with tiny weights (measured), GPU memory at full size (arithmetic).

1. Measured: every registered scorer scores the same `--videos` random videos of 9 frames of 64x64 (the shapes
   world's size) on the CPU, one call of `score_videos` per repeat after a warm-up call; the row is the median
   seconds divided by the videos. Weights are tiny: the shapes world's CLIP and aesthetic head
   (rlhf/world/weights/rewards), torchvision's RAFT-large with random weights (the real architecture: its cost
   is the full model's), and the random 2-layer Qwen2-VL / Qwen2.5-VL judges and VideoReward checkpoint the tests
   build (tests/test_rewards_vlm.py, tests/videoreward_tiny.py). Each scorer runs with its defaults except the
   files, `dtype: fp32` for the VLMs (bf16 matmuls are emulated on most CPUs) and `frame_size: [56, 56]` for
   `vlm_judge` (the multiple of 28 nearest the 64 px frames). The tiny VLMs' seconds say nothing about the real
   2B-8B models; they are there so the scoring path is timed and kept running.
2. Arithmetic, not measured: the GPU memory each scorer needs at full size, from parameter counts x bytes of the
   dtype it runs in by default, plus an activation estimate per video at ContentV's default video (125 frames of
   432x768 at 24 fps) and the documented frame counts and resolutions (`full_size_memory`). The frames handed to
   the scorers and the CUDA context (~0.5 GB) are not counted.

    python benchmarks/scorer_costs.py [--videos 8] [--repeats 3] [--only clip,motion_raft_large] [--threads 1] \
        [--note "under load (2 shared cores, 1 thread)"] [--record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record  # noqa: E402

FRAMES, SIZE = 9, 64  # the shapes world's videos: 9 frames of 64x64
WORLD_REWARDS = ROOT / "rlhf" / "world" / "weights" / "rewards"
WORLD_PROMPTS = ROOT / "configs" / "world" / "test_prompts.txt"  # world prompts: world_oracle parses them


def _world_clip(work: Path) -> dict[str, Any]:
    return {"checkpoint": f"local-dir:{WORLD_REWARDS / 'clip'}"}


def _world_aesthetic(work: Path) -> dict[str, Any]:
    return {"head": str(WORLD_REWARDS / "aesthetic_head.pth"), "clip_checkpoint": f"local-dir:{WORLD_REWARDS / 'clip'}"}


def _raft_large(work: Path) -> dict[str, Any]:
    import torch
    from torchvision.models import optical_flow

    path = work / "raft_large_random.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(optical_flow.raft_large(weights=None).state_dict(), path)
    return {"backend": "raft_large", "raft_weights": str(path)}


def _judge(model_type: str) -> Callable[[Path], dict[str, Any]]:
    def entry(work: Path) -> dict[str, Any]:
        from tests.test_rewards_vlm import build_tiny_judge

        folder = work / model_type
        if not folder.exists():
            build_tiny_judge(folder, model_type)
        return {"model": str(folder), "frame_size": [56, 56], "dtype": "fp32"}
    return entry


def _videoreward(work: Path) -> dict[str, Any]:
    from tests.videoreward_tiny import build_tiny_videoreward

    base, reward = work / "videoreward" / "base", work / "videoreward" / "reward"
    if not reward.exists():
        base, reward = build_tiny_videoreward(work / "videoreward")
    return {"checkpoint": str(reward), "base_model": str(base), "dimension": "overall", "video_fps": 8.0,
            "dtype": "fp32"}


# Case -> (registry scorer, its options): only the files, and the dtype or frame size set where said above.
CASES: dict[str, tuple[str, Callable[[Path], dict[str, Any]]]] = {
    "clip": ("clip", _world_clip),
    "aesthetic": ("aesthetic", _world_aesthetic),
    "consistency": ("consistency", _world_clip),
    "motion_lucas_kanade": ("motion", lambda work: {"backend": "lucas_kanade"}),
    "motion_raft_large": ("motion", _raft_large),
    "brightness": ("brightness", lambda work: {}),
    "contrast": ("contrast", lambda work: {}),
    "colorfulness": ("colorfulness", lambda work: {}),
    "frame_diff_motion": ("frame_diff_motion", lambda work: {}),
    "vlm_judge_qwen2_vl": ("vlm_judge", _judge("qwen2_vl")),
    "vlm_judge_qwen2_5_vl": ("vlm_judge", _judge("qwen2_5_vl")),
    "videoreward": ("videoreward", _videoreward),
    "world_oracle": ("world_oracle", lambda work: {}),
}


def measure(cases: Sequence[str], work: Path, videos: int = 8, repeats: int = 3,
            frames: int = FRAMES, size: int = SIZE) -> list[dict[str, Any]]:
    """CPU seconds per video of each case, scoring `videos` random `(frames, 3, size, size)` videos per call."""
    import torch

    from rewards.build import build_scorers, score_videos

    clips = torch.rand(videos, frames, 3, size, size, generator=torch.Generator().manual_seed(0))  # (B, T, 3, H, W)
    world = [line for line in WORLD_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [world[i % len(world)] for i in range(videos)]
    rows = []
    for case in cases:
        scorer, options = CASES[case][0], CASES[case][1](work)
        start = time.perf_counter()
        entry = {"class": scorer, "options": options}
        scorers = build_scorers({"scorers": {case: entry}, "device": "cpu", "batch_size": videos})
        load = time.perf_counter() - start
        scores = score_videos(scorers, clips, prompts, batch_size=videos)[case]  # warm-up
        if not torch.isfinite(scores).all():
            raise RuntimeError(f"{case}: non-finite scores {scores.tolist()}")
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            score_videos(scorers, clips, prompts, batch_size=videos)
            seconds.append(time.perf_counter() - start)
        shown = json.dumps(options).replace(str(work), "<tmp>").replace(f"{ROOT}/", "")  # the same on every machine
        rows.append({"scorer": case, "seconds_per_video": statistics.median(seconds) / videos,
                     "load_seconds": round(load, 2), "videos": videos, "frames": [frames, size, size],
                     "options": json.loads(shown)})
    return rows


# ---- GPU memory at full size: arithmetic ---------------------------------------------------------------------

GB = 1e9
FP32, BF16 = 4, 2
# ContentV's default video, and what each scorer takes of it.
VIDEO_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH, VIDEO_FPS = 125, 432, 768, 24
REWARDS_BATCH = 8  # rewards.batch_size: videos per scorer call when scoring a rollout
CLIP_FRAMES = 8  # clip / aesthetic num_frames
CLIP_TOKENS = (224 // 14) ** 2 + 1  # ViT-L/14 at 224 px: 256 patches + class token
MOTION_PAIRS, RAFT_UPDATES, MOTION_MAX_SIZE = 8, 12, 512
JUDGE_FRAMES, JUDGE_SIZE, JUDGE_BATCH = 8, (336, 588), 4  # vlm_judge defaults
VIDEOREWARD_BATCH, VIDEOREWARD_MAX_PIXELS = 2, 448 * 448

# Parameter counts (published model sizes; the open_clip / torchvision / transformers classes give the same).
PARAMS = {
    "clip_vit_l14": 428e6,  # OpenAI CLIP ViT-L/14: vision tower ~304M + text tower ~123M; the scorer loads both
    "clip_vit_l14_vision": 304e6,
    "laion_mlp_head": 0.93e6,  # improved aesthetic predictor MLP 768-1024-128-64-16-1 (v1 linear head: 769)
    "raft_large": 5.3e6,
    "qwen2_vl_2b": 2.2e9,  # Qwen2-VL-2B-Instruct: ViT 0.67B + Qwen2-1.5B; VideoReward = it + LoRA merged + rm_head
    "judge_7b": 8.3e9,  # Qwen2.5-VL-7B-Instruct (8.29B: ViT 0.67B + Qwen2.5-7B)
}


def vit_inference_bytes(tokens: int, width: int, mlp: int, heads: int, dtype_bytes: int, scores: bool) -> float:
    """Peak live activations of one transformer block per image under no_grad: residual + LN output + attention
    output (3 x width), q, k, v (2 more: ~5 x width in all), the MLP hidden before and after its activation
    (2 x mlp), and the attention scores (heads x tokens^2) where attention is not a fused kernel."""
    return (tokens * (5 * width + 2 * mlp) + (heads * tokens ** 2 if scores else 0)) * dtype_bytes


def vit_training_bytes(tokens: int, width: int, mlp: int, heads: int, layers: int, dtype_bytes: int) -> float:
    """Activations saved for backward per image: per block ~8 x width (LN in/out twice, q, k, v, attention
    output) + 2 x mlp (MLP hidden in and out of the activation) per token, and the attention scores and
    probabilities (2 x heads x tokens^2)."""
    return layers * (tokens * (8 * width + 2 * mlp) + 2 * heads * tokens ** 2) * dtype_bytes


def raft_pair_bytes(height: int, width: int, updates: int) -> float:
    """RAFT-large's peak per frame pair under no_grad, float32, at the flow resolution: the feature encoder's
    1/2-resolution 64-channel maps of both frames (~64 hw), the all-pairs correlation pyramid over 1/8-resolution
    features ((hw/64)^2 x (1 + 1/4 + 1/16 + 1/64)), the upsampled flow of every update, which torchvision returns
    (2 hw each), and the convex upsampling's 9 x 64 x hw/64 mask and product (~36 hw)."""
    hw = height * width
    correlation = (hw / 64) ** 2 * (1 + 1 / 4 + 1 / 16 + 1 / 64)
    return (64 * hw + correlation + 2 * hw * updates + 36 * hw) * FP32


def qwen_vl_video_bytes(frames: int, height: int, width: int, prompt_tokens: int, vision: dict[str, int],
                        text: dict[str, int], dtype_bytes: int = BF16) -> tuple[float, int, int]:
    """Peak activations of one video through a Qwen2-VL / Qwen2.5-VL forward (sdpa attention: no score matrices)
    and its KV cache; returns (bytes, vision patches, language tokens). Frames are grouped in pairs (temporal
    patch 2) of 14 x 14 patches, and 2 x 2 patches merge into one language token. Per token a block holds ~5 x
    width (residual, norm output, q, k, v, attention output) and the MLP's live hidden values (`mlp_live`: 2 x
    hidden for a GELU MLP, 3 x for SwiGLU's gate, up and product)."""
    patches = frames // 2 * (height // 14) * (width // 14)
    tokens = patches // 4 + prompt_tokens
    vision_peak = patches * (5 * vision["width"] + vision["mlp_live"])
    text_peak = tokens * (5 * text["width"] + text["mlp_live"])
    kv_cache = text["layers"] * 2 * tokens * text["kv_width"]
    pixels = patches * 3 * 2 * 14 * 14 * FP32 / dtype_bytes  # the processor's float32 patches
    return (vision_peak + text_peak + kv_cache + pixels) * dtype_bytes, patches, tokens


def full_size_memory() -> list[dict[str, Any]]:
    """GPU memory each scorer needs at full size: weights + activations at its default batch (arithmetic)."""
    from rewards.videoreward import frame_count, smart_resize

    rows = []

    def row(scorer: str, weights: float, per_video: float, batch: int, sees: str, extra: dict | None = None) -> None:
        rows.append({"scorer": scorer, "sees": sees, "weights_gb": round(weights / GB, 2),
                     "activations_gb_per_video": round(per_video / GB, 3), "batch": batch,
                     "total_gb": round((weights + batch * per_video) / GB, 1), **(extra or {})})

    clip_image = vit_inference_bytes(CLIP_TOKENS, 1024, 4096, 16, FP32, scores=True)
    clip_grad = CLIP_FRAMES * vit_training_bytes(CLIP_TOKENS, 1024, 4096, 16, 24, FP32)
    clip_sees = f"{CLIP_FRAMES} frames at 224x224 + the prompt"
    grad = {"with_gradients_gb_per_video": round(clip_grad / GB, 1)}  # reward-gradient backpropagates through it
    row("clip", PARAMS["clip_vit_l14"] * FP32, CLIP_FRAMES * clip_image, REWARDS_BATCH, clip_sees, grad)
    row("aesthetic", (PARAMS["clip_vit_l14"] + PARAMS["laion_mlp_head"]) * FP32, CLIP_FRAMES * clip_image,
        REWARDS_BATCH, f"{CLIP_FRAMES} frames at 224x224", grad)  # beside clip on the same weights: + the head
    row("consistency", PARAMS["clip_vit_l14"] * FP32, CLIP_FRAMES * clip_image, REWARDS_BATCH,
        f"{CLIP_FRAMES} frames at 224x224", grad)  # beside clip on the same weights: nothing more

    scale = min(1.0, MOTION_MAX_SIZE / max(VIDEO_HEIGHT, VIDEO_WIDTH))
    flow_h, flow_w = round(VIDEO_HEIGHT * scale), round(VIDEO_WIDTH * scale)
    row("motion (raft_large)", PARAMS["raft_large"] * FP32, MOTION_PAIRS * raft_pair_bytes(flow_h, flow_w, RAFT_UPDATES),
        REWARDS_BATCH, f"{MOTION_PAIRS} frame pairs at {flow_h}x{flow_w}")
    # Lucas-Kanade per pair: the two RGB frames (6 hw) and ~18 grey maps (pyramids, gradients, window sums).
    row("motion (lucas_kanade)", 0, MOTION_PAIRS * 24 * flow_h * flow_w * FP32, REWARDS_BATCH,
        f"{MOTION_PAIRS} frame pairs at {flow_h}x{flow_w}")

    qwen2_vision = {"width": 1280, "mlp_live": 2 * 5120}  # Qwen2-VL's ViT (32 blocks): GELU MLP of 5120
    qwen2_2b_text = {"width": 1536, "mlp_live": 3 * 8960, "layers": 28, "kv_width": 2 * 128}  # 2 KV heads of 128
    count = frame_count(VIDEO_FRAMES, VIDEO_FPS, 2.0, None)
    height, width = smart_resize(VIDEO_HEIGHT, VIDEO_WIDTH, VIDEOREWARD_MAX_PIXELS)
    per_video, patches, tokens = qwen_vl_video_bytes(count, height, width, 300, qwen2_vision, qwen2_2b_text)
    row("videoreward", PARAMS["qwen2_vl_2b"] * BF16, per_video, VIDEOREWARD_BATCH,
        f"{count} frames (2 per second) at {height}x{width} + the prompt",
        {"vision_patches": patches, "language_tokens": tokens})

    qwen25_vision = {"width": 1280, "mlp_live": 3 * 3420}  # Qwen2.5-VL's ViT: SwiGLU MLP of 3420
    qwen25_7b_text = {"width": 3584, "mlp_live": 3 * 18944, "layers": 28, "kv_width": 4 * 128}
    per_video, patches, tokens = qwen_vl_video_bytes(JUDGE_FRAMES, *JUDGE_SIZE, 60, qwen25_vision, qwen25_7b_text)
    judge_sees = f"{JUDGE_FRAMES} frames at {JUDGE_SIZE[0]}x{JUDGE_SIZE[1]} + the prompt"
    row("vlm_judge (7B, Qwen2.5-VL-7B)", PARAMS["judge_7b"] * BF16, per_video, JUDGE_BATCH, judge_sees,
        {"vision_patches": patches, "language_tokens": tokens})
    per_video, patches, tokens = qwen_vl_video_bytes(JUDGE_FRAMES, *JUDGE_SIZE, 60, qwen2_vision, qwen2_2b_text)
    row("vlm_judge (2B, Qwen2-VL-2B)", PARAMS["qwen2_vl_2b"] * BF16, per_video, JUDGE_BATCH, judge_sees,
        {"vision_patches": patches, "language_tokens": tokens})
    # The image statistics: about one float32 copy of the frames (frame differences, luma, colour channels).
    row("brightness, contrast, colorfulness, frame_diff_motion", 0,
        VIDEO_FRAMES * 3 * VIDEO_HEIGHT * VIDEO_WIDTH * FP32, REWARDS_BATCH, "every frame at full size")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8, help="videos per scorer call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per scorer (the median counts)")
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases: " + ", ".join(CASES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--note", default="", help="measurement conditions, recorded with the figures "
                        "(e.g. 'under load (2 shared cores, 1 thread)')")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import torch

    cases = [case for case in args.only.split(",") if case]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(cases, Path(tmp), args.videos, args.repeats)
    result = {"cpu_seconds_per_video": {row["scorer"]: float(f"{row['seconds_per_video']:.3g}") for row in rows},
              "cpu": {"threads": torch.get_num_threads(), "videos_per_call": args.videos, "frames": [FRAMES, SIZE, SIZE],
                      "repeats": args.repeats, **({"note": args.note} if args.note else {}),
                      "options": {row["scorer"]: row["options"] for row in rows}},
              "gpu_memory_full_size_arithmetic": full_size_memory()}
    for row in rows:
        print(json.dumps(row))
    print("| scorer | CPU s/video (tiny) |\n|---|---|")
    for row in rows:
        print(f"| {row['scorer']} | {row['seconds_per_video']:.3g} |")
    print("\nGPU memory at full size (arithmetic, not measured):\n| scorer | sees | weights GB | activations GB/video "
          "| batch | total GB |\n|---|---|---|---|---|---|")
    for row in result["gpu_memory_full_size_arithmetic"]:
        print(f"| {row['scorer']} | {row['sees']} | {row['weights_gb']} | {row['activations_gb_per_video']} "
              f"| {row['batch']} | {row['total_gb']} |")
    if args.record:
        record("scorer_costs", result)


if __name__ == "__main__":
    main()
