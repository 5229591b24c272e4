"""The Wan families (Wan2.1 T2V, Wan2.2 TI2V-5B) on their tiny checkpoints, against diffusers' own `WanPipeline`.

- the folder `tiny-model --family wan2.1` writes is WanPipeline's: `WanPipeline.from_pretrained` loads it;
- our sigmas, prompt embeddings and final latents equal WanPipeline's (fp32, same prompt, noise, steps, guidance);
- rollout -> score -> pairs -> train -> merge -> eval run on it through the CLI; the merged folder loads in
  WanPipeline and samples what base + adapter samples through our sampler, and the exported LoRA loads with
  `WanPipeline.load_lora_weights` and samples the same;
- an adapter trained on Wan is refused by a ContentV base (exit 2, one line naming both families);
- the online trainers train on it, and Flow-DPO on an int8 base (Wan2.1).
Every test runs for both families (the module's `wan_dir` is parametrised): Wan2.2 TI2V differs in its VAE (48
channels, 16x spatial) and in WanPipeline's `expand_timesteps` (one timestep per latent token). SFT, online DPO,
eval -> report and the compare page's sampler run on every family in tests/test_family_stages.py; the helpers shared
with the other family files are in tests/family_checks.py.
"""

import json

import pytest
import torch

from rlhf.models.family import family_for, transformer_family
from tests import family_checks as checks
from tests.conftest import call_cli

# family -> (latent channels, spatial compression) of its VAE
VAES = {"wan2.1": (16, 8), "wan2.2-ti2v": (48, 16)}


@pytest.fixture(scope="module", params=list(VAES))
def wan_dir(request, family_model):
    return family_model(request.param)


@pytest.fixture(scope="module")
def pipe(wan_dir):
    from diffusers import WanPipeline

    return checks.load_pipeline(WanPipeline, wan_dir)


def test_layout_is_wan_pipelines_and_the_family_is_read_from_it(wan_dir, tiny_model_dir, pipe):
    index = json.loads((wan_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= index.keys()
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"
    family = family_for(wan_dir).name
    assert index["expand_timesteps"] == (family == "wan2.2-ti2v")
    assert transformer_family(pipe.transformer).name == family  # told apart by the transformer's channels
    assert (pipe.vae.config.z_dim, pipe.vae.config.scale_factor_spatial) == VAES[family]
    assert family_for(tiny_model_dir).name == "contentv"


def test_a_boundary_ratio_makes_a_two_expert_folder(wan_dir, tmp_path):
    """An index with boundary_ratio is Wan2.2 A14B's (tests/test_models_wan22_a14b.py); without transformer_2 it
    names the missing expert."""
    import shutil

    from rlhf.errors import UserError
    from rlhf.models.loader import check_model_dir

    folder = shutil.copytree(wan_dir, tmp_path / "a14b")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    assert family_for(folder).name == "wan2.2-a14b"
    with pytest.raises(UserError, match="transformer_2/config.json: missing"):
        check_model_dir(folder)


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_sigmas_are_the_wan_schedulers(wan_dir, pipe, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    schedule = family_for(wan_dir).schedule(wan_dir)
    torch.testing.assert_close(schedule.sigmas(steps), scheduler.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.timesteps(schedule.sigmas(steps)), scheduler.timesteps, atol=1e-3, rtol=0)


def test_prompt_embeddings_are_wan_pipelines(wan_dir, pipe):
    from rlhf.models.loader import load_model

    encoder = load_model(wan_dir, dtype="fp32", load_transformer=False, load_vae=False).prompt_encoder
    embeds = encoder.encode([checks.PROMPT, checks.NEGATIVE])
    cond, uncond = pipe.encode_prompt(checks.PROMPT, checks.NEGATIVE, do_classifier_free_guidance=True, device="cpu",
                                     max_sequence_length=512)  # WanPipeline.__call__'s default
    assert embeds.pooled is None  # Wan has no pooled embedding
    torch.testing.assert_close(embeds.prompt_embeds, torch.cat([cond, uncond]), atol=1e-6, rtol=0)
    assert embeds.prompt_embeds[0, 40:].abs().max() == 0  # zero after the prompt's tokens, as WanPipeline pads


@pytest.mark.parametrize(("steps", "guidance"), [(4, 4.0), (3, 1.0)])
def test_sampler_equals_wan_pipeline(wan_dir, pipe, steps, guidance):
    sampling = checks.Sampling(steps, guidance)
    noise, latents = sampling.ours(wan_dir)
    expected = sampling.pipeline(pipe, noise)
    channels, factor = VAES[family_for(wan_dir).name]
    assert latents.shape == expected.shape == (1, channels, 2, 64 // factor, 64 // factor)
    assert (latents - noise).abs().max() > 100 * checks.TOLERANCE  # sampling moved the latents
    torch.testing.assert_close(latents, expected, atol=checks.TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def trained(wan_dir, family_run):
    """rollout -> score -> pairs -> train -> merge -> eval on the tiny Wan model, through the CLI."""
    return family_run(family_for(wan_dir).name)


def test_cli_pipeline_runs_on_wan(trained):
    from rollouts.store import RolloutStore

    adapter = trained.adapter
    store = RolloutStore(trained.store)
    assert store.settings["family"] == family_for(store.settings["model"]).name
    embeds = store.load_embeds("p00000")
    assert embeds.pooled is None and embeds.prompt_embeds.shape == (1, 512, 32)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(family_for(store.settings["model"]).lora_targets)
    assert json.loads((adapter / "base_model.json").read_text())["family"] == store.settings["family"]


def test_merged_and_exported_lora_sample_base_plus_adapter_in_wan_pipeline(wan_dir, trained):
    from diffusers import WanPipeline

    checks.check_merged_and_exported_lora(WanPipeline, wan_dir, trained, checks.Sampling(3, 4.0))


def test_adapter_of_one_family_is_refused_by_another(trained, tiny_model_dir, tmp_path, capsys):
    family = json.loads((trained.adapter / "base_model.json").read_text())["family"]
    checks.check_refused(capsys, trained.adapter, tiny_model_dir, tmp_path, ("contentv", family), height=32)


def test_a_folder_without_sampling_defaults_gets_its_familys(wan_dir, tiny_model_dir, tmp_path):
    import shutil

    from rlhf.model_defaults import defaults_for
    from rlhf.options import VideoOptions

    wan = shutil.copytree(wan_dir, tmp_path / "wan")
    (wan / "sampling_defaults.json").unlink()
    source, values = defaults_for(VideoOptions, {"model": str(wan)})
    family = family_for(wan)
    assert family.name in source and values == dict(family.sampling_defaults)
    assert values["negative_prompt"].startswith("Bright tones")
    assert (values["frames"], values["height"], values["fps"]) == {"wan2.1": (81, 480, 16.0),
                                                                  "wan2.2-ti2v": (121, 704, 24.0)}[family.name]
    contentv = shutil.copytree(tiny_model_dir, tmp_path / "contentv")
    (contentv / "sampling_defaults.json").unlink()
    assert defaults_for(VideoOptions, {"model": str(contentv)}) is None  # the options' defaults are ContentV's


def test_family_flag_names_a_registered_family(wan_dir, tmp_path, capsys):
    base = ["generate", "--model", wan_dir, "--prompt", "x", "--out", tmp_path / "x.mp4", "--steps", "1",
            "--frames", "5", "--height", "64", "--width", "64", "--dtype", "fp32"]
    code, _, err = call_cli(capsys, *base, "--family", "wan9")
    assert code == 2 and "family" in err and "contentv, wan2.1, wan2.2-ti2v" in err
    # Forcing another family's layout onto the folder names the first part that family needs and lacks...
    code, _, err = call_cli(capsys, *base, "--family", "contentv")
    assert code == 2 and "text_encoder_2: missing or empty" in err and "ContentVPipeline" in err
    # ... or, for a family of the same layout, that the transformer is not that family's.
    own = family_for(wan_dir).name
    other = next(name for name in VAES if name != own)
    code, _, err = call_cli(capsys, *base, "--family", other)
    assert code == 2 and f"not a {other} transformer" in err and len(err.strip().splitlines()) == 1
    assert call_cli(capsys, *base, "--family", own)[0] == 0


def test_sizes_the_vae_cannot_take_are_refused(wan_dir, tmp_path, capsys):
    # 48 pixels is a multiple of 16 (the options' rule) but not of 32 (Wan2.2's VAE x its patch).
    code, _, err = call_cli(capsys, "generate", "--model", wan_dir, "--prompt", "x", "--out", tmp_path / "x.mp4",
                            "--steps", "1", "--frames", "5", "--height", "48", "--width", "64", "--dtype", "fp32")
    if family_for(wan_dir).name == "wan2.1":
        assert code == 0, err
    else:
        assert code == 2 and "multiples of 32" in err and len(err.strip().splitlines()) == 1


@checks.ONLINE_TRAINERS
def test_online_trainers_train_a_wan_adapter(wan_dir, tmp_path, config, sizes):
    """The shipped online-trainer configs, sized down, train on the Wan model through the interface alone."""
    adapter = checks.train_online_config(wan_dir, tmp_path, config, sizes)
    checks.check_trained_adapter(adapter, family_for(wan_dir).name)


def test_family_named_at_rollout_carries_through_train_and_merge(wan_dir, tmp_path, capsys):
    """A folder whose model_index.json names no known pipeline is sampled with --family; train then takes the family
    the store recorded, and merge takes --family again."""
    import shutil

    family = family_for(wan_dir).name
    model = shutil.copytree(wan_dir, tmp_path / "model")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyVideoPipeline"}))
    prompts, rewards = checks.write_inputs(tmp_path, ["a red ball", "a blue lake"])
    store, pairs, run, merged = (tmp_path / name for name in ("store", "pairs", "run", "merged"))
    rollout = ["rollout", "--model", model, "--prompts", prompts, "--out", store, "--frames", "5", "--height", "64",
               "--width", "64", "--steps", "1", "--guidance", "1", "--samples-per-prompt", "2", "--batch-size", "2",
               "--save-frames", "1", "--dtype", "fp32"]
    code, _, err = call_cli(capsys, *rollout)
    assert code == 2 and "'MyVideoPipeline' is not a supported pipeline" in err and "--family" in err
    for command in ([*rollout, "--family", family], ["score", "--store", store, "--config", rewards],
                    ["pairs", "--store", store, "--out", pairs, "--min-margin", "0"],
                    ["train", "--pairs", pairs, "--output-dir", run, "--dtype", "fp32", "--mixed-precision", "no",
                     "--lora-rank", "2", "--lora-alpha", "2", "--report-to", "none", "--no-gradient-checkpointing",
                     "--max-steps", "1", "--batch-size", "1"]):
        code, _, err = call_cli(capsys, *command)
        assert code == 0, (command[0], err)
    assert json.loads((run / "adapter" / "base_model.json").read_text())["family"] == family
    merge = ["merge", "--model", model, "--adapter", run / "adapter", "--out", merged]
    code, _, err = call_cli(capsys, *merge)
    assert code == 2 and "--family" in err
    code, _, err = call_cli(capsys, *merge, "--family", family)
    assert code == 0, err
    assert json.loads((merged / "model_index.json").read_text())["_class_name"] == "MyVideoPipeline"


@pytest.mark.parametrize("wan_dir", ["wan2.1"], indirect=True)
def test_dpo_trains_on_an_int8_base_of_wan21(wan_dir, trained, tmp_path, capsys):
    """Flow-DPO with `--quantize int8_weight_only` on Wan2.1 (Wan2.2 TI2V shares its blocks): quantize reaches Wan's
    blocks (`blocks.N`), not only ContentV's `transformer_blocks`, and the adapter records the family."""
    from rlhf.lowmem import block_linears, quantize_transformer

    run = tmp_path / "run"
    code, _, err = call_cli(capsys, "train", "--pairs", trained.pairs, "--output-dir", run, "--dtype", "fp32",
                            "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none",
                            "--no-gradient-checkpointing", "--max-steps", "2", "--batch-size", "1",
                            "--quantize", "int8_weight_only")
    assert code == 0, err[-2000:]
    written = [p.parent for p in tmp_path.rglob("adapter_config.json")]
    assert run / "adapter" in written
    for folder in written:
        assert json.loads((folder / "base_model.json").read_text())["family"] == "wan2.1", folder
    transformer = family_for(wan_dir).load_transformer(wan_dir, torch.float32)
    report = quantize_transformer(transformer, "int8_weight_only")
    assert report.quantized_layers == len(block_linears(transformer)) > 0
