"""A tiny, randomly initialised ContentV checkpoint, built offline in about a second.

Tests and the quickstart need a model that goes through exactly the code a real ContentV-8B checkpoint
goes through: the same directory layout (a `model_index.json` that does not list `transformer/` or
`vae/`), the same component classes, loaded with the same `from_pretrained` calls. Mocks would skip the
loading code, and the real weights are ~27 GB. So `build_tiny_model` writes every component with its
real class (CLIP-L/CLIP-G/T5 text encoders and tokenizers, the flow-matching scheduler, the Wan VAE and
our `SD3Transformer3DModel`) at toy sizes, with seeded random weights: a few MB on disk, deterministic
for a seed, and needing no network. The sizes chain the way ContentV-8B's do (pooled CLIP-L + CLIP-G =
`pooled_projection_dim`, CLIP hidden sizes padded up to T5's `d_model` = `joint_attention_dim`), so the
text-encoding code can pad and concatenate as it does for the real model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.utils import logging as transformers_logging

from rlhf.model_defaults import write_model_defaults
from rlhf.models.transformer import SD3Transformer3DModel
from rlhf.options import DEFAULT_NEGATIVE_PROMPT

# `joint_attention_dim` = T5 d_model; `pooled_projection_dim` = CLIP-L + CLIP-G projection dims (8 + 16).
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    joint_attention_dim=32,
    pooled_projection_dim=24,
)

# Wan2.1 VAE at minimum width; the default latents_mean/std and temporal downsampling are kept so latent
# normalisation and the 4k+1 frame arithmetic behave as with the real VAE.
TINY_VAE_CONFIG: dict[str, Any] = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)

# (subfolder, hidden_size = projection_dim) of the CLIP-L and CLIP-G stand-ins.
TINY_CLIP_HIDDEN_SIZES: dict[str, int] = {"text_encoder": 8, "text_encoder_2": 16}

TINY_T5_CONFIG: dict[str, Any] = dict(
    d_model=32,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    d_ff=64,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as XXL
)

CLIP_MAX_LENGTH = 77
T5_MODEL_MAX_LENGTH = 512
SCHEDULER_SHIFT = 3.0
# What `sampling_defaults.json` (rlhf/model_defaults.py) gives every command for a tiny model: sizes that sample in
# a second or two on a CPU, and ContentV's negative prompt (the tiny model stands in for it).
TINY_SAMPLING_DEFAULTS: dict[str, Any] = dict(frames=9, height=64, width=64, steps=8, guidance=4.0,
                                              shift=SCHEDULER_SHIFT, fps=8.0)

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
# A handful of merges so the BPE merge path is exercised, not only the character fallback.
_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]

MODEL_INDEX: dict[str, Any] = {
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


TINY_FAMILIES = ("contentv", "wan2.1", "wan2.2-ti2v", "wan2.2-a14b", "hunyuanvideo")  # families `build_tiny_model` can write


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                     family: str = "contentv") -> Path:
    """Write a complete checkpoint of `family` (ContentV layout by default; `wan2.1`, `wan2.2-ti2v`, `wan2.2-a14b`: WanPipeline's
    layout, rlhf/models/tiny_wan.py; `hunyuanvideo`: HunyuanVideoPipeline's, rlhf/models/tiny_hunyuan.py) with tiny
    random components to `out_dir`.

    The same `seed` gives byte-identical weight files. The caller's global torch RNG state is left as
    it was. The checkpoint is assembled in a temporary sibling directory and renamed into place, so an
    interrupted build never leaves a half-written model at `out_dir`. Returns the absolute path of `out_dir`.

    Raises:
        UserError: `out_dir` is not a directory, holds anything but a model checkpoint, or one without `overwrite`
            (rlhf/outputs.py); a failed write (full disk, permissions).
    """
    from rlhf.errors import UserError
    from rlhf.outputs import MODEL, check_output, staged_dir

    if family not in TINY_FAMILIES:
        raise UserError(f"--family: no tiny model for {family!r} (expected one of {', '.join(TINY_FAMILIES)})")
    out = check_output(out_dir, field="OUT_DIR", kind=MODEL, inputs={}, overwrite=overwrite)
    # fork_rng: seeding must not change the random stream of the caller (e.g. a test's own sampling).
    with staged_dir(out, "the tiny model") as staging, torch.random.fork_rng(devices=[]), \
            _no_transformers_progress_bars():
        if family in ("wan2.1", "wan2.2-ti2v", "wan2.2-a14b"):
            from rlhf.models.tiny_wan import write_tiny_wan

            write_tiny_wan(staging, seed, ti2v=family == "wan2.2-ti2v", a14b=family == "wan2.2-a14b")
        elif family == "hunyuanvideo":
            from rlhf.models.tiny_hunyuan import write_tiny_hunyuan

            write_tiny_hunyuan(staging, seed)
        else:
            _write_checkpoint(staging, seed)
    return out


def _write_checkpoint(root: Path, seed: int) -> None:
    # Each component is seeded on its own so that changing one never changes another's weights.
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT).save_pretrained(
        root / "scheduler"
    )
    write_model_defaults(root, {**TINY_SAMPLING_DEFAULTS, "negative_prompt": DEFAULT_NEGATIVE_PROMPT})

    clip_vocab_size = write_clip_tokenizer(root / "tokenizer")
    write_clip_tokenizer(root / "tokenizer_2")
    for index, (subfolder, hidden_size) in enumerate(TINY_CLIP_HIDDEN_SIZES.items()):
        torch.manual_seed(_component_seed(seed, index))
        random_clip_text_model(clip_vocab_size, hidden_size).save_pretrained(root / subfolder)

    t5_vocab_size = write_t5_tokenizer(root / "tokenizer_3")
    torch.manual_seed(_component_seed(seed, 2))
    T5EncoderModel(T5Config(vocab_size=t5_vocab_size, **TINY_T5_CONFIG)).eval().save_pretrained(
        root / "text_encoder_3"
    )

    torch.manual_seed(_component_seed(seed, 3))
    # The default init already decodes random latents to varied videos, so the VAE keeps it.
    AutoencoderKLWan(**TINY_VAE_CONFIG).save_pretrained(root / "vae")

    transformer = SD3Transformer3DModel(**TINY_TRANSFORMER_CONFIG)
    _reinit_(transformer, torch.Generator().manual_seed(_component_seed(seed, 4)))
    transformer.save_pretrained(root / "transformer", safe_serialization=True)


@contextlib.contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    # transformers' save_pretrained draws a "Writing model shards" bar per model: noise for a 30 kB file.
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _component_seed(seed: int, index: int) -> int:
    return seed * 1000 + index


def write_clip_tokenizer(folder: Path, merges: Sequence[tuple[str, str]] = tuple(_CLIP_MERGES),
                         max_length: int = CLIP_MAX_LENGTH) -> int:
    """Write a byte-level BPE vocabulary in CLIP's format and return its size.

    Every one of the 256 byte-level symbols is in the vocabulary (bare and with `</w>`), so any text,
    unicode included, tokenizes without unknown tokens; `merges` add longer tokens. The specials come
    last, as in CLIP.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    tokens += [merged for merged in dict.fromkeys("".join(pair) for pair in merges) if merged not in tokens]
    tokens += [_CLIP_BOS, _CLIP_EOS]
    vocab = {token: index for index, token in enumerate(tokens)}

    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges_text, encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": _CLIP_BOS,
        "eos_token": _CLIP_EOS,
        "pad_token": _CLIP_EOS,
        "unk_token": _CLIP_EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return len(vocab)


def random_clip_text_model(vocab_size: int, hidden_size: int, max_length: int = CLIP_MAX_LENGTH
                           ) -> CLIPTextModelWithProjection:
    # The specials are the vocabulary's last two ids (see `write_clip_tokenizer`). eos_token_id must not
    # be 2: CLIP treats 2 as "legacy config" and pools at argmax(input_ids) instead of the first EOS.
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        projection_dim=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config).eval()


def write_t5_tokenizer(folder: Path, words: Sequence[str] = (), max_length: int = T5_MODEL_MAX_LENGTH) -> int:
    """Write a character-level T5 tokenizer (`tokenizer.json`) and return its vocabulary size.

    Each of `words` is also one piece (scored above its spelling, so a listed word is one token).

    transformers 5 rebuilds `T5TokenizerFast` as a Unigram model from `tokenizer.json`, so the backend
    must be a Unigram model with a Metaspace pre-tokenizer; ids 0/1/2 are `<pad>`/`</s>`/`<unk>` as in T5.
    """
    characters = [c for c in string.printable if not c.isspace()]
    # "▁x" (-4) beats "▁" + "x" (-6), so a word starts with one piece, as with the real T5 vocabulary.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(c, -3.0) for c in characters] + [("▁" + c, -4.0) for c in characters]
    pieces += [("▁" + word, -1.0) for word in words if len(word) > 1]

    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(folder)
    return len(pieces)


@torch.no_grad()
def _reinit_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter from `generator` so that the output clearly depends on latents and prompt.

    The init is ours rather than the library default so that it cannot silently become degenerate (diffusers
    zero-initialises output layers in some models) and so the prompt matters: matrices get a fan-in scaled
    normal (LeCun), which keeps activations O(1) through the toy-width layers. With it, two prompts change
    the tiny transformer's output by ~35%; PyTorch's default init gives ~5% and a flat std of 0.02 ~2e-4.
    Biases get a small normal and norm scales 1.
    """
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        else:
            param.fill_(1.0)
