"""Joint (video + text) attention processor with a pluggable attention kernel.

On Ascend NPUs `torch.nn.functional.scaled_dot_product_attention` is slow; ContentV's reference replaces it
with `torch_npu.npu_fusion_attention` (layout BNSD, scale 1/sqrt(head_dim)). `JointAttnProcessor` does the
same projections and QK-norm as diffusers' `JointAttnProcessor2_0` and calls the kernel it was given, so the
NPU path shares every line but the kernel with the path tested on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (query, key, value, heads) -> output, all (B, heads, S, head_dim).
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


def npu_fusion_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    import torch_npu

    # pre/next_tockens = 65536 means "no band mask": full bidirectional attention.
    return torch_npu.npu_fusion_attention(
        query, key, value,
        head_num=heads,
        input_layout="BNSD",
        scale=1.0 / math.sqrt(query.shape[-1]),
        pre_tockens=65536,
        next_tockens=65536,
        keep_prob=1.0,
    )[0]


class JointAttnProcessor:
    """MM-DiT joint attention: project video and text tokens, attend over their concatenation, split."""

    def __init__(self, kernel: AttentionKernel = sdpa_kernel):
        self.kernel = kernel

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch = x.shape[0]
        return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, heads, S, head_dim)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, video_len = hidden_states.shape[:2]
        heads = attn.heads

        # 1. Video-token projections (+ QK-norm).
        query = self._heads(attn.to_q(hidden_states), heads)
        key = self._heads(attn.to_k(hidden_states), heads)
        value = self._heads(attn.to_v(hidden_states), heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 2. Text-token projections, appended after the video tokens.
        if encoder_hidden_states is not None:
            text_query = self._heads(attn.add_q_proj(encoder_hidden_states), heads)
            text_key = self._heads(attn.add_k_proj(encoder_hidden_states), heads)
            text_value = self._heads(attn.add_v_proj(encoder_hidden_states), heads)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        # 3. Attention over all tokens, then back to (B, S, heads*head_dim).
        out = self.kernel(query, key, value, heads)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1]).to(query.dtype)

        # 4. Split video/text and project out.
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, :video_len]))
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states = out[:, video_len:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def use_npu_attention(transformer: torch.nn.Module) -> None:
    """Switch every attention layer of `transformer` to `npu_fusion_attention`."""
    transformer.set_attn_processor(JointAttnProcessor(npu_fusion_kernel))
