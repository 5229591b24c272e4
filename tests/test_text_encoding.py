"""Our prompt encoder equals diffusers' StableDiffusion3Pipeline.encode_prompt on the tiny checkpoint."""

import torch
from diffusers import StableDiffusion3Pipeline

from rlhf.models.loader import load_contentv

PROMPTS = ["a red fox running through snow", "an astronaut riding a horse, 4k"]


def test_prompt_embeddings_equal_sd3_pipeline(tiny_model_dir):
    parts = load_contentv(tiny_model_dir, dtype="fp32", load_transformer=False, load_vae=False)
    encoder = parts.prompt_encoder
    ours = encoder.encode(PROMPTS)

    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=encoder.text_encoders[0], tokenizer=encoder.tokenizers[0],
        text_encoder_2=encoder.text_encoders[1], tokenizer_2=encoder.tokenizers[1],
        text_encoder_3=encoder.text_encoders[2], tokenizer_3=encoder.tokenizers[2],
    )
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=256
    )
    assert ours.prompt_embeds.shape == (2, 77 + 256, 32)
    torch.testing.assert_close(ours.prompt_embeds, embeds)
    torch.testing.assert_close(ours.pooled, pooled)
    assert not torch.allclose(ours.pooled[0], ours.pooled[1])


def test_release_frees_encoders(tiny_model_dir):
    encoder = load_contentv(tiny_model_dir, dtype="fp32", load_transformer=False, load_vae=False).prompt_encoder
    encoder.release()
    assert encoder.text_encoders == []
