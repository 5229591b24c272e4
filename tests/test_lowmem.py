"""Low-memory modes: the frozen transformer quantised with torchao (generate, DPO, merge) and block offloading.

Quality is measured on the shipped shapes-world model (trained weights, so a quantisation error shows in the
frames); training and merging run on the tiny model.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open

from dpo.config import DPOConfig
from dpo.data import PairBatch
from dpo.trainer import dpo_step
from rlhf.commands.generate import GenerateConfig
from rlhf.generation import VideoGenerator
from rlhf.lowmem import is_quantized, video_psnr
from rlhf.models.loader import load_contentv
from rlhf.sampling import FlowSchedule, PromptEmbeds
from rlhf.training import TrainingRun, step_generator
from rlhf.world import MODEL_DIR
from tests.conftest import call_cli, tiny_forward

# The world model's own sampling settings (configs/world/rollout.yaml), fewer steps.
WORLD = {"frames": 9, "height": 64, "width": 64, "steps": 8, "guidance": 4.0, "negative_prompt": ""}
PROMPT = "a large yellow circle moving up"
QUANTIZED = ("int8_weight_only", "float8_weight_only", "nf4")
# Lowest PSNR (dB) of a quantised world video against the unquantised one (seed 0, 8 steps, fp32 compute).
# Measured on this machine: int8 47.9 dB, float8 36.0 dB, nf4 27.0 dB (benchmarks/RESULTS.md, memory_modes); a
# broken quantisation (wrong scales, a dropped layer, the wrong weights dequantised) lands far below.
MIN_PSNR = {"int8_weight_only": 42.0, "float8_weight_only": 31.0, "nf4": 23.0}
MIN_GRADIENT_COSINE = 0.95


def world_video(quantize: str = "none", group_offload: bool = False) -> tuple[VideoGenerator, torch.Tensor]:
    config = GenerateConfig(model=str(MODEL_DIR), prompt=PROMPT, device="cpu", dtype="fp32", quantize=quantize,
                            group_offload=group_offload, **WORLD)
    generator = VideoGenerator(config)
    embeds = generator.encode_prompts([PROMPT, ""])
    latents = generator.sample_latents(embeds.select(0), embeds.select(1), [0], config, progress=False)
    return generator, generator.decode(latents)  # (1, 3, T, H, W) in [-1, 1]


def block_linears(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for n, m in transformer.named_modules()
            if n.startswith("transformer_blocks.") and isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def reference_video() -> torch.Tensor:
    return world_video()[1]


@pytest.mark.parametrize("mode", QUANTIZED)
def test_quantised_generate_stays_close_to_unquantised(mode, reference_video):
    generator, video = world_video(mode)
    layers = block_linears(generator.transformer)
    assert layers and all(is_quantized(m.weight) for m in layers)
    psnr = video_psnr(reference_video, video)
    assert MIN_PSNR[mode] < psnr < math.inf, f"{mode}: PSNR {psnr:.1f} dB"


@pytest.mark.parametrize("mode", ["none", "int8_weight_only"])
def test_group_offload_gives_the_same_video(mode, reference_video):
    # On the CPU the blocks are "onloaded" to the CPU: this runs diffusers' hooks and torchao's tensor swaps.
    generator, video = world_video(mode, group_offload=True)
    assert any(hasattr(m, "_diffusers_hook") for m in generator.transformer.modules())
    expected = reference_video if mode == "none" else world_video(mode)[1]
    assert torch.equal(video, expected)


def dpo_lora_gradients(model_dir, quantize: str, out_dir) -> torch.Tensor:
    """All LoRA gradients of one Flow-DPO step (the trainer's own policy loading and step), one vector."""
    config = DPOConfig(pairs="-", output_dir=str(out_dir), dtype="fp32", mixed_precision="no", lora_rank=4,
                       lora_alpha=4, report_to="none", quantize=quantize, beta=500.0)
    run = TrainingRun(config, config, "cpu", config)
    policy = run.prepare(run.load_policy(model_dir, "fp32", quantize=quantize))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, the same in every mode, so lora_A gets gradients too
        for name, param in sorted(run.unwrapped.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    shape = (1, 16, 3, 8, 8)  # 9 frames of 64x64 -> (C, T, H, W) latents
    config_t = run.unwrapped.config
    batch = PairBatch(
        latents_w=torch.randn(shape, generator=generator), latents_l=torch.randn(shape, generator=generator),
        text=PromptEmbeds(torch.randn(1, 24, config_t.joint_attention_dim, generator=generator),
                          torch.randn(1, config_t.pooled_projection_dim, generator=generator)),
        weights=torch.ones(1), pair_ids=["w>l"])
    schedule = FlowSchedule.from_file(f"{model_dir}/scheduler/scheduler_config.json")
    loss, _ = dpo_step(run, batch, config, schedule, step_generator(0, 0))
    loss.backward()
    names = sorted(n for n, p in run.unwrapped.named_parameters() if p.requires_grad)
    params = dict(run.unwrapped.named_parameters())
    assert policy is not None and names
    return torch.cat([params[n].grad.flatten() for n in names])


@pytest.mark.parametrize("mode", QUANTIZED)
def test_dpo_gradients_on_a_quantised_base_point_the_same_way(mode, tmp_path):
    full = dpo_lora_gradients(MODEL_DIR, "none", tmp_path / "none")
    quantized = dpo_lora_gradients(MODEL_DIR, mode, tmp_path / mode)
    cosine = torch.nn.functional.cosine_similarity(full, quantized, dim=0).item()
    assert not torch.equal(full, quantized)  # the base really was quantised
    assert cosine >= MIN_GRADIENT_COSINE, f"{mode}: cosine {cosine:.4f}"


def test_reference_pass_runs_on_the_same_quantised_base(tiny_model_dir, tmp_path):
    config = DPOConfig(pairs="-", output_dir=str(tmp_path / "run"), dtype="fp32", mixed_precision="no",
                       lora_rank=4, lora_alpha=4, report_to="none", quantize="int8_weight_only")
    run = TrainingRun(config, config, "cpu", config)
    run.prepare(run.load_policy(tiny_model_dir, "fp32", quantize="int8_weight_only"))
    with torch.no_grad():
        for name, param in run.unwrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    quantized_base = load_contentv(tiny_model_dir, dtype="fp32", load_vae=False, load_text_encoders=False,
                                   quantize="int8_weight_only").transformer
    full_base = load_contentv(tiny_model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    with run.reference_mode() as reference:
        reference_out = tiny_forward(reference)
    assert torch.equal(reference_out, tiny_forward(quantized_base))
    assert not torch.equal(reference_out, tiny_forward(full_base))
    assert not torch.allclose(tiny_forward(run.unwrapped), reference_out)


def test_lora_trained_on_a_quantised_base_merges_into_full_precision_weights(tiny_model_dir, tiny_pairs, tmp_path,
                                                                           capsys):
    run_dir = tmp_path / "run"
    code, _, err = call_cli(capsys, "train", "--pairs", tiny_pairs, "--output-dir", run_dir, "--dtype", "fp32",
                            "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none",
                            "--max-steps", "3", "--learning-rate", "1e-2", "--save-every", "0",
                            "--quantize", "int8_weight_only")
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    full_precision = load_contentv(tiny_model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    assert summary["steps"] == 3
    assert summary["rank0_parameter_bytes"] < sum(p.numel() * 4 for p in full_precision.parameters())  # int8 base
    adapter = run_dir / "adapter"
    merged = tmp_path / "merged"
    code, _, err = call_cli(capsys, "merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", merged)
    assert code == 0, err
    # The release weights keep the base's full-precision dtypes, and compute what base + adapter computes.
    shard = "transformer/diffusion_pytorch_model.safetensors"
    with safe_open(str(tiny_model_dir / shard), "pt") as base_file, safe_open(str(merged / shard), "pt") as out_file:
        assert set(base_file.keys()) == set(out_file.keys())
        assert all(base_file.get_slice(k).get_dtype() == out_file.get_slice(k).get_dtype() for k in base_file.keys())
    from rlhf.lora import load_adapter

    merged_model = load_contentv(merged, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    with_adapter = load_contentv(tiny_model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    load_adapter(with_adapter, adapter)
    base = load_contentv(tiny_model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    assert torch.allclose(tiny_forward(merged_model), tiny_forward(with_adapter), atol=1e-5)
    assert not torch.allclose(tiny_forward(merged_model), tiny_forward(base), atol=1e-5)
    # It generates from the merged checkpoint, and as an adapter on the (quantised or full) base.
    common = ["--prompt", "a cat", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
              "--dtype", "fp32"]
    for args in (["--model", merged], ["--model", tiny_model_dir, "--adapter", adapter],
                 ["--model", tiny_model_dir, "--adapter", adapter, "--quantize", "int8_weight_only"]):
        out = tmp_path / f"video{len(args)}.mp4"
        code, _, err = call_cli(capsys, "generate", *args, *common, "--out", out)
        assert code == 0 and out.stat().st_size > 0, err


@pytest.mark.parametrize("args, field", [
    (["generate", "--prompt", "x", "--out", "x.mp4", "--quantize", "int4"], "quantize"),
    (["generate", "--prompt", "x", "--out", "x.mp4", "--group-offload", "--cpu-offload"], "group_offload"),
    (["generate", "--prompt", "x", "--out", "x.mp4", "--group-offload", "--quantize", "nf4"], "group_offload"),
    (["train", "--pairs", "p", "--output-dir", "o", "--quantize", "8bit"], "quantize"),
    (["train", "--method", "reward_gradient", "--model", "m", "--prompts", "p", "--rewards", "r",
      "--output-dir", "o", "--quantize", "fp4"], "quantize"),
])
def test_bad_low_memory_settings_exit_2_with_one_line(args, field, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if args[0] == "generate":
        args = [*args, "--model", str(tiny_model_dir)]
    code, out, err = call_cli(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and field in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_merge_has_no_quantize_option(tiny_model_dir, tmp_path, capsys):
    code, _, err = call_cli(capsys, "merge", "--model", tiny_model_dir, "--adapter", tmp_path, "--out",
                            tmp_path / "out", "--quantize", "int8_weight_only")
    assert code == 2 and "--quantize" in err and len(err.strip().splitlines()) == 1


def test_a_rollout_store_is_resumed_only_with_the_same_quantize(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    common = ["rollout", "--model", tiny_model_dir, "--prompts", prompts, "--out", tmp_path / "store", "--frames", "5",
              "--height", "32", "--width", "32", "--steps", "2", "--samples-per-prompt", "1", "--save-frames", "0",
              "--dtype", "fp32"]
    code, _, err = call_cli(capsys, *common, "--quantize", "int8_weight_only")
    assert code == 0, err
    assert json.loads((tmp_path / "store" / "store.json").read_text())["settings"]["quantize"] == "int8_weight_only"
    code, _, err = call_cli(capsys, *common)  # the same store without quantisation: other samples
    assert code == 2 and "quantize" in err and len(err.strip().splitlines()) == 1


def test_memory_table_arithmetic_counts_what_a_real_model_holds():
    from benchmarks.memory_modes import MODES, arithmetic, build_transformer
    from rlhf.lora import add_lora
    from rlhf.lowmem import parameter_bytes, quantize_transformer

    table = arithmetic(2, 2, 64, 5, 64, 64, 4, text_tokens=8)["modes"]  # meta device, no weights
    for mode in MODES:
        real = build_transformer(2, 2, 64, "cpu", torch.bfloat16)
        quantize_transformer(real, mode)
        assert table[mode]["weights"] == parameter_bytes(real), mode
    assert table["nf4"]["weights"] < table["int8_weight_only"]["weights"] < table["none"]["weights"]
    add_lora(real, rank=4, alpha=4)
    assert table["none"]["lora_fp32"] == sum(p.numel() * 4 for n, p in real.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("method, extra", [
    ("reward_gradient", ["--max-steps", "2", "--calibration-prompts", "1", "--calibration-samples", "2"]),
    ("grpo", ["--max-steps", "2", "--group-size", "2", "--prompts-per-round", "2", "--updates-per-round", "2",
              "--batch-size", "2", "--sde-window-size", "2"]),
])
def test_online_trainers_train_on_a_quantised_base(method, extra, tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    (tmp_path / "prompts.txt").write_text("a red ball\na blue lake\n")
    (tmp_path / "rewards.yaml").write_text("scorers:\n  brightness: {weight: 1.0}\ndevice: cpu\n")
    out = tmp_path / "run"
    code, _, err = call_cli(capsys, "train", "--method", method, "--model", tiny_model_dir, "--prompts",
                            tmp_path / "prompts.txt", "--rewards", tmp_path / "rewards.yaml", "--output-dir", out,
                            "--frames", "5", "--height", "32", "--width", "32", "--steps", "3", "--guidance", "2",
                            "--dtype", "fp32", "--mixed-precision", "no", "--report-to", "none", "--lora-rank", "4",
                            "--lora-alpha", "8", "--device", "cpu", "--learning-rate", "1e-2",
                            "--quantize", "int8_weight_only", *extra)
    assert code == 0, err
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize("family_config", [
    ("wan2.1", dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16,
                    out_channels=16, text_dim=64, freq_dim=32, ffn_dim=256, num_layers=2)),
    (None, dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=64, num_layers=1,
                num_single_layers=2, num_refiner_layers=1, text_embed_dim=64, pooled_projection_dim=32,
                rope_axes_dim=(16, 24, 24))),
], ids=["wan2.1", "hunyuanvideo"])
def test_memory_table_of_other_families_counts_what_quantize_stores(family_config):
    """The benchmark's other families (Wan's `blocks`, HunyuanVideo's dual- and single-stream lists): its weights
    per mode are what `quantize_transformer` leaves on a real model, and the DPO step it records runs."""
    from benchmarks.memory_modes import MODES, ModelSpec, build_meta, spec_arithmetic
    from rlhf.lowmem import block_linears, parameter_bytes, quantize_transformer

    family, config = family_config
    spec = ModelSpec("tiny", family, config, 8, ((5, 64, 64),), token_mask=family is None)
    table = spec_arithmetic(spec, 5, 64, 64, 4)["modes"]
    for mode in MODES:
        real = build_meta(spec).to_empty(device="cpu")
        with torch.no_grad():
            for param in real.parameters():
                param.normal_(std=0.02)
        report = quantize_transformer(real, mode)
        assert mode == "none" or report.quantized_layers == len(block_linears(real)) > 0
        assert table[mode]["weights"] == parameter_bytes(real), mode
    assert table["nf4"]["weights"] < table["int8_weight_only"]["weights"] < table["none"]["weights"]
    assert all(row["checkpointed_activations"] > 0 and row["block_backward"] > 0 for row in table.values())
