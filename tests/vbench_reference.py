"""Reference run: VBench's own code on the frames and weights of tests/vbench_fixtures.py (NOT a test; run it
outside the project with VBench on the path). It printed the numbers recorded in tests/test_vbench.py.

Setup (VBench commit 45e79ec14e69a2187202c675d2dbce1a71843d53, facebookresearch/dino 7c446df5b9f4):

    python3.11 -m venv /tmp/vbench-venv
    echo /path/to/repo/.venv/lib/python3.11/site-packages > /tmp/vbench-venv/lib/python3.11/site-packages/z.pth
    /tmp/vbench-venv/bin/pip install --no-deps openai-clip easydict opencv-python-headless scipy
    git clone https://github.com/Vchitect/VBench /tmp/vbref/vbsrc
    git clone https://github.com/facebookresearch/dino /tmp/vbref/dino
    PYTHONPATH=/tmp/vbref/vbsrc:/tmp/vbref/dino:. OMP_NUM_THREADS=1 /tmp/vbench-venv/bin/python \
        tests/vbench_reference.py /tmp/vbref/out

(torch and torchvision are the project's, via the .pth line, so both sides run the same kernels.) VBench reads
videos with decord and OpenCV; here those two readers are replaced by stand-ins that serve the fixture's uint8
frames (decord's `VideoReader.get_batch` -> RGB, OpenCV's `VideoCapture.read` -> BGR, with the fixture's fps),
so VBench's `load_video`, `get_frames`, transforms and scoring functions run unchanged. decord itself is not
installed (no wheel for this platform is needed: it is never called).
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tests import vbench_fixtures as fx

VIDEOS = {"videos/static.mp4": fx.video(moving=False), "videos/moving.mp4": fx.video(moving=True),
          "videos/static_large.mp4": fx.video(False, fx.LARGE), "videos/moving_large.mp4": fx.video(True, fx.LARGE)}


class _Batch:
    def __init__(self, array):
        self.array = array

    def asnumpy(self):
        return self.array


class _VideoReader:  # decord.VideoReader serving the fixture frames (RGB)
    def __init__(self, path, **_):
        self.frames = VIDEOS[path]

    def __len__(self):
        return len(self.frames)

    def get_batch(self, indices):
        return _Batch(self.frames[list(indices)])


sys.modules["decord"] = types.SimpleNamespace(VideoReader=_VideoReader, cpu=lambda *_: None,
                                              bridge=types.SimpleNamespace(set_bridge=lambda *_: None))

import cv2  # noqa: E402


class _VideoCapture:  # cv2.VideoCapture serving the fixture frames (BGR, like OpenCV)
    def __init__(self, path):
        self.frames, self.index = list(VIDEOS[path][..., ::-1].copy()), 0

    def isOpened(self):  # noqa: N802 (OpenCV's name)
        return True

    def read(self):
        if self.index >= len(self.frames):
            return False, None
        self.index += 1
        return True, self.frames[self.index - 1]

    def get(self, prop):
        assert prop == cv2.CAP_PROP_FPS
        return float(fx.FPS)

    def release(self):
        pass


cv2.VideoCapture = _VideoCapture


def main(out: Path) -> None:
    import clip
    import vision_transformer as dino_vits  # facebookresearch/dino
    from easydict import EasyDict
    from vbench import (
        aesthetic_quality,
        background_consistency,
        dynamic_degree,
        subject_consistency,
        temporal_flickering,
    )
    from vbench.third_party.RAFT.core.raft import RAFT

    from rlhf.vbench.dynamic import original_to_torchvision

    out.mkdir(parents=True, exist_ok=True)
    clip_path = fx.write_tiny_clip(out / "clip.pt")
    (out / "aesthetic").mkdir(exist_ok=True)
    head_path = fx.write_aesthetic_head(out / "head.pth")
    shutil.copy(head_path, out / "aesthetic" / "sa_0_4_vit_l_14_linear.pth")
    dino_path = fx.write_tiny_dino(out / "dino.pth")
    raft_tv = torch.load(fx.write_tiny_raft(out / "raft_torchvision.pth"), weights_only=True)
    names = list(VIDEOS)
    results = {}

    _, per_video = temporal_flickering.temporal_flickering(names)
    results["temporal_flickering"] = [r["video_results"] for r in per_video]

    # clip.load's own fallback for a state-dict file (after torch.jit.load fails), which it cannot reach with
    # torch 2.14 (it re-reads the file object jit.load left at its end): build_model, float32 on the CPU.
    model = clip.model.build_model(torch.load(clip_path, map_location="cpu")).float().eval()
    preprocess = clip.clip._transform(model.visual.input_resolution)  # only used for read_frame=True
    _, per_video = background_consistency.background_consistency(model, preprocess, names, "cpu", False)
    results["background_consistency"] = [r["video_results"] for r in per_video]
    head = aesthetic_quality.get_aesthetic_model(str(out / "aesthetic"))
    _, per_video = aesthetic_quality.laion_aesthetic(head, model, names, "cpu")
    results["aesthetic_quality"] = [r["video_results"] for r in per_video]

    dino = dino_vits.VisionTransformer(patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=4,
                                       qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    dino.load_state_dict(torch.load(dino_path, weights_only=True))
    _, per_video = subject_consistency.subject_consistency(dino.eval(), names, "cpu", False)
    results["subject_consistency"] = [r["video_results"] for r in per_video]

    # The torchvision fixture in the original RAFT's names (norm3 is the same module as downsample.1).
    args = EasyDict(small=False, mixed_precision=False, alternate_corr=False)
    original = {}
    for key in RAFT(args).state_dict():
        source = key.replace(".norm3.", ".downsample.1.")
        original["module." + key] = raft_tv[next(iter(original_to_torchvision({source: None})))]
    torch.save(original, out / "raft-things-tiny.pth")
    dynamic = dynamic_degree.DynamicDegree(EasyDict(model=str(out / "raft-things-tiny.pth"), **args), "cpu")
    pair_scores, get_score = [], dynamic.get_score
    dynamic.get_score = lambda img, flo: pair_scores.append(get_score(img, flo)) or pair_scores[-1]
    results["dynamic_degree_pairs"] = []
    results["dynamic_degree"] = []
    for name in names:
        pair_scores.clear()
        results["dynamic_degree"].append(float(dynamic.infer(name)))
        results["dynamic_degree_pairs"].append(list(pair_scores))
    print(json.dumps({"videos": names, **results}, indent=1))
    np.save(out / "done.npy", np.ones(1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
