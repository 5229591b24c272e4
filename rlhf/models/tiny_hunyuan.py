"""A tiny, randomly initialised HunyuanVideo checkpoint in `HunyuanVideoPipeline`'s exact folder layout, built
offline.

The folder is written by `HunyuanVideoPipeline.save_pretrained`, so `HunyuanVideoPipeline.from_pretrained` loads it
as it loads the release (`hunyuanvideo-community/HunyuanVideo`). Components are the real classes at toy sizes:
`HunyuanVideoTransformer3DModel` (one dual- and one single-stream block, guidance-embedded as the release), a
4-layer `LlamaModel` with a byte-level BPE tokenizer written offline, a 2-layer `CLIPTextModel` (its
`pooler_output` is the pooled projection) with the tiny CLIP tokenizer of rlhf/models/tiny.py, a tiny
`AutoencoderKLHunyuanVideo` (16 latent channels, 4x8x8, as the release) and a shifted
`FlowMatchEulerDiscreteScheduler`.

The Llama tokenizer is built so that the pipeline's prompt template works on it as on Llama 3's: the template's
text before the prompt is exactly `crop_start` (95) tokens (its pre-tokens are merged whole, in the order of
the real tokenizer's pre-tokenization), so the pipeline's crop removes the system prompt and keeps the user's
tokens. Other text tokenizes to bytes (every byte is in the vocabulary), so any prompt encodes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from rlhf.model_defaults import write_model_defaults

# rope_axes_dim splits attention_head_dim (12) into (t, h, w) = 4 + 4 + 4; text_embed_dim = the Llama hidden size;
# pooled_projection_dim = the CLIP hidden size (HunyuanVideo pools CLIP-L's pooler_output, no projection).
TINY_HUNYUAN_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
    num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=8, rope_axes_dim=(4, 4, 4),
)
# 4 layers: the pipeline takes the hidden states 2 layers below the top (hidden_states[-3]).
TINY_LLAMA_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_HUNYUAN_VAE_CONFIG: dict[str, Any] = dict(
    latent_channels=16, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
)
CLIP_HIDDEN_SIZE = 8
SCHEDULER_SHIFT = 7.0  # the release's flow shift
# Guidance 6 is the pipeline's embedded guidance default.
TINY_HUNYUAN_SAMPLING_DEFAULTS: dict[str, Any] = dict(frames=9, height=64, width=64, steps=8, guidance=6.0,
                                                      shift=SCHEDULER_SHIFT, fps=8.0)

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's header and turn specials, which the pipeline's template uses.
TEMPLATE_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        parts[index:index + 2] = [parts[index] + parts[index + 1]]
    return parts


def build_llama_tokenizer(words_text: str):
    """A byte-level BPE `PreTrainedTokenizerFast` (Llama 3's kind) whose merges make each pre-token of the
    `words_text` one token; it adds `<|begin_of_text|>` in front, as Llama 3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    specials = (BOS, EOS, *TEMPLATE_SPECIALS)
    pieces = [p for p in re.split("|".join(re.escape(s) for s in specials), words_text) if p]
    ranks: dict[tuple[str, str], int] = {}
    for piece in pieces:
        for word, _ in pre.pre_tokenize_str(piece):
            # Merges are appended: a merge added later has a higher rank, so it never changes how an earlier
            # word (already one token through lower-ranked merges) is split.
            parts = _bpe(word, ranks)
            while len(parts) > 1:
                ranks[(parts[0], parts[1])] = len(ranks)
                parts[:2] = [parts[0] + parts[1]]
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in ranks:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab, list(ranks), fuse_unk=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(specials))
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=512)


def write_tiny_hunyuan(root: Path, seed: int) -> None:
    """Write the tiny HunyuanVideo checkpoint into the empty folder `root` (each component seeded on its own)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel

    from rlhf.models.tiny import CLIP_MAX_LENGTH, _component_seed, _reinit_, write_clip_tokenizer

    template, crop_start = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    tokenizer = build_llama_tokenizer(template.replace("{}", ""))
    prefix = len(tokenizer(template.split("{}")[0]).input_ids)
    if prefix != crop_start:  # the pipeline would crop into the prompt, or leave system tokens in
        raise RuntimeError(f"tiny Llama tokenizer: the template before the prompt is {prefix} tokens, not the "
                           f"pipeline's crop_start {crop_start}")
    staging = root / ".clip_tokenizer"
    clip_vocab = write_clip_tokenizer(staging)
    tokenizer_2 = CLIPTokenizer.from_pretrained(staging)

    torch.manual_seed(_component_seed(seed, 0))
    text_encoder = LlamaModel(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          **TINY_LLAMA_CONFIG)).eval()
    torch.manual_seed(_component_seed(seed, 1))
    # The specials are the CLIP vocabulary's last two ids (rlhf.models.tiny.random_clip_text_model's note).
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=CLIP_HIDDEN_SIZE, intermediate_size=2 * CLIP_HIDDEN_SIZE,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1)).eval()
    torch.manual_seed(_component_seed(seed, 2))
    vae = AutoencoderKLHunyuanVideo(**TINY_HUNYUAN_VAE_CONFIG)
    transformer = HunyuanVideoTransformer3DModel(**TINY_HUNYUAN_TRANSFORMER_CONFIG)
    # The tiny ContentV transformer's init (tiny._reinit_): outputs clearly depend on the latents and the prompt.
    _reinit_(transformer, torch.Generator().manual_seed(_component_seed(seed, 3)))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)
    HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                         scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         ).save_pretrained(root, safe_serialization=True)
    for path in sorted(staging.iterdir()):
        path.unlink()
    staging.rmdir()
    # HunyuanVideoPipeline has no negative prompt (true CFG is off by default).
    write_model_defaults(root, {**TINY_HUNYUAN_SAMPLING_DEFAULTS, "negative_prompt": ""})
