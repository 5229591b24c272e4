"""Wan2.2 A14B (`wan2.2-a14b`: WanPipeline with `transformer_2` and `boundary_ratio`) on its tiny checkpoint, against
diffusers' own `WanPipeline`:

- `tiny-model --family wan2.2-a14b` writes WanPipeline's two-expert folder, and the family is read from it;
- our final latents equal WanPipeline's (fp32, same prompt and noise) with steps on both sides of the boundary and a
  low-noise guidance scale of its own (`guidance_2` = WanPipeline's `guidance_scale_2`);
- each sample of a training batch goes through the expert of its timestep: the gradient of a sampled sigma reaches
  only that expert's LoRA;
- rollout -> score -> pairs -> train -> merge -> eval run on it through the CLI; the merged folder (both experts
  merged) and the LoRA export (one file per expert, the second loaded with `load_into_transformer_2=True`) load in
  WanPipeline and sample what base + adapter samples;
- the online trainers train on it, and take `family` (a family that does not fit is refused in one line); SFT,
  online DPO, eval -> report and the compare page's sampler run on it in tests/test_family_stages.py;
- a Wan2.1 adapter is refused by the A14B base and an A14B adapter by a Wan2.1 base (exit 2, one line);
- the low-memory modes act on both experts: `quantize` stores both experts' block weights quantised (and Flow-DPO
  trains on them), group offloading samples the same latents with each expert's blocks offloaded one at a time, and
  `auto` checkpointing measures a step whichever expert it runs; multi-process launches are refused;
- bad input is refused in one line: `guidance_2` for a one-transformer family (every command that takes it), and a
  merge from an adapter folder holding only the per-expert LoRA export.
"""

import json
import shutil

import pytest
import torch
import yaml

from rlhf.models.family import family_for, transformer_family
from tests import family_checks as checks
from tests.conftest import call_cli


@pytest.fixture(scope="module")
def a14b_dir(family_model):
    return family_model("wan2.2-a14b")


@pytest.fixture(scope="module")
def wan21_dir(family_model):
    return family_model("wan2.1")


def wan_pipeline(folder):
    from diffusers import WanPipeline

    return checks.load_pipeline(WanPipeline, folder)


def test_layout_is_wan_pipelines_two_experts_and_the_family_is_read_from_it(a14b_dir, wan21_dir, capsys):
    from rlhf.models.loader import load_model
    from rlhf.models.wan import WanExperts

    index = json.loads((a14b_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert family_for(a14b_dir).name == "wan2.2-a14b" and family_for(wan21_dir).name == "wan2.1"
    pipe = wan_pipeline(a14b_dir)
    assert pipe.config.boundary_ratio == 0.875
    transformer = load_model(a14b_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    assert isinstance(transformer, WanExperts) and transformer.boundary_timestep == 875.0
    assert transformer_family(transformer).name == "wan2.2-a14b"
    assert transformer_family(pipe.transformer_2).name == "wan2.1"  # one expert alone is a plain Wan transformer
    for ours_expert, theirs in ((transformer.transformer, pipe.transformer), (transformer.transformer_2,
                                                                              pipe.transformer_2)):
        assert all(torch.equal(a, b) for a, b in zip(ours_expert.state_dict().values(), theirs.state_dict().values(),
                                                      strict=True))
    assert not torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight)
    # Naming a one-transformer family for the two-expert folder, or the reverse, is refused in one line.
    base = ["generate", "--prompt", "x", "--steps", "1", "--frames", "5", "--height", "64", "--width", "64",
            "--dtype", "fp32"]
    code, _, err = call_cli(capsys, *base, "--model", a14b_dir, "--out", a14b_dir.parent / "x.mp4",
                            "--family", "wan2.1")
    assert code == 2 and "transformer_2" in err and "wan2.2-a14b" in err and len(err.strip().splitlines()) == 1
    code, _, err = call_cli(capsys, *base, "--model", wan21_dir, "--out", wan21_dir.parent / "x.mp4",
                            "--family", "wan2.2-a14b")
    assert code == 2 and "boundary_ratio" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("steps", "guidance", "guidance_2"), [(6, 4.0, 2.0), (4, 4.0, None)])
def test_sampler_equals_wan_pipeline_with_both_experts(a14b_dir, steps, guidance, guidance_2):
    schedule = family_for(a14b_dir).schedule(a14b_dir)
    timesteps = schedule.timesteps(schedule.sigmas(steps))
    assert (timesteps >= 875).any() and (timesteps < 875).any()  # both experts denoise
    sampling = checks.Sampling(steps, guidance, guidance_2)
    noise, latents = sampling.ours(a14b_dir)
    pipe = wan_pipeline(a14b_dir)
    expected = sampling.pipeline(pipe, noise)
    assert latents.shape == expected.shape == (1, 16, 2, 8, 8)
    torch.testing.assert_close(latents, expected, atol=checks.TOLERANCE, rtol=0)
    # Neither expert alone (nor one guidance for both) samples this: the switch and guidance_2 are checked.
    single = checks.Sampling(steps, guidance, guidance).pipeline(pipe, noise)
    pipe.config.boundary_ratio = 0.0  # transformer (high noise) for every step
    high_only = checks.Sampling(steps, guidance).pipeline(pipe, noise)
    assert (latents - high_only).abs().max() > 100 * checks.TOLERANCE
    if guidance_2 is not None:
        assert (latents - single).abs().max() > 100 * checks.TOLERANCE


def test_training_gradient_reaches_only_the_expert_of_the_sampled_sigma(a14b_dir):
    """Invariant over random sigma draws: the expert whose timestep range holds no sampled sigma gets no gradient,
    one that holds any gets one; and each sample's velocity is its own expert's."""
    from dpo.losses import sample_sigmas
    from rlhf.lora import add_lora
    from rlhf.models.family import velocity
    from rlhf.models.loader import load_model
    from rlhf.sampling import PromptEmbeds
    from rlhf.training import mark_trainable

    parts = load_model(a14b_dir, dtype="fp32", load_vae=False, load_text_encoders=False)
    model = parts.transformer
    add_lora(model, rank=2, alpha=2)
    for name, param in model.named_parameters():  # B = 0 would hide A's gradient; any non-zero start will do
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    mark_trainable(model)
    latents = torch.randn(4, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = PromptEmbeds(torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(1)), None)
    seen = set()
    for seed in range(6):
        sampler = "uniform" if seed % 2 else "logit_normal"  # the trainers' two sigma samplers
        sigmas = sample_sigmas(4, torch.Generator().manual_seed(seed), sampler, shift=parts.schedule.shift)
        timestep = sigmas * parts.schedule.num_train_timesteps
        model.zero_grad()
        out = velocity(model, latents, timestep, text)
        out.square().mean().backward()
        high = timestep >= 875
        for expert, used in (("transformer.", bool(high.any())), ("transformer_2.", bool((~high).any()))):
            grads = [p.grad for n, p in model.named_parameters() if n.startswith(expert) and p.requires_grad]
            reached = any(g is not None and g.abs().max() > 0 for g in grads)
            assert reached == used, (seed, expert, timestep)
        seen.add((bool(high.any()), bool((~high).any())))
        with torch.no_grad():  # each row is its own expert's prediction
            for row in range(4):
                expert = model.transformer if high[row] else model.transformer_2
                alone = expert(hidden_states=latents[row:row + 1], timestep=timestep[row:row + 1],
                               encoder_hidden_states=text.prompt_embeds[row:row + 1], return_dict=False)[0]
                torch.testing.assert_close(out[row:row + 1].detach(), alone, atol=1e-5, rtol=0)
    assert (True, True) in seen  # a mixed batch was among the draws


@pytest.fixture(scope="module")
def trained(family_run):
    """rollout -> score -> pairs -> train -> merge -> eval on the tiny A14B model, through the CLI (the training
    draws 4 uniform sigmas: both experts are trained)."""
    return family_run("wan2.2-a14b")


def test_cli_pipeline_runs_on_a14b_and_the_adapter_holds_one_lora_per_expert(trained):
    from safetensors.torch import load_file

    from rlhf.lora import DIFFUSERS_WEIGHTS
    from rlhf.models.wan import EXPERT_2_WEIGHTS
    from rollouts.store import RolloutStore

    adapter, evaluation = trained.adapter, trained.evaluation
    settings = RolloutStore(trained.store).settings
    assert settings["family"] == "wan2.2-a14b" and settings["guidance_2"] == 3.0  # the tiny model's default
    assert json.loads((adapter / "base_model.json").read_text())["family"] == "wan2.2-a14b"
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    experts = {key.split(".")[2] for key in peft}  # base_model.model.<expert>.blocks...
    assert experts == {"transformer", "transformer_2"}
    for expert in experts:  # both trained away from the zero init, each to its own weights
        assert any(v.abs().max() > 0 for k, v in peft.items() if f".{expert}.blocks." in k and "lora_B" in k)
    high, low = (load_file(str(adapter / name)) for name in (DIFFUSERS_WEIGHTS, EXPERT_2_WEIGHTS))
    assert high.keys() == low.keys() and all(k.startswith("transformer.blocks.") for k in high)
    assert any(not torch.equal(high[k], low[k]) for k in high)
    assert any(evaluation.rglob("*.json"))


def test_merged_and_exported_lora_sample_base_plus_adapter_in_wan_pipeline(a14b_dir, trained):
    from diffusers import WanPipeline

    from rlhf.models.wan import EXPERT_2_WEIGHTS

    sampling = checks.Sampling(6, 4.0, 2.0)
    assert json.loads((trained.merged / "model_index.json").read_text())["boundary_ratio"] == 0.875

    def load_both_experts_loras(pipeline, adapter, noise, adapted):
        pipeline.load_lora_weights(str(adapter))
        only_high = sampling.pipeline(pipeline, noise)
        assert (only_high - adapted).abs().max() > 100 * checks.TOLERANCE  # the low-noise expert's LoRA matters too
        pipeline.load_lora_weights(str(adapter), weight_name=EXPERT_2_WEIGHTS, load_into_transformer_2=True)

    checks.check_merged_and_exported_lora(WanPipeline, a14b_dir, trained, sampling, load_both_experts_loras)


def test_adapters_of_wan21_and_a14b_are_refused_by_each_others_base(trained, a14b_dir, wan21_dir, tmp_path, capsys):
    adapter = trained.adapter
    wan21_adapter = shutil.copytree(adapter, tmp_path / "wan21-adapter")  # as a Wan2.1 run records its base
    record = json.loads((wan21_adapter / "base_model.json").read_text())
    (wan21_adapter / "base_model.json").write_text(json.dumps({**record, "family": "wan2.1"}))
    for model, lora, families in ((wan21_dir, adapter, ("wan2.1", "wan2.2-a14b")),
                                  (a14b_dir, wan21_adapter, ("wan2.2-a14b", "wan2.1"))):
        checks.check_refused(capsys, lora, model, tmp_path, families)


@checks.ONLINE_TRAINERS
def test_online_trainers_train_an_a14b_adapter_and_take_family(a14b_dir, tmp_path, capsys, config, sizes):
    """The shipped online-trainer configs, sized down, train on a copy of the A14B folder whose model_index.json names
    no known pipeline: only with `family: wan2.2-a14b`; `family: wan2.1` (one expert) is refused in one line."""
    from tests.test_configs import as_run

    model = shutil.copytree(a14b_dir, tmp_path / "model")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyVideoPipeline"}))
    out = tmp_path / "run"
    written = as_run(config, tmp_path, model=str(model), output_dir=str(out), frames=5, height=64, width=64,
                     steps=2, **sizes)
    data = yaml.safe_load(written.read_text())

    def train(family: str | None) -> tuple[int, str]:
        written.write_text(yaml.safe_dump({**data, **({"family": family} if family else {})}))
        with pytest.MonkeyPatch.context() as patch:
            from tests.test_configs import REPO

            patch.chdir(REPO)
            code, _, err = call_cli(capsys, "train", "--config", written)
        return code, err.strip()

    for family, expected in ((None, "'MyVideoPipeline' is not a supported pipeline"), ("wan2.1", "transformer_2")):
        code, err = train(family)
        assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    code, err = train("wan2.2-a14b")
    assert code == 0, err
    lora_b = checks.check_trained_adapter(out / "adapter", "wan2.2-a14b")
    assert {k.split(".")[2] for k in lora_b} == {"transformer", "transformer_2"}


def test_quantize_stores_both_experts_blocks_quantised_and_dpo_trains_on_them(a14b_dir, trained, tmp_path, capsys):
    from dpo.config import DPOConfig
    from rlhf.lowmem import is_quantized
    from rlhf.training import TrainingRun

    config = DPOConfig(pairs="-", output_dir=str(tmp_path / "probe"), dtype="fp32", mixed_precision="no",
                       lora_rank=2, lora_alpha=2, report_to="none", quantize="int8_weight_only")
    run = TrainingRun(config, config, "cpu", config)
    policy = run.load_policy(a14b_dir, "fp32", quantize="int8_weight_only")  # the trainers' own loading
    for expert in (policy.transformer, policy.transformer_2):
        linears = [m for n, m in expert.named_modules()
                   if n.startswith("blocks.") and ".lora_" not in n and type(m) is torch.nn.Linear]
        assert linears and all(is_quantized(m.weight) for m in linears)  # LoRA'd layers' base_layer included
        assert not is_quantized(expert.proj_out.weight)  # outside the blocks: the checkpoint's precision
    # Flow-DPO trains on the quantised base through the CLI, holding less than the full-precision experts.
    run_dir = tmp_path / "run"
    code, _, err = call_cli(capsys, "train", "--pairs", trained.pairs, "--output-dir", run_dir, "--dtype",
                            "fp32", "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "8", "--report-to",
                            "none", "--no-gradient-checkpointing", "--max-steps", "2", "--learning-rate", "0.01",
                            "--batch-size", "2", "--sigma-sampler", "uniform", "--quantize", "int8_weight_only")
    assert code == 0, err
    full = sum(p.numel() * 4 for e in (policy.transformer, policy.transformer_2) for n, p in e.named_parameters()
               if "lora_" not in n)
    assert json.loads((run_dir / "summary.json").read_text())["rank0_parameter_bytes"] < full


def test_group_offload_samples_the_same_latents_offloading_each_experts_blocks(a14b_dir):
    steps = 4  # both experts denoise (test_sampler_equals_wan_pipeline_with_both_experts)
    sampling = checks.Sampling(steps, 4.0, 2.0)
    _, expected = sampling.ours(a14b_dir)
    generators: list = []
    _, offloaded = sampling.ours(a14b_dir, generators=generators, group_offload=True)
    experts = generators[0].transformer
    for expert in experts.experts:  # each block its own group, as for a one-transformer family
        assert all(hasattr(block, "_diffusers_hook") for block in expert.blocks)
    assert not hasattr(experts, "_diffusers_hook")  # not one group holding both experts whole
    # As tests/test_lowmem.py's group-offload check: on the CPU the same operations run, so the same latents.
    assert torch.equal(offloaded, expected)


def test_auto_checkpointing_measures_a_step_of_either_expert_and_all_of_a_mixed_batch(a14b_dir):
    from rlhf.checkpointing import ActivationProbe, enable_checkpointing
    from rlhf.lora import add_lora
    from rlhf.models.family import velocity
    from rlhf.models.loader import load_model
    from rlhf.sampling import PromptEmbeds
    from rlhf.training import mark_trainable

    model = load_model(a14b_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    add_lora(model, rank=2, alpha=2)
    mark_trainable(model)
    enable_checkpointing(model, "full")
    latents = torch.randn(4, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    text = PromptEmbeds(torch.randn(4, 12, 32, generator=torch.Generator().manual_seed(1)), None)

    def block_bytes(timestep: list[float]) -> int:
        probe = ActivationProbe(model)
        with probe.measuring():
            velocity(model, latents, torch.tensor(timestep), text).square().mean().backward()
        assert probe.measured, timestep
        return probe.measure().block_bytes

    high, low, mixed = block_bytes([950.0] * 4), block_bytes([300.0] * 4), block_bytes([950.0, 300.0] * 2)
    assert high == low  # one architecture: the same batch keeps the same bytes in either expert
    assert abs(mixed - high) <= 0.1 * high  # a mixed batch's samples are counted in both experts


def test_multi_process_launches_are_refused_before_loading(a14b_dir, tmp_path, monkeypatch):
    """FSDP / DeepSpeed (and DDP) launches: processes route their samples to different experts, so their collectives
    would pair different experts' blocks (same shapes: no error) or wait for an unused expert's gradients."""
    from accelerate import Accelerator

    from dpo.config import DPOConfig
    from rlhf.errors import UserError
    from rlhf.training import TrainingRun

    config = DPOConfig(pairs="-", output_dir=str(tmp_path / "run"), dtype="fp32", mixed_precision="no",
                       lora_rank=2, lora_alpha=2, report_to="none")
    run = TrainingRun(config, config, "cpu", config)
    loads: list = []
    monkeypatch.setattr("rlhf.models.loader.load_model", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    for layout in ("fsdp", "deepspeed", "replicated"):  # what accelerate launch --config_file ... gives
        run.layout = layout
        with pytest.raises(UserError) as refused:
            run.load_policy(a14b_dir, "fp32")
        message = str(refused.value)
        assert "\n" not in message and f"2-process {layout} launch" in message and "two-expert" in message
    assert not loads


def test_guidance_2_is_refused_for_a_one_transformer_family_by_every_command(wan21_dir, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red ball\n")
    (tmp_path / "rewards.yaml").write_text("scorers:\n  brightness: {weight: 1.0}\ndevice: cpu\n")
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({
        "model": str(wan21_dir), "prompts": "prompts.txt", "adapters": ["adapter"], "rewards": "rewards.yaml",
        "out": "eval", "guidance_2": 2.0}))
    (tmp_path / "online.yaml").write_text(yaml.safe_dump({
        "model": str(wan21_dir), "prompts": "prompts.txt", "rewards": "rewards.yaml", "out": "online",
        "rollout": {"guidance_2": 2.0}}))
    model, online = ["--model", wan21_dir], ["--method", "grpo", "nft", "reward_gradient"]
    trainer = [*model, "--prompts", "prompts.txt", "--rewards", "rewards.yaml", "--output-dir", "run"]
    commands = [
        ["generate", *model, "--prompt", "x", "--out", "x.mp4"],
        ["rollout", *model, "--prompts", "prompts.txt", "--out", "store"],
        ["eval", "--config", "eval.yaml"],
        ["compare", *model, "--adapter", "adapter"],
        *(["train", "--method", method, *trainer] for method in online[1:]),
        ["online", "--config", "online.yaml"],
    ]
    for command in commands:
        extra = [] if command[0] in ("eval", "online") else ["--guidance-2", "2"]
        code, _, err = call_cli(capsys, *command, *extra)
        line = err.strip()
        assert code == 2 and "\n" not in line, (command[0], err)
        assert "guidance_2" in line and "wan2.1" in line and "two-expert" in line, (command[0], line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.yaml", "online.yaml", "prompts.txt", "rewards.yaml"]
    # From a one-transformer folder's own sampling_defaults.json too, naming the file.
    folder = shutil.copytree(wan21_dir, tmp_path / "wan21")
    defaults = json.loads((folder / "sampling_defaults.json").read_text())
    (folder / "sampling_defaults.json").write_text(json.dumps({**defaults, "guidance_2": 2.0}))
    code, _, err = call_cli(capsys, "generate", "--model", folder, "--prompt", "x", "--out", "x.mp4")
    assert code == 2 and "sampling_defaults.json" in err and "guidance_2" in err and len(err.strip().splitlines()) == 1


def test_merging_an_adapter_folder_of_the_lora_export_only_names_what_it_holds(a14b_dir, trained, tmp_path, capsys):
    from rlhf.lora import DIFFUSERS_WEIGHTS
    from rlhf.models.wan import EXPERT_2_WEIGHTS

    adapter = trained.adapter
    export = tmp_path / "export"
    export.mkdir()
    for name in (DIFFUSERS_WEIGHTS, EXPERT_2_WEIGHTS, "base_model.json"):
        shutil.copy(adapter / name, export / name)
    code, _, err = call_cli(capsys, "merge", "--model", a14b_dir, "--adapter", export, "--out", tmp_path / "merged")
    line = err.strip()
    assert code == 2 and "\n" not in line, err
    assert DIFFUSERS_WEIGHTS in line and EXPERT_2_WEIGHTS in line and "adapter_config.json" in line, line
    assert "another base model" not in line and not (tmp_path / "merged").exists()
