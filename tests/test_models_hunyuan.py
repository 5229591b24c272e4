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
"""

import json

import pytest
import torch
import yaml

from rlhf.cli import main
from rlhf.generation import VideoGenerator
from rlhf.models.family import family_for, transformer_family
from rlhf.options import ModelOptions, SamplingOptions
from rlhf.sampling import initial_noise
from tests.conftest import TRAIN_PROMPTS, call_cli

PROMPT = "a red ball rolls over the green grass"
SAMPLING = dict(frames=5, height=64, width=64)  # 2 latent frames of 8 x 8 (VAE 4x8x8, patch 2)
TOLERANCE = 1e-4  # fp32 on CPU: the two paths differ by operation order only


@pytest.fixture(scope="module")
def hunyuan_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hunyuanvideo") / "model"
    assert main(["tiny-model", str(out), "--family", "hunyuanvideo"]) == 0
    return out


@pytest.fixture(scope="module")
def pipe(hunyuan_dir):
    from diffusers import HunyuanVideoPipeline

    pipeline = HunyuanVideoPipeline.from_pretrained(hunyuan_dir, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def ours(model_dir, steps: int, guidance: float, seed: int = 7, adapter=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise, final latents) of our generate/rollout path for PROMPT (no negative prompt: the pipeline's
    true CFG is off)."""
    generator = VideoGenerator(ModelOptions(model=str(model_dir), device="cpu", dtype="fp32", adapter=adapter),
                               load_vae=False)
    sampling = SamplingOptions(**SAMPLING, steps=steps, guidance=guidance, negative_prompt="")
    embeds = generator.encode_prompts([PROMPT, ""])
    latents = generator.sample_latents(embeds.select(0), embeds.select(1), [seed], sampling, progress=False)
    shape = generator.family.latent_shape(sampling.frames, sampling.height, sampling.width,
                                          generator.transformer.config)
    return initial_noise(shape, [seed]), latents


def pipeline_latents(pipeline, noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    return pipeline(prompt=PROMPT, num_frames=SAMPLING["frames"], height=SAMPLING["height"], width=SAMPLING["width"],
                    num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
                    output_type="latent").frames


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

    prompts = [PROMPT, "a cat", ""]
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


# At 3 steps the two differ by up to 1.2e-4 (latents up to 6.5): the scheduler shifts the sigmas in float32, ours in
# float64, and the random tiny transformer amplifies a one-ulp timestep difference. At 4 and 8 steps they are equal.
@pytest.mark.parametrize(("steps", "guidance"), [(4, 6.0), (8, 1.0)])
def test_sampler_equals_hunyuan_pipeline(hunyuan_dir, pipe, steps, guidance):
    noise, latents = ours(hunyuan_dir, steps, guidance)
    expected = pipeline_latents(pipe, noise, steps, guidance)
    assert latents.shape == expected.shape == (1, 16, 2, 8, 8)
    assert (latents - noise).abs().max() > 100 * TOLERANCE  # sampling moved the latents
    torch.testing.assert_close(latents, expected, atol=TOLERANCE, rtol=0)


def test_embedded_guidance_changes_the_samples(hunyuan_dir):
    """Guidance is an input of the distilled transformer: another scale gives other latents, with one forward."""
    _, at_6 = ours(hunyuan_dir, 2, 6.0)
    _, at_2 = ours(hunyuan_dir, 2, 2.0)
    assert (at_6 - at_2).abs().max() > 100 * TOLERANCE


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
def trained(hunyuan_dir, tmp_path_factory):
    """rollout -> score -> pairs -> train -> merge -> eval on the tiny HunyuanVideo model, through the CLI."""
    root = tmp_path_factory.mktemp("hunyuan-run")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    rewards = root / "rewards.yaml"
    rewards.write_text(yaml.safe_dump({"scorers": {"brightness": {"weight": 1.0}}, "device": "cpu"}))
    store, pairs, run, merged, evaluation = (root / n for n in ("store", "pairs", "run", "merged", "eval"))
    size = ["--frames", "5", "--height", "64", "--width", "64", "--dtype", "fp32"]
    commands = [
        ["rollout", "--model", hunyuan_dir, "--prompts", prompts, "--out", store, *size, "--steps", "2",
         "--guidance", "5", "--samples-per-prompt", "2", "--batch-size", "2", "--save-frames", "2"],
        ["score", "--store", store, "--config", rewards],
        ["pairs", "--store", store, "--out", pairs, "--min-margin", "0"],
        ["train", "--pairs", pairs, "--output-dir", run, "--dtype", "fp32", "--mixed-precision", "no",
         "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none", "--no-gradient-checkpointing",
         "--max-steps", "3", "--learning-rate", "0.01", "--batch-size", "2"],
        ["merge", "--model", hunyuan_dir, "--adapter", run / "adapter", "--out", merged],
        ["eval", "--model", hunyuan_dir, "--adapters", run / "adapter", "--prompts", prompts, "--rewards", rewards,
         "--out", evaluation, *size, "--steps", "1", "--seeds", "1", "--batch-size", "2"],
    ]
    for command in commands:
        assert main([str(a) for a in command]) == 0, command[0]
    return store, run / "adapter", merged, evaluation


def test_cli_pipeline_runs_on_hunyuan(trained, hunyuan_dir):
    from rollouts.store import RolloutStore

    store, adapter, _, evaluation = trained
    store = RolloutStore(store)
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

    store = trained[0]
    seen = []
    original = HunyuanVideoFamily.velocity

    def recording(self, model, latents, timestep, text, guidance=None):
        seen.append(guidance)
        return original(self, model, latents, timestep, text, guidance)

    monkeypatch.setattr(HunyuanVideoFamily, "velocity", recording)
    assert main(["train", "--pairs", str(store.parent / "pairs"), "--output-dir", str(tmp_path / "run"), "--dtype",
                 "fp32", "--mixed-precision", "no", "--lora-rank", "2", "--lora-alpha", "2", "--report-to", "none",
                 "--no-gradient-checkpointing", "--max-steps", "1", "--batch-size", "1"]) == 0
    assert seen and set(seen) == {5.0}


def test_merged_and_exported_lora_sample_base_plus_adapter_in_hunyuan_pipeline(hunyuan_dir, trained):
    from diffusers import HunyuanVideoPipeline

    _, adapter, merged, _ = trained
    noise, base = ours(hunyuan_dir, 4, 6.0)
    _, adapted = ours(hunyuan_dir, 4, 6.0, adapter=str(adapter))
    assert (adapted - base).abs().max() > 100 * TOLERANCE  # the adapter changes the samples

    merged_pipe = HunyuanVideoPipeline.from_pretrained(merged, dtype=torch.float32)
    merged_pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipeline_latents(merged_pipe, noise, 4, 6.0), adapted, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(ours(merged, 4, 6.0)[1], adapted, atol=TOLERANCE, rtol=0)

    lora_pipe = HunyuanVideoPipeline.from_pretrained(hunyuan_dir, dtype=torch.float32)
    lora_pipe.set_progress_bar_config(disable=True)
    lora_pipe.load_lora_weights(str(adapter))
    torch.testing.assert_close(pipeline_latents(lora_pipe, noise, 4, 6.0), adapted, atol=TOLERANCE, rtol=0)


def test_adapter_of_one_family_is_refused_by_another(trained, tiny_model_dir, tmp_path, capsys):
    _, adapter, _, _ = trained
    for command in (["generate", "--model", tiny_model_dir, "--adapter", adapter, "--prompt", "x",
                     "--out", tmp_path / "x.mp4", "--frames", "5", "--height", "32", "--width", "32", "--steps", "1"],
                    ["merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", tmp_path / "merged"]):
        code, _, err = call_cli(capsys, *command)
        assert code == 2, err
        line = err.strip()
        assert "\n" not in line and "contentv" in line and "hunyuanvideo" in line and "base_model.json" in line


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


@pytest.mark.parametrize(("config", "sizes"), [
    ("grpo.yaml", dict(max_steps=2, group_size=2, prompts_per_round=1)),
    ("nft.yaml", dict(max_steps=2, group_size=2, prompts_per_round=1)),
    ("reward_gradient.yaml", dict(max_steps=1, gradient_accumulation_steps=1, num_decode_frames=2)),
])
def test_online_trainers_train_a_hunyuan_adapter(hunyuan_dir, tmp_path, config, sizes):
    """The shipped online-trainer configs, sized down, train on the HunyuanVideo model through the interface alone."""
    from safetensors.torch import load_file

    from tests.test_configs import as_run, run

    out = tmp_path / "run"
    run("train", "--config", as_run(config, tmp_path, model=str(hunyuan_dir), output_dir=str(out), frames=5,
                                    height=64, width=64, steps=2, **sizes))
    assert json.loads((out / "adapter" / "base_model.json").read_text())["family"] == "hunyuanvideo"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(family_for(hunyuan_dir).lora_targets)
    lora_b = [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # trained away from the zero init
