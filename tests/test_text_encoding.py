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


def test_max_sequence_length_reaches_t5_like_diffusers(tiny_model_dir):
    """A configured T5 length is what the encoder uses (and equals diffusers' encode_prompt at that length)."""
    from rlhf.generation import VideoGenerator
    from rlhf.options import ModelOptions

    parts = load_contentv(tiny_model_dir, dtype="fp32", load_transformer=False, load_vae=False,
                          max_sequence_length=12)
    ours = parts.prompt_encoder.encode(PROMPTS)
    encoder = parts.prompt_encoder
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=encoder.text_encoders[0], tokenizer=encoder.tokenizers[0],
        text_encoder_2=encoder.text_encoders[1], tokenizer_2=encoder.tokenizers[1],
        text_encoder_3=encoder.text_encoders[2], tokenizer_3=encoder.tokenizers[2],
    )
    embeds, _, _, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                         do_classifier_free_guidance=False, max_sequence_length=12)
    assert ours.prompt_embeds.shape == (2, 77 + 12, 32)
    torch.testing.assert_close(ours.prompt_embeds, embeds)
    # the stages' generator passes the config's value through
    generator = VideoGenerator(ModelOptions(model=str(tiny_model_dir), device="cpu", dtype="fp32"), load_vae=False,
                               max_sequence_length=5)
    assert generator.encode_prompts(PROMPTS).prompt_embeds.shape[1] == 77 + 5
    # unset: ContentV's 256 (the tiny T5 tokenizer allows 512)
    generator = VideoGenerator(ModelOptions(model=str(tiny_model_dir), device="cpu", dtype="fp32"), load_vae=False)
    assert generator.encode_prompts(PROMPTS).prompt_embeds.shape[1] == 77 + 256
