"""SD3-style prompt encoding (CLIP-L + CLIP-G + T5), done once per prompt.

Matches diffusers' `StableDiffusion3Pipeline.encode_prompt` (checked in tests): CLIP penultimate hidden
states of both CLIPs concatenated on features and zero-padded to the T5 width, followed by the T5 tokens
on the sequence axis (CLIP's `model_max_length`, 77 for CLIP, + `max_sequence_length` tokens); pooled =
CLIP-L and CLIP-G projections concatenated. Embeddings depend only on the prompt, so callers cache them per prompt and may `release()`
the encoders afterwards to free their memory before sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rlhf.models.family import PromptEncoding
from rlhf.sampling import PromptEmbeds

DEFAULT_T5_LENGTH = 256  # ContentV's max_sequence_length


class PromptEncoder(PromptEncoding):
    """Owns the three tokenizers and text encoders of an SD3/ContentV checkpoint (the ContentV family's)."""

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence[torch.nn.Module],
        max_sequence_length: int | None = None,
    ):
        if len(tokenizers) != 3 or len(text_encoders) != 3:
            raise ValueError("expected three tokenizers and three text encoders (CLIP-L, CLIP-G, T5)")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        # diffusers' SD3 pipeline pads CLIP to the tokenizer's model_max_length and T5 to max_sequence_length
        # (256 by default); a checkpoint whose T5 tokenizer is shorter (the shapes world's) sets the default.
        self.max_sequence_length = max_sequence_length or min(
            DEFAULT_T5_LENGTH, int(getattr(self.tokenizers[2], "model_max_length", DEFAULT_T5_LENGTH))
        )

    def _ids(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids

    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.text_encoders[index]
        tokenizer = self.tokenizers[index]
        ids = self._ids(tokenizer, prompts, tokenizer.model_max_length).to(self.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds  # (B, L_clip, Dc), (B, Pc)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeddings for `prompts` on the encoders' device, in the encoders' dtype."""
        if not self.text_encoders:
            raise RuntimeError("the text encoders were released; encode prompts before releasing them")
        prompts = [str(p) for p in prompts]
        clip_l, pooled_l = self._clip(0, prompts)
        clip_g, pooled_g = self._clip(1, prompts)
        t5_ids = self._ids(self.tokenizers[2], prompts, self.max_sequence_length).to(self.device)
        t5 = self.text_encoders[2](t5_ids)[0]  # (B, L_t5, D)

        clip = torch.cat([clip_l, clip_g], dim=-1)  # (B, L_clip, Dl + Dg)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, L_clip, D)
        return PromptEmbeds(
            prompt_embeds=torch.cat([clip, t5.to(clip.dtype)], dim=-2),  # (B, L_clip + L_t5, D)
            pooled=torch.cat([pooled_l, pooled_g], dim=-1),  # (B, Pl + Pg)
        )
