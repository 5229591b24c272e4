"""`clip` and `aesthetic` scorers against open_clip computations written out here, on tiny random CLIPs.

Every model is built in the test (rewards-facts' 1.7 M-parameter architecture), saved to a file and
loaded back through the scorers' real loading path; nothing is downloaded.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewards.aesthetic import AestheticHead, AestheticOptions, AestheticScorer, load_head
from rewards.build import build_scorers
from rewards.clip import ClipOptions, ClipScorer
from rewards.clip_backbone import is_torchscript
from rewards.consistency import ConsistencyOptions, ConsistencyScorer
from rlhf.config import ConfigError
from rlhf.errors import UserError

TINY = "rewards-test-tiny-clip"
TINY_CFG = {"embed_dim": 32, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
# OpenAI's TorchScript loader infers heads = width // 64, so its tiny stand-in uses widths of 64.
TINY_OPENAI = "rewards-test-tiny-openai"
TINY_OPENAI_CFG = {"embed_dim": 32, "quick_gelu": True,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 64, "patch_size": 8},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red fox running through snow", "a cat on a sofa", "a red fox running through snow"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """(model, state-dict file) of a tiny random CLIP registered with open_clip as `TINY`."""
    folder = tmp_path_factory.mktemp("clip")
    for name, cfg in ((TINY, TINY_CFG), (TINY_OPENAI, TINY_OPENAI_CFG)):
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    torch.save(model.state_dict(), folder / "tiny.pt")
    return model, folder / "tiny.pt"


def frames_for_test(batch=3, length=10, height=48, width=64, seed=0):
    return torch.rand(batch, length, 3, height, width, generator=torch.Generator().manual_seed(seed))


def reference_image_embeddings(model, frames, indices, mean=OPENAI_MEAN, std=OPENAI_STD, size=32):
    """open_clip's eval transform written out on tensors: shorter side -> size (bicubic, antialias),
    centre crop, clamp, normalise; then `encode_image(normalize=True)`. Returns (B, N, D)."""
    picked = frames[:, indices].flatten(0, 1)
    height, width = picked.shape[-2:]
    new = (size, int(size * width / height)) if height <= width else (int(size * height / width), size)
    x = F.interpolate(picked, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return model.encode_image(x, normalize=True).view(frames.shape[0], len(indices), -1)


def reference_clip_score(model, arch, frames, prompts, indices, **preprocess):
    images = reference_image_embeddings(model, frames, indices, **preprocess)
    texts = model.encode_text(open_clip.get_tokenizer(arch)(prompts), normalize=True)
    return torch.einsum("bnd,bd->bn", images, texts).mean(1)


def head_state(dim, seed=0):
    """A state dict with the published improved-aesthetic-predictor keys and shapes (for input `dim`)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {0: (1024, dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for index, (out_features, in_features) in shapes.items():
        state[f"layers.{index}.weight"] = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(out_features, generator=generator) * 0.1
    return state


def reference_head(state, embeddings):
    """The published MLP has no activations: five affine maps in a row."""
    x = embeddings
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x.squeeze(-1)


# --- clip --------------------------------------------------------------------------------------------


def test_clip_score_matches_open_clip_written_out(clip_files):
    model, path = clip_files
    scorer = ClipScorer(ClipOptions(checkpoint=str(path), arch=TINY, num_frames=4))
    frames = frames_for_test()
    expected = reference_clip_score(model, TINY, frames, PROMPTS, [0, 3, 5, 8])  # VBench middles of 10 frames
    scores = scorer(frames, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores[0] != scores[1]


def test_clip_gradients_reach_the_sampled_frames(clip_files):
    _, path = clip_files
    scorer = ClipScorer(ClipOptions(checkpoint=str(path), arch=TINY, num_frames=4))
    frames = frames_for_test(batch=2).requires_grad_()
    scorer(frames, PROMPTS[:2]).sum().backward()
    grad = frames.grad.abs().sum(dim=(0, 2, 3, 4))  # per frame index
    assert torch.isfinite(frames.grad).all() and scorer.differentiable
    assert (grad[[0, 3, 5, 8]] > 0).all() and grad[[1, 2, 4, 6, 7, 9]].sum() == 0
    assert all(not p.requires_grad for p in scorer.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_clip_loads_openai_torchscript_archives(clip_files, tmp_path):
    """OpenAI's ViT-L-14.pt is TorchScript with fp16 weights; a tiny archive of the same kind."""
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPENAI).eval().half().float()  # fp16 values, like OpenAI's file
    archive = nn.Module()
    for key, value in model.state_dict().items():
        *parents, leaf = key.split(".")
        node = archive
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_buffer(leaf, value.half().clone())
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(archive).save(str(path))
    assert is_torchscript(path) and not is_torchscript(clip_files[1])

    scorer = ClipScorer(ClipOptions(checkpoint=str(path), arch=TINY_OPENAI, num_frames=3))
    frames = frames_for_test(batch=2, length=6)
    expected = reference_clip_score(model, TINY_OPENAI, frames, PROMPTS[:2], [0, 2, 4])
    torch.testing.assert_close(scorer(frames, PROMPTS[:2]), expected, atol=1e-4, rtol=1e-4)


def test_clip_loads_local_dir_folders_with_their_preprocessing(clip_files, tmp_path):
    from safetensors.torch import save_file

    model, _ = clip_files
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": list(mean), "std": list(std)}}))
    with pytest.raises(UserError, match="no .safetensors/.bin/.pth weights"):
        ClipScorer(ClipOptions(checkpoint=f"local-dir:{tmp_path}"))
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    scorer = ClipScorer(ClipOptions(checkpoint=f"local-dir:{tmp_path}", num_frames=2))
    frames = frames_for_test(batch=2, length=4)
    expected = reference_clip_score(model, TINY, frames, PROMPTS[:2], [0, 2], mean=mean, std=std)
    torch.testing.assert_close(scorer(frames, PROMPTS[:2]), expected, atol=1e-5, rtol=1e-5)


def test_clip_load_errors_are_user_errors(clip_files, tmp_path):
    _, path = clip_files
    with pytest.raises(UserError, match=r"arch: unknown open_clip architecture 'ViT-L-14-quickgleu'; did you mean "):
        ClipScorer(ClipOptions(checkpoint=str(path), arch="ViT-L-14-quickgleu"))
    with pytest.raises(UserError, match=r"checkpoint: cannot load .*tiny\.pt as open_clip 'ViT-B-32-quickgelu' "
                                        r"\(.*\); check that arch matches the weights"):
        ClipScorer(ClipOptions(checkpoint=str(path), arch="ViT-B-32-quickgelu"))
    with pytest.raises(UserError, match=r"checkpoint: .*not a folder with open_clip_config\.json"):
        ClipScorer(ClipOptions(checkpoint=f"local-dir:{tmp_path}"))


# --- aesthetic ---------------------------------------------------------------------------------------


def test_aesthetic_head_loads_the_published_mlp_state_dict(tmp_path):
    state = head_state(768)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head = load_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert head.kind == "improved-mlp" and head.in_features == 768
    assert set(head.state_dict()) == set(state)  # same key names as the published file
    embeddings = F.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(1)), dim=-1)
    torch.testing.assert_close(head(embeddings), reference_head(state, embeddings), atol=1e-5, rtol=1e-5)
    head.train()
    assert not head.training and head(embeddings).equal(head(embeddings))  # dropout never active


def test_aesthetic_head_v1_linear_and_bad_files(tmp_path):
    weight, bias = torch.randn(1, 768), torch.randn(1)
    torch.save({"weight": weight, "bias": bias}, tmp_path / "sa_0_4_vit_l_14_linear.pth")
    head = load_head(tmp_path / "sa_0_4_vit_l_14_linear.pth")
    embedding = F.normalize(torch.randn(2, 768), dim=-1)
    assert head.kind == "v1-linear"
    torch.testing.assert_close(head(embedding), (embedding @ weight.T + bias).squeeze(-1))
    with pytest.raises(UserError, match=r"not a LAION aesthetic head: expected the keys .* found fc\.bias, fc\.weight"):
        AestheticHead.from_state_dict({"fc.weight": weight, "fc.bias": bias})
    broken = head_state(768)
    broken["layers.2.weight"] = torch.zeros(128, 999)
    with pytest.raises(UserError, match="not a LAION aesthetic head"):
        AestheticHead.from_state_dict(broken)
    broken = head_state(768)
    broken["layers.7.weight"], broken["layers.7.bias"] = torch.zeros(2, 16), torch.zeros(2)
    with pytest.raises(UserError, match="the last layer has 2 outputs, expected 1"):
        AestheticHead.from_state_dict(broken)
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(UserError, match=r"head: cannot read .*text\.pth as a state dict"):
        load_head(tmp_path / "text.pth")


def test_aesthetic_scorer_end_to_end_shares_the_clip_tower(clip_files, tmp_path):
    model, path = clip_files
    state = head_state(TINY_CFG["embed_dim"])
    torch.save(state, tmp_path / "head.pth")
    scorers = build_scorers({"device": "cpu", "scorers": {
        "clip": {"arch": TINY, "checkpoint": str(path), "num_frames": 4},
        "aesthetic": {"weight": 0.5, "head": str(tmp_path / "head.pth"), "clip_arch": TINY,
                      "clip_checkpoint": str(path), "num_frames": 4},
    }})
    aesthetic = scorers["aesthetic"].scorer
    assert aesthetic.backbone is scorers["clip"].scorer.backbone  # one CLIP for both
    assert aesthetic.head_kind == "improved-mlp" and aesthetic.info()["head_kind"] == "improved-mlp"
    frames = frames_for_test()
    embeddings = reference_image_embeddings(model, frames, [0, 3, 5, 8])  # (B, N, D)
    expected = reference_head(state, embeddings).mean(1)
    torch.testing.assert_close(aesthetic(frames, PROMPTS), expected, atol=1e-5, rtol=1e-5)

    frames.requires_grad_()
    aesthetic(frames, PROMPTS).sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


def test_aesthetic_rejects_a_head_of_another_width(clip_files, tmp_path):
    _, path = clip_files
    torch.save(head_state(768), tmp_path / "head.pth")
    options = AestheticOptions(head=str(tmp_path / "head.pth"), clip_arch=TINY, clip_checkpoint=str(path))
    with pytest.raises(UserError, match=r"takes 768-d embeddings but rewards-test-tiny-clip gives 32-d; "
                                        r"the LAION heads need OpenAI CLIP ViT-L/14"):
        AestheticScorer(options)


def test_consistency_is_vbench_formula_on_the_clip_embeddings(clip_files):
    model, path = clip_files
    scorer = ConsistencyScorer(ConsistencyOptions(checkpoint=str(path), arch=TINY, num_frames=4))
    frames = frames_for_test()
    frames[2] = frames[2, :1]  # a still video: every frame the same
    with torch.no_grad():
        embeddings = reference_image_embeddings(model, frames, [0, 3, 5, 8])  # (B, N, D), unit length
    expected = torch.zeros(3)
    for video in range(3):  # VBench: mean over i >= 1 of (max(0, cos(e_{i-1}, e_i)) + max(0, cos(e_0, e_i))) / 2
        e = embeddings[video]
        terms = [(max(0.0, float(e[i - 1] @ e[i])) + max(0.0, float(e[0] @ e[i]))) / 2 for i in range(1, 4)]
        expected[video] = sum(terms) / len(terms)
    scores = scorer(frames, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores[2] == pytest.approx(1.0, abs=1e-5) and scores[0] < 1 - 1e-3  # still > changing
    assert scorer.frame_positions(10) == [0, 3, 5, 8]

    frames = frames_for_test(batch=2).requires_grad_()
    scorer(frames, PROMPTS[:2]).sum().backward()
    grad = frames.grad.abs().sum(dim=(0, 2, 3, 4))
    assert scorer.differentiable and (grad[[0, 3, 5, 8]] > 0).all() and grad[[1, 2, 4, 6, 7, 9]].sum() == 0


def test_consistency_shares_the_clip_tower_and_refuses_one_frame(clip_files):
    _, path = clip_files
    scorers = build_scorers({"device": "cpu", "scorers": {
        "clip": {"arch": TINY, "checkpoint": str(path), "num_frames": 4},
        "consistency": {"weight": 0.0, "arch": TINY, "checkpoint": str(path)},
    }})
    assert scorers["consistency"].scorer.backbone is scorers["clip"].scorer.backbone
    with pytest.raises(ConfigError, match="num_frames.*>= 2"):
        ConsistencyOptions(checkpoint=str(path), arch=TINY, num_frames=1)
