"""The HunyuanVideo family on its tiny checkpoint, against diffusers' own `HunyuanVideoPipeline`.

- the folder `tiny-model --family hunyuanvideo` writes is HunyuanVideoPipeline's: `from_pretrained` loads it, and its
  Llama tokenizer turns the pipeline's template before the prompt into exactly `crop_start` tokens;
- our sigmas, prompt embeddings (Llama states, token mask, CLIP pooled) and final latents equal the pipeline's
  (fp32, same prompt, noise, steps and embedded guidance);
- rollout -> score -> pairs -> train -> merge -> eval run on it through the CLI (the store caches the token mask);
  the merged folder loads in HunyuanVideoPipeline and samples what base + adapter samples through our sampler, and
  the exported LoRA loads with `HunyuanVideoPipeline.load_lora_weights` and samples the same;
- an adapter trained on HunyuanVideo is refused by a ContentV base (exit 2, one line naming both families);
- the online trainers (reward_gradient, grpo, nft) train a HunyuanVideo adapter; the differentiable frame decode
  equals the same frames of the whole clip's decode.
SFT, online DPO, eval -> report and the compare page's sampler run on it in tests/test_family_stages.py; the helpers
shared with the other family files are in tests/family_checks.py.
"""

import json

import pytest
import torch

from rlhf.cli import main
from rlhf.models.family import family_for, transformer_family
from tests import family_checks as checks
from tests.conftest import TRAIN_PROMPTS


def hunyuan_sampling(steps: int, guidance: float) -> checks.Sampling:
    """No negative prompt: the pipeline's true CFG is off (the guidance is embedded). At SAMPLING's size: 2 latent
    frames of 8 x 8 (VAE 4x8x8, patch 2)."""
    return checks.Sampling(steps, guidance, negative=None)


@pytest.fixture(scope="module")
def hunyuan_dir(family_model):
    return family_model("hunyuanvideo")


@pytest.fixture(scope="module")
def pipe(hunyuan_dir):
    from diffusers import HunyuanVideoPipeline

    return checks.load_pipeline(HunyuanVideoPipeline, hunyuan_dir)


def test_layout_is_hunyuan_pipelines_and_the_family_is_read_from_it(hunyuan_dir, pipe):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    index = json.loads((hunyuan_dir / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoPipeline"
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
            "scheduler"} <= index.keys()
    assert (type(pipe.transformer).__name__, type(pipe.vae).__name__, type(pipe.text_encoder).__name__,
            type(pipe.text_encoder_2).__name__) == ("HunyuanVideoTransformer3DModel", "AutoencoderKLHunyuanVideo",
                                                    "LlamaModel", "CLIPTextModel")
    assert family_for(hunyuan_dir).name == transformer_family(pipe.transformer).name == "hunyuanvideo"
    # The template's text before the prompt is exactly the pipeline's crop: what it cuts is the system prompt.
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    assert len(pipe.tokenizer(template.split("{}")[0]).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    size = sum(f.stat().st_size for f in hunyuan_dir.rglob("*") if f.is_file())
    assert size < 3e6, size


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_sigmas_are_the_hunyuan_pipelines(hunyuan_dir, pipe, steps):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])  # what HunyuanVideoPipeline passes
    schedule = family_for(hunyuan_dir).schedule(hunyuan_dir)
    assert schedule.shift == 7.0
    torch.testing.assert_close(schedule.sigmas(steps), scheduler.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.timesteps(schedule.sigmas(steps)), scheduler.timesteps, atol=1e-3, rtol=0)


def test_prompt_embeddings_mask_and_pooled_are_hunyuan_pipelines(hunyuan_dir, pipe):
    from rlhf.models.loader import load_model

    prompts = [checks.PROMPT, "a cat", ""]
    encoder = load_model(hunyuan_dir, dtype="fp32", load_transformer=False, load_vae=False).prompt_encoder
    embeds = encoder.encode(prompts)
    with torch.no_grad():
        tokens, pooled, mask = pipe.encode_prompt(prompts, device="cpu")  # max_sequence_length 256, as __call__
    assert embeds.prompt_embeds.shape == (3, 256, 32) and embeds.pooled.shape == (3, 8)
    torch.testing.assert_close(embeds.prompt_embeds, tokens, atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds.pooled, pooled, atol=1e-6, rtol=0)
    assert torch.equal(embeds.mask, mask)
    assert embeds.mask.sum(1).tolist()[1] < embeds.mask.sum(1).tolist()[0]  # a shorter prompt, fewer tokens
    assert (embeds.pooled[0] - embeds.pooled[1]).abs().max() > 1e-3  # the prompt reaches the pooled projection


# 3 steps: the step count at which shifting the sigmas in float64 (not float32, as the scheduler does) put the
# final latents 1.2e-4 from the pipeline's.
@pytest.mark.parametrize(("steps", "guidance"), [(3, 6.0), (4, 6.0), (8, 1.0)])
def test_sampler_equals_hunyuan_pipeline(hunyuan_dir, pipe, steps, guidance):
    sampling = hunyuan_sampling(steps, guidance)
    noise, latents = sampling.ours(hunyuan_dir)
    expected = sampling.pipeline(pipe, noise)
    assert latents.shape == expected.shape == (1, 16, 2, 8, 8)
    assert (latents - noise).abs().max() > 100 * checks.TOLERANCE  # sampling moved the latents
    torch.testing.assert_close(latents, expected, atol=checks.TOLERANCE, rtol=0)


def test_embedded_guidance_changes_the_samples(hunyuan_dir):
    """Guidance is an input of the distilled transformer: another scale gives other latents, with one forward."""
    _, at_6 = hunyuan_sampling(2, 6.0).ours(hunyuan_dir)
    _, at_2 = hunyuan_sampling(2, 2.0).ours(hunyuan_dir)
    assert (at_6 - at_2).abs().max() > 100 * checks.TOLERANCE


def test_differentiable_frame_decode_is_the_whole_clips(hunyuan_dir):
    from dpo.reward_gradient import decode_video_frames
    from rlhf.models.loader import load_model

    parts = load_model(hunyuan_dir, dtype="fp32", load_transformer=False, load_text_encoders=False)
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    whole = (parts.family.decode(parts.vae, latents.detach()).float() + 1) / 2  # (1, 3, 9, 64, 64)
    for frames, checkpoint in (([0], False), ([0, 4], True), ([2, 8], False)):
        video = decode_video_frames(parts.vae, latents, frames, checkpoint=checkpoint)
        assert video.shape == (1, len(frames), 3, 64, 64)
        torch.testing.assert_close(video.detach(), whole[:, :, frames].permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)
    video.mean().backward()
    assert latents.grad.abs().sum() > 0  # differentiable
    # Why the whole clip: the VAE's GroupNorms span all frames, so decoding a latent prefix gives other frames.
    prefix = (parts.family.decode(parts.vae, latents.detach()[:, :, :1]).float() + 1) / 2
    assert (prefix[:, :, 0] - whole[:, :, 0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def trained(family_run):
    """rollout (at guidance 5) -> score -> pairs -> train -> merge -> eval on the tiny HunyuanVideo model, through
    the CLI."""
    return family_run("hunyuanvideo")


def test_cli_pipeline_runs_on_hunyuan(trained, hunyuan_dir):
    from rollouts.store import RolloutStore

    adapter, evaluation = trained.adapter, trained.evaluation
    store = RolloutStore(trained.store)
    assert store.settings["family"] == "hunyuanvideo"
    embeds = store.load_embeds("p00000")
    assert embeds.prompt_embeds.shape == (1, 256, 32) and embeds.pooled.shape == (1, 8)
    encoder = family_for(hunyuan_dir).load_prompt_encoder(hunyuan_dir, torch.float32, torch.device("cpu"), None)
    assert torch.equal(embeds.mask, encoder.encode([TRAIN_PROMPTS[0]]).mask)  # the token mask is cached
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(family_for(hunyuan_dir).lora_targets)
    assert json.loads((adapter / "base_model.json").read_text())["family"] == "hunyuanvideo"
    assert (evaluation / "eval.json").is_file()


def test_trainers_embed_the_guidance_the_samples_were_drawn_at(trained, tmp_path, monkeypatch):
    """DPO on a store sampled at guidance 5 embeds 5 in every forward (policy and reference), not the default 6."""
    from rlhf.models.hunyuan import HunyuanVideoFamily

    seen = []
    original = HunyuanVideoFamily.velocity

    def recording(self, model, latents, timestep, text, guidance=None):
        seen.append(guidance)
        return original(self, model, latents, timestep, text, guidance)

    monkeypatch.setattr(HunyuanVideoFamily, "velocity", recording)
    assert main(["train", "--pairs", str(trained.pairs), "--output-dir", str(tmp_path / "run"), "--dtype",
                 "fp32", "--mixed-precision", "no", "--lora-rank", "2", "--lora-alpha", "2", "--report-to", "none",
                 "--no-gradient-checkpointing", "--max-steps", "1", "--batch-size", "1"]) == 0
    assert seen and set(seen) == {5.0}


def test_merged_and_exported_lora_sample_base_plus_adapter_in_hunyuan_pipeline(hunyuan_dir, trained):
    from diffusers import HunyuanVideoPipeline

    checks.check_merged_and_exported_lora(HunyuanVideoPipeline, hunyuan_dir, trained, hunyuan_sampling(4, 6.0))


def test_adapter_of_one_family_is_refused_by_another(trained, tiny_model_dir, tmp_path, capsys):
    checks.check_refused(capsys, trained.adapter, tiny_model_dir, tmp_path, ("contentv", "hunyuanvideo"), height=32)


def test_a_folder_without_sampling_defaults_gets_the_pipelines(hunyuan_dir, tmp_path):
    import shutil

    from rlhf.model_defaults import defaults_for
    from rlhf.options import VideoOptions

    folder = shutil.copytree(hunyuan_dir, tmp_path / "hunyuan")
    (folder / "sampling_defaults.json").unlink()
    source, values = defaults_for(VideoOptions, {"model": str(folder)})
    assert "hunyuanvideo" in source
    assert {k: values[k] for k in ("frames", "height", "width", "steps", "guidance")} == dict(
        frames=129, height=720, width=1280, steps=50, guidance=6.0)


@checks.ONLINE_TRAINERS
def test_online_trainers_train_a_hunyuan_adapter(hunyuan_dir, tmp_path, config, sizes):
    """The shipped online-trainer configs, sized down, train on the HunyuanVideo model through the interface alone."""
    checks.check_trained_adapter(checks.train_online_config(hunyuan_dir, tmp_path, config, sizes), "hunyuanvideo")
