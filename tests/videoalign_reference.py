"""How the VideoAlign scores recorded in tests/test_rewards_videoreward.py were computed (not a test).

Two steps, in two environments:

1. In the project's venv, build the tiny checkpoint and the test videos:
       .venv/bin/python tests/videoalign_reference.py build /tmp/vr-tiny
2. In a separate venv with VideoAlign's code (github.com/KwaiVGI/VideoAlign at 219ab9db64c045e5181a2202d11f686439351292)
   and its dependencies (used: transformers 4.45.2, peft 0.10.0, trl 0.8.6, decord 0.6.0, torch 2.14.1 CPU), from
   VideoAlign's folder:
       PYTHONPATH=. python /path/to/tests/videoalign_reference.py score /tmp/vr-tiny
   This writes each video losslessly (FFV1, 4 fps), checks that decord decodes it bit for bit, runs
   `inference.VideoVLMRewardInference(<dir>/reward, device="cpu", dtype=torch.float32).reward(...)` and writes
   `<dir>/reference.json`. The one change to VideoAlign's inference: attention "sdpa" instead of
   flash_attention_2 (no flash-attn on a CPU; the same attention function).
"""

from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

FPS = 4
PROMPTS = ["a red ball bounces on a wooden floor", "two green cubes spin slowly", "sun"]


def build(root: Path) -> None:
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from videoreward_tiny import build_tiny_videoreward, tiny_videos

    build_tiny_videoreward(root)
    save_file({f"video{i}": v.contiguous() for i, v in enumerate(tiny_videos())}, str(root / "videos.safetensors"))


def write_lossless(frames, path: Path) -> None:
    """`(T, H, W, 3)` uint8 frames as an FFV1 video at `FPS`."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def score(root: Path) -> None:
    import decord
    import inference  # VideoAlign's inference.py (PYTHONPATH=<VideoAlign folder>)
    import numpy as np
    import torch
    from safetensors.torch import load_file

    videos = load_file(str(root / "videos.safetensors"))
    (root / "videos").mkdir(exist_ok=True)
    paths = []
    for name in sorted(videos):
        frames = videos[name].numpy()
        path = root / "videos" / f"{name}.mkv"
        write_lossless(frames, path)
        reader = decord.VideoReader(str(path))
        assert np.array_equal(reader.get_batch(list(range(len(reader)))).asnumpy(), frames), name
        assert abs(reader.get_avg_fps() - FPS) < 1e-9, reader.get_avg_fps()
        paths.append(str(path))

    original = inference.create_model_and_processor

    def with_sdpa(model_config, peft_lora_config, training_args, **kwargs):
        training_args.disable_flash_attn2 = True
        return original(model_config=model_config, peft_lora_config=peft_lora_config, training_args=training_args,
                        **kwargs)

    inference.create_model_and_processor = with_sdpa
    model = inference.VideoVLMRewardInference(str(root / "reward"), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = {"one_by_one": [model.reward([p], [q], use_norm=True)[0] for p, q in zip(paths, PROMPTS, strict=True)],
               "batch_12": model.reward(paths[1:], PROMPTS[1:], use_norm=True),
               "raw": [model.reward([p], [q], use_norm=False)[0] for p, q in zip(paths, PROMPTS, strict=True)]}
    (root / "reference.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    {"build": build, "score": score}[sys.argv[1]](Path(sys.argv[2]))
