"""The tiny ContentV checkpoint: real classes load it, it is deterministic, and its outputs carry signal.

Other tests and the quickstart stand on this model, so what is checked here is what they rely on: the
real checkpoint's layout, loadability with each component's own `from_pretrained`, seed determinism,
and that latents and prompts actually change the outputs (a degenerate model would let broken
conditioning or decoding code pass).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

import rlhf.models.tiny as tiny
from rlhf.errors import UserError
from rlhf.models.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_model
from rlhf.models.transformer import SD3Transformer3DModel

PROMPTS = ["a red fox jumping over the snow", "Two astronauts play chess on the Moon."]
T5_MAX_LENGTH = 256
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "contentv-tiny", seed=0)


def _weight_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.safetensors"))}


def _encode(model_dir: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """SD3-style text encoding: returns (text tokens, pooled, [per-encoder hidden states])."""
    hidden, pooled = [], []
    for suffix in ("", "_2"):
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder=f"tokenizer{suffix}")
        encoder = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder=f"text_encoder{suffix}")
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        output = encoder(ids.input_ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])  # (B, 77, hidden)
        pooled.append(output.text_embeds)  # (B, projection_dim)
    tokenizer_3 = T5TokenizerFast.from_pretrained(model_dir, subfolder="tokenizer_3")
    encoder_3 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_3")
    ids = tokenizer_3(
        prompts,
        padding="max_length",
        max_length=T5_MAX_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    t5_hidden = encoder_3(ids.input_ids).last_hidden_state  # (B, 256, d_model)

    clip_hidden = torch.cat(hidden, dim=-1)  # (B, 77, 8 + 16)
    clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))  # (B, 77, d_model)
    text = torch.cat([clip_hidden, t5_hidden], dim=1)  # (B, 77 + 256, d_model)
    return text, torch.cat(pooled, dim=-1), [*hidden, t5_hidden]


def test_layout_matches_the_real_checkpoint(model_dir: Path) -> None:
    index = json.loads((model_dir / "model_index.json").read_text())
    # Like ContentV-8B's: transformer/ and vae/ exist but are not listed, so loaders must load them by hand.
    assert index == {
        "_class_name": "ContentVPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
    }
    for name in [key for key in index if not key.startswith("_")]:
        assert (model_dir / name).is_dir(), name
    assert (model_dir / "transformer" / "config.json").is_file()
    assert (model_dir / "vae" / "config.json").is_file()

    total = sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())
    assert total < 10 * 2**20
    assert sorted(path.name for path in model_dir.parent.iterdir()) == [model_dir.name]  # no staging left


def test_components_load_with_their_real_classes(model_dir: Path) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    assert scheduler.config.shift == 3.0 and scheduler.config.num_train_timesteps == 1000

    clip_l = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder")
    clip_g = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")
    t5 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_3")
    transformer = SD3Transformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae")

    # The dimensions chain the way ContentV-8B's do.
    assert (
        clip_l.config.projection_dim + clip_g.config.projection_dim
        == transformer.config.pooled_projection_dim
    )
    assert clip_l.config.hidden_size + clip_g.config.hidden_size <= t5.config.d_model
    assert t5.config.d_model == transformer.config.joint_attention_dim
    assert vae.config.z_dim == transformer.config.in_channels == 16
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == 16
    assert list(vae.config.temperal_downsample) == [False, True, True]
    assert {key: transformer.config[key] for key in TINY_TRANSFORMER_CONFIG} == TINY_TRANSFORMER_CONFIG
    for model in (transformer, vae):
        assert {param.dtype for param in model.parameters()} == {torch.float32}


def test_clip_tokenizers_pad_to_77_within_the_vocabulary(model_dir: Path) -> None:
    prompts = [*PROMPTS, "unicode: café, 東京, 🙂", ""]
    for suffix in ("", "_2"):
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder=f"tokenizer{suffix}")
        config = CLIPTextModelWithProjection.config_class.from_pretrained(
            model_dir, subfolder=f"text_encoder{suffix}"
        )
        assert tokenizer.model_max_length == 77
        ids = tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        assert ids.shape == (len(prompts), 77)
        assert 0 <= ids.min() and ids.max() < config.vocab_size
        assert (ids[:, 0] == config.bos_token_id).all()
        assert not torch.equal(ids[0], ids[1])
        # Every byte is in the vocabulary: unicode round-trips instead of collapsing to the unknown token.
        decoded = tokenizer.decode(ids[2], skip_special_tokens=True)
        assert decoded.replace(" ", "") == prompts[2].lower().replace(" ", "")
        # Pooling reads the first EOS: it must be where the prompt ends, and the empty prompt has one too.
        assert ids[3, 1] == config.eos_token_id
        long_ids = tokenizer(["word " * 200], padding="max_length", max_length=77, truncation=True).input_ids
        assert len(long_ids[0]) == 77


def test_t5_tokenizer_pads_to_256(model_dir: Path) -> None:
    tokenizer = T5TokenizerFast.from_pretrained(model_dir, subfolder="tokenizer_3")
    vocab_size = T5EncoderModel.config_class.from_pretrained(model_dir, subfolder="text_encoder_3").vocab_size
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    prompts = [*PROMPTS, "unicode: café, 東京, 🙂", "word " * 300]
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=T5_MAX_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (len(prompts), T5_MAX_LENGTH)
    assert 0 <= ids.min() and ids.max() < vocab_size
    assert not torch.equal(ids[0], ids[1])
    assert ids[0, -1] == tokenizer.pad_token_id and (ids[0] == tokenizer.eos_token_id).sum() == 1
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == PROMPTS[0]


def test_same_seed_gives_identical_weights_and_other_seeds_differ(model_dir: Path, tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG stream is untouched

    assert _weight_files(again) == _weight_files(model_dir)  # byte-identical, every component
    reference = load_file(model_dir / TRANSFORMER_WEIGHTS)
    changed = load_file(other / TRANSFORMER_WEIGHTS)
    assert reference.keys() == changed.keys()
    assert {tensor.dtype for tensor in reference.values()} == {torch.float32}  # stored in float32
    assert not any(torch.equal(reference[key], changed[key]) for key in reference if reference[key].ndim >= 2)


@torch.no_grad()
def test_prompts_and_latents_change_the_outputs(model_dir: Path) -> None:
    text, pooled, hidden_states = _encode(model_dir, PROMPTS)
    assert text.shape == (2, 77 + T5_MAX_LENGTH, TINY_TRANSFORMER_CONFIG["joint_attention_dim"])
    assert pooled.shape == (2, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"])
    for hidden in hidden_states:
        assert not torch.allclose(hidden[0], hidden[1])
    assert not torch.allclose(pooled[0], pooled[1])

    transformer = SD3Transformer3DModel.from_pretrained(model_dir, subfolder="transformer").eval()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 4, generator=generator)  # (B, C, T, H, W)
    timestep = torch.tensor([500.0])

    def velocity(latents: torch.Tensor, index: int) -> torch.Tensor:
        return transformer(latents, text[index : index + 1], pooled[index : index + 1], timestep).sample

    first, second = velocity(latents, 0), velocity(latents, 1)
    assert first.shape == latents.shape
    assert torch.isfinite(first).all() and first.std() > 0.1
    # A clear effect, not float noise: prompt conditioning bugs must show up in tests that use this model.
    assert (first - second).abs().mean() > 0.05 * first.abs().mean()
    other_latents = torch.randn(1, 16, 2, 4, 4, generator=generator)
    assert (velocity(other_latents, 0) - first).abs().mean() > 0.05 * first.abs().mean()


@torch.no_grad()
def test_vae_decodes_latents_to_a_varied_video(model_dir: Path) -> None:
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae").eval()
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    video = vae.decode(latents).sample
    assert video.shape == (1, 3, 5, 32, 32)  # 4x temporal (causal: 1 + 4 * (T - 1)), 8x spatial
    assert torch.isfinite(video).all() and video.std() > 1e-2
    assert video[:, :, 0].std() > 1e-2 and video[:, :, -1].std() > 1e-2  # no blank frames


@torch.no_grad()
def test_loaded_wan_vae_decodes_as_diffusers_does(model_dir: Path) -> None:
    """The loader's CPU-friendly RMS norms (rlhf.models.wan_vae) against diffusers' own classes."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from rlhf.models.contentv import load_wan_vae
    from rlhf.models.wan_vae import cpu_friendly_rms_norm, use_diffusers_norms

    reference = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae").eval()
    loaded = load_wan_vae(model_dir, torch.float32).eval()
    norms = [m for m in loaded.modules() if isinstance(m, WanRMS_norm)]
    assert norms and all(type(m) is cpu_friendly_rms_norm() for m in norms)
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    latents = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded.decode(latents).sample, reference.decode(latents).sample, atol=1e-5, rtol=1e-5)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.testing.assert_close(loaded.encode(video).latent_dist.mean, reference.encode(video).latent_dist.mean,
                               atol=1e-5, rtol=1e-5)
    # Undone (the world's pretraining reproduces its log with diffusers' own norms): bit for bit again.
    assert use_diffusers_norms(loaded) is loaded and all(type(m) is WanRMS_norm for m in norms)
    assert torch.equal(loaded.decode(latents).sample, reference.decode(latents).sample)
    # Each layout the VAE uses (channels first over images and videos, channels last), in float32 and bfloat16,
    # against F.normalize written by hand: x / max(||x||, eps) * sqrt(dim) * gamma + bias.
    for channel_first, images, shape in ((True, True, (2, 8, 5, 6)), (True, False, (2, 8, 3, 5, 6)),
                                         (False, True, (2, 7, 8))):
        for dtype in (torch.float32, torch.bfloat16):
            norm = WanRMS_norm(8, channel_first=channel_first, images=images, bias=True)
            torch.nn.init.normal_(norm.gamma)
            torch.nn.init.normal_(norm.bias)
            x = torch.randn(shape).to(dtype)
            expected = norm(x)
            norm.__class__ = cpu_friendly_rms_norm()
            dim = 1 if channel_first else -1
            by_hand = (x.float() / x.float().norm(dim=dim, keepdim=True).clamp_min(1e-12)).to(dtype) * 8 ** 0.5 \
                * norm.gamma + norm.bias
            torch.testing.assert_close(norm(x), expected)
            torch.testing.assert_close(norm(x), by_hand)


def test_replaces_only_a_model_and_only_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder that is not a model is never replaced
        with pytest.raises(UserError, match="exists and is not a model checkpoint"):
            build_tiny_model(out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]

    (out / "precious.txt").unlink()
    assert build_tiny_model(out) == out
    with pytest.raises(UserError, match="already holds a model checkpoint; pass --overwrite"):
        build_tiny_model(out, seed=1)
    assert build_tiny_model(out, seed=1, overwrite=True) == out
    assert (out / "model_index.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # staging and old copy removed

    empty = tmp_path / "empty"
    empty.mkdir()
    build_tiny_model(empty)  # an empty directory is not "existing work"
    assert (empty / "model_index.json").is_file()

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(UserError, match="must be a directory"):
        build_tiny_model(not_a_dir, overwrite=True)


def test_a_failed_build_leaves_no_partial_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(tiny, "_reinit_", fail)  # fails after every other component was written
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model_index.json").write_text("{}")  # a model: --overwrite would replace it
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_tiny_model(existing, overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["existing"]
    assert (existing / "model_index.json").read_text() == "{}"
