"""Reward-gradient trainer on the tiny model: gradient paths, learning, frame-subset decode, resume, bad input."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpo.reward_gradient import (
    decode_video_frames,
    load_frozen_parts,
    prompt_indices,
    reward_gradient_step,
    sample_with_grad,
    select_frames,
)
from dpo.reward_gradient_config import RewardGradientConfig
from rlhf.config import config_from_dict, help_problems, load_yaml
from rlhf.errors import UserError
from rlhf.models.loader import load_contentv
from rlhf.training import TrainingRun, step_generator
from rlhf.video import decode_latents
from tests.conftest import REPO, TRAIN_PROMPTS, call_cli

TINY = dict(frames=5, height=32, width=32, steps=3, guidance=2.0, dtype="fp32", mixed_precision="no",
            report_to="none", lora_rank=4, lora_alpha=8, device="cpu", gradient_checkpointing=False)


def flags(**fields):
    """Command-line flags for config fields (booleans as --name / --no-name)."""
    args = []
    for key, value in fields.items():
        name = key.replace("_", "-")
        args += [f"--{'' if value else 'no-'}{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops are overhead-bound: one intra-op thread is as fast and does not collapse on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_gradient")
    (root / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    # brightness is trained on; contrast (weight 0) is only logged.
    (root / "rewards.yaml").write_text("scorers:\n  brightness: {weight: 1.0}\n  contrast: {weight: 0.0}\n"
                                       "device: cpu\n")
    return {"model": str(tiny_model_dir), "prompts": str(root / "prompts.txt"), "rewards": str(root / "rewards.yaml")}


def make_config(inputs, tmp_path, **overrides):
    return RewardGradientConfig(**inputs, output_dir=str(tmp_path / "run"), **{**TINY, **overrides})


@pytest.fixture
def trainer(inputs, tmp_path):
    config = make_config(inputs, tmp_path)
    run = TrainingRun(config, config, "cpu", config)
    parts = load_frozen_parts(config, run.device)
    run.prepare(run.load_policy(config.model, "fp32"))
    return config, run, parts


def lora_grads(run):
    return {n: p.grad.clone() for n, p in run.unwrapped.named_parameters() if "lora_" in n}


def test_gradients_reach_only_the_lora_parameters(trainer):
    config, run, parts = trainer
    # The prompt cache holds one CPU row per prompt, equal to a direct encode of the prompts.
    assert parts.text.prompt_embeds.device.type == "cpu" and len(parts.text) == len(TRAIN_PROMPTS)
    encoder = load_contentv(config.model, dtype="fp32", load_transformer=False, load_vae=False).prompt_encoder
    assert torch.equal(parts.text.prompt_embeds, encoder.encode(TRAIN_PROMPTS).prompt_embeds)

    grad_enabled = []
    hook = run.unwrapped.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    loss, metrics = reward_gradient_step(run, parts, [0, 3], config, step_generator(0, 0))
    hook.remove()
    assert grad_enabled == [False, False, True]  # K=1 of 3 steps (CFG batched: one forward per step)
    assert metrics["reward_total"] == metrics["reward_brightness"] and "reward_contrast" in metrics
    loss.backward()
    # The last block's text queries feed only text outputs that the model discards (SD3's context_pre_only).
    dead = f"transformer_blocks.{len(run.unwrapped.transformer_blocks) - 1}.attn.add_q_proj."
    for name, param in run.unwrapped.named_parameters():
        if "lora_" not in name:
            assert param.grad is None and not param.requires_grad, name
        elif "lora_B" in name and not name.startswith(dead):
            assert param.grad.abs().sum() > 0, name  # B starts at 0, so only B has a gradient at init
        else:
            assert not param.grad.any(), name
    assert all(p.grad is None for p in parts.vae.parameters())

    # K=1: the last step's input comes from no_grad steps, so stopping its gradient changes nothing; K=2 differs.
    def grads(**overrides):
        run.optimizer.zero_grad(set_to_none=True)
        reward_gradient_step(run, parts, [0, 3], dataclasses.replace(config, **overrides),
                             step_generator(0, 0))[0].backward()
        return lora_grads(run)

    k1 = grads()
    assert all(torch.equal(k1[n], g) for n, g in grads(stop_latent_grad=True).items())
    run.unwrapped.enable_gradient_checkpointing()  # recomputation gives the same gradients
    checkpointed = grads(vae_gradient_checkpointing=True)
    run.unwrapped.disable_gradient_checkpointing()
    assert all(torch.allclose(k1[n], g, rtol=1e-4, atol=1e-7) for n, g in checkpointed.items())
    k2, k2_stopped = grads(grad_steps=2), grads(grad_steps=2, stop_latent_grad=True)
    assert any(not torch.allclose(k1[n], k2[n]) for n in k1)
    assert any(not torch.allclose(k2[n], k2_stopped[n]) for n in k2)


def test_sampler_with_gradients_matches_the_no_grad_sampler(trainer):
    from rlhf.sampling import denoise

    config, run, parts = trainer
    with torch.no_grad():
        for name, param in run.unwrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    noise = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas, cond, uncond = parts.schedule.sigmas(3), parts.text.select([1, 2]), parts.negative
    expected = denoise(run.unwrapped, noise, sigmas, cond, uncond, guidance_scale=2.0)
    got = sample_with_grad(run.unwrapped, noise, sigmas, cond, uncond, guidance=2.0, batch_cfg=False, grad_steps=2,
                           stop_latent_grad=True, num_train_timesteps=1000)
    assert got.requires_grad and torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_frame_subset_decode_equals_full_decode(tiny_model_dir, checkpoint):
    vae = load_contentv(tiny_model_dir, load_transformer=False, load_text_encoders=False).vae
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # 9 frames of 32x32
    full = (decode_latents(vae, latents) + 1) / 2  # (B, 3, 9, H, W)
    calls = []
    hook = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    generator = torch.Generator().manual_seed(0)
    cases = [("first", None, [0], 1), ("k_evenly_spaced", 3, [0, 4, 8], 3), ("k_evenly_spaced", 2, [0, 8], 3),
             ("k_evenly_spaced", 9, list(range(9)), 3)]
    for mode, k, frames, decoder_calls in cases:
        assert select_frames(mode, 9, k, generator) == frames
        calls.clear()
        x = latents.clone().requires_grad_()
        video = decode_video_frames(vae, x, frames, checkpoint=checkpoint)  # (B, n, 3, H, W)
        assert torch.allclose(video, full[:, :, frames].permute(0, 2, 1, 3, 4), atol=1e-6), mode
        video.square().sum().backward()
        assert len(calls) == decoder_calls * (2 if checkpoint else 1)  # checkpointing recomputes each pass
        if mode == "first":  # latent frame 0 alone makes video frame 0
            assert not x.grad[:, :, 1:].any() and x.grad[:, :, 0].any()
    hook.remove()
    # Random frames: distinct, sorted, reproducible; frames inside a latent chunk decode right too.
    frames = select_frames("random_k", 9, 4, torch.Generator().manual_seed(3))
    assert frames == sorted(set(frames)) and frames == select_frames("random_k", 9, 4, torch.Generator().manual_seed(3))
    for subset in (frames, [1], [5, 6]):
        with torch.no_grad():
            video = decode_video_frames(vae, latents, subset, checkpoint=checkpoint)
        assert torch.allclose(video, full[:, :, subset].permute(0, 2, 1, 3, 4), atol=1e-6), subset


def test_prompt_order_is_stateless_and_balanced():
    drawn = [prompt_indices(m, 2, rank, 2, 5, seed=0) for m in range(5) for rank in range(2)]
    flat = [i for batch in drawn for i in batch]
    assert sorted(flat) == sorted(list(range(5)) * 4)  # 20 draws over 5 prompts: each exactly 4 times
    assert prompt_indices(3, 2, 1, 2, 5, seed=0) == drawn[7]
    assert prompt_indices(0, 3, 0, 1, 1, seed=0) == [0, 0, 0]  # fewer prompts than a batch is fine


def test_training_raises_the_reward(trainer):
    config, run, parts = trainer
    config = dataclasses.replace(config, batch_size=2)
    run.optimizer.param_groups[0]["lr"] = run.scheduler.base_lrs[0] = 2e-2

    def policy_reward():  # all prompts, fixed noise
        with torch.no_grad():
            _, metrics = reward_gradient_step(run, parts, list(range(len(TRAIN_PROMPTS))), config,
                                              step_generator(99, 0))
        return metrics["reward_brightness"].item()

    before = policy_reward()
    for step in range(12):
        indices = prompt_indices(step, config.batch_size, 0, 1, len(TRAIN_PROMPTS), seed=0)
        loss, metrics = reward_gradient_step(run, parts, indices, config, step_generator(0, step))
        loss.backward()
        assert run.optimizer_step(bool(torch.isfinite(loss)), []) is not None
    after = policy_reward()
    assert after > before + 0.015, (before, after)  # 0.570 -> 0.601 when written


def test_resume_gives_identical_weights(inputs, tmp_path, capsys):
    common = flags(**inputs, **{**TINY, "max_steps": 4, "save_every": 2, "learning_rate": 1e-2,
                                "gradient_accumulation_steps": 2, "decode_frames": "random_k",
                                "num_decode_frames": 2, "fm_weight": 0.5, "lr_scheduler": "cosine"})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert call_cli(capsys, "train", "--method", "reward_gradient", *common, "--output-dir", straight)[0] == 0
    # Only the mid-run checkpoint: the last step's would leave nothing to resume.
    shutil.copytree(straight / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    code, _, err = call_cli(capsys, "train", "--method", "reward_gradient", *common, "--output-dir", resumed,
                            "--resume-from", "latest")
    assert code == 0, err
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in (resumed / "logs" / "metrics.jsonl").read_text().splitlines()] == [2, 3]


def test_init_adapter_is_where_training_starts(inputs, tmp_path, capsys):
    def train(out, **fields):
        args = flags(**inputs, **{**TINY, **fields})
        code, _, err = call_cli(capsys, "train", "--method", "reward_gradient", *args, "--output-dir", out)
        assert code == 0, err
        rewards = [json.loads(line)["reward_total"] for line in (out / "logs" / "metrics.jsonl").open()]
        return load_file(str(out / "adapter" / "adapter_model.safetensors")), rewards

    first, first_rewards = train(tmp_path / "first", max_steps=2, learning_rate=1e-2)
    # A negligible learning rate: the final adapter is the init adapter, and the policy sampled with it.
    again, again_rewards = train(tmp_path / "again", max_steps=1, learning_rate=1e-12,
                                 init_adapter=tmp_path / "first" / "adapter")
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], atol=1e-9, rtol=0, msg=key)
    assert again_rewards[0] != pytest.approx(first_rewards[0], abs=1e-6)  # not the zero adapter's samples


def test_bad_input_is_one_line(inputs, tmp_path, capsys):
    def fails(args, expected):
        code, _, err = call_cli(capsys, "train", *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    good = {**inputs, **TINY, "output_dir": tmp_path / "run", "max_steps": 1}
    rg = ["--method", "reward_gradient"]
    fails([*rg, *flags(**{**good, "prompts": tmp_path / "none.txt"})], "none.txt: prompt file not found")
    fails([*rg, *flags(**{**good, "rewards": tmp_path / "none.yaml"})], "none.yaml: rewards config not found")
    fails(["--method", "ppo", *flags(**good)], "unknown method 'ppo'")
    fails([*rg, *flags(**good), "--pairs", "x"], "--pairs is not an option of method reward_gradient")
    fails([*rg, *flags(**{**good, "grad_steps": 4})], "field 'grad_steps' must be in 1..steps (3)")
    yaml = tmp_path / "rg.yaml"
    yaml.write_text("method: reward_gradient\npairs: x\n")
    fails(["--config", yaml], "unknown field 'pairs' for RewardGradientConfig")
    not_differentiable = tmp_path / "rewards.yaml"
    not_differentiable.write_text("scorers:\n  brightness: {weight: 0.0}\n")
    fails([*rg, *flags(**{**good, "rewards": not_differentiable})], "no differentiable scorer with a non-zero weight")
    assert not (tmp_path / "run").exists()


def test_shipped_config_and_validation():
    config = config_from_dict(RewardGradientConfig, load_yaml(REPO / "configs" / "reward_gradient.yaml"))
    assert config.method == "reward_gradient" and config.grad_steps == 1 and config.decode_frames == "k_evenly_spaced"
    assert config.reward_normalize == "calibrate"
    assert help_problems(RewardGradientConfig) == []
    base = {"model": "m", "prompts": "p", "rewards": "r", "output_dir": "o"}
    # Like every stage, a frame count that is not 4k + 1 is rounded by ContentV's rule (with a warning).
    assert config_from_dict(RewardGradientConfig, {**base, "frames": 8}).frames == 9
    assert config_from_dict(RewardGradientConfig, {**base, "frames": 5}).num_decode_frames == 5  # min(8, frames)
    for bad, field in (({"frames": 0}, "frames"), ({"decode_frames": "first", "num_decode_frames": 2},
                                                   "num_decode_frames"),
                       ({"decode_frames": "random_k", "num_decode_frames": 0}, "num_decode_frames"),
                       ({"fm_weight": -1}, "fm_weight"), ({"calibration_samples": 1}, "calibration_samples"),
                       ({"rewards": None}, "rewards")):
        with pytest.raises(UserError, match=f"field '{field}'"):
            config_from_dict(RewardGradientConfig, {**base, **bad})


def test_default_decode_reaches_every_latent_frame(tiny_model_dir):
    """The reward's gradient w.r.t. the latents is non-zero on every latent frame with the default decode."""
    vae = load_contentv(tiny_model_dir, dtype="fp32", load_transformer=False, load_text_encoders=False).vae
    base = {"model": "m", "prompts": "p", "rewards": "r", "output_dir": "o", "frames": 17}
    config = config_from_dict(RewardGradientConfig, base)
    assert (config.decode_frames, config.num_decode_frames) == ("k_evenly_spaced", 8)
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # 17 frames: 5 latent frames

    def reach(mode, k):
        x = latents.clone().requires_grad_()
        frames = select_frames(mode, 17, k, torch.Generator().manual_seed(0))
        decode_video_frames(vae, x, frames).mean().backward()  # brightness-like reward of the decoded frames
        return [bool(x.grad[:, :, t].abs().sum() > 0) for t in range(5)]

    assert reach(config.decode_frames, config.num_decode_frames) == [True] * 5
    assert reach("first", None) == [True, False, False, False, False]  # the old default: latent frame 0 only
    # Sparse frames reach the latent frames between them through the causal decoder's cache.
    assert reach("k_evenly_spaced", 2) == [True] * 5  # frames 0 and 16: latent frames 0 and 4


def test_base_anchor_is_zero_at_the_base_and_positive_away_from_it(trainer):
    from dpo.reward_gradient import base_anchor_loss

    config, run, parts = trainer
    x0 = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = parts.text.select([0, 1])
    loss = base_anchor_loss(run, x0, cond, parts.schedule, step_generator(0, 0))
    assert loss.item() == 0.0 and loss.requires_grad  # zero adapter: the policy is the base
    with torch.no_grad():
        for name, param in run.unwrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(2))
    loss = base_anchor_loss(run, x0, cond, parts.schedule, step_generator(0, 0))
    assert loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in run.unwrapped.named_parameters()
               if "lora_" in n)
    # The formula, written out: one eps and one shifted logit-normal sigma per sample from the generator.
    g = step_generator(0, 0)
    eps = torch.randn(x0.shape, generator=g)
    s = torch.sigmoid(torch.randn(2, generator=g))
    s = 3.0 * s / (1 + 2.0 * s)  # the tiny scheduler's shift 3
    x_t = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    model = run.unwrapped
    with torch.no_grad():
        v_policy = model(hidden_states=x_t, timestep=1000 * s, encoder_hidden_states=cond.prompt_embeds,
                         pooled_projections=cond.pooled, return_dict=False)[0]
        model.disable_adapters()
        v_base = model(hidden_states=x_t, timestep=1000 * s, encoder_hidden_states=cond.prompt_embeds,
                       pooled_projections=cond.pooled, return_dict=False)[0]
        model.enable_adapters()
    assert loss.item() == pytest.approx(((v_policy - v_base) ** 2).mean().item(), rel=1e-4)


def test_calibrated_weights_mean_what_they_mean_in_pairs(trainer):
    """Two copies of one reward in different units weigh the same after calibration, as z-scores do in pairs."""
    import numpy as np

    from dpo.reward_gradient import calibrate_rewards
    from rewards.analytic import BrightnessScorer
    from rewards.build import WeightedScorer, weighted_reward
    from rewards.pairs import prompt_scale

    class Scaled(BrightnessScorer):  # brightness in other units: 100 x + 3
        def score(self, frames, prompts):
            return 100 * super().score(frames, prompts) + 3

    config, run, parts = trainer
    config = dataclasses.replace(config, calibration_prompts=2, calibration_samples=3, batch_size=2)
    parts.scorers = {"small": WeightedScorer(BrightnessScorer(), 1.0), "big": WeightedScorer(Scaled(), 1.0)}
    norm = calibrate_rewards(run, parts, config)
    assert norm == calibrate_rewards(run, parts, config)  # deterministic: a resumed run calibrates the same
    assert norm.scale["big"] == pytest.approx(100 * norm.scale["small"], rel=1e-4)
    assert norm.centre["big"] == pytest.approx(100 * norm.centre["small"] + 3, rel=1e-5)

    frames = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    total, raw = weighted_reward(parts.scorers, frames, ["a", "b"], norm)
    z = {k: (raw[k] - norm.centre[k]) / norm.scale[k] for k in raw}
    torch.testing.assert_close(total, z["small"] + z["big"])
    torch.testing.assert_close(z["small"], z["big"], rtol=1e-3, atol=1e-4)  # equal weights, equal say
    raw_total, _ = weighted_reward(parts.scorers, frames, ["a", "b"])
    torch.testing.assert_close(raw_total, raw["small"] + raw["big"])  # none: raw units, "big" dominates

    # The scale is pairs' pooled within-prompt 1.4826 MAD, written out here.
    scores = np.array([[0.1, 5.0], [0.3, 5.0], [0.2, 9.0], [1.0, 1.0], [1.4, 2.0], [1.1, 4.0]])
    groups = ["p", "p", "p", "q", "q", "q"]
    resid = np.array([[-0.1, 0.0], [0.1, 0.0], [0.0, 4.0], [-0.1, -1.0], [0.3, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(prompt_scale(scores, groups), 1.4826 * np.median(np.abs(resid), axis=0))


def test_std_spread_is_the_pooled_within_prompt_standard_deviation(trainer):
    """calibration_spread std divides by sqrt(sum of squared deviations from each prompt's mean / (n - P))."""
    import numpy as np

    from dpo.reward_gradient import calibrate_rewards
    from rewards.analytic import BrightnessScorer
    from rewards.build import WeightedScorer
    from rewards.pairs import prompt_scale, prompt_std

    # Two clusters per prompt (a word drawn right, 1.0, or as its confusion, 0.0): with 3 of 4 videos in one
    # cluster the MAD is that cluster's width (0 here, so it falls back to the std), with 2 and 2 half the gap.
    three_one = np.array([[1.0], [1.0], [1.0], [0.0]] * 2)
    two_two = np.array([[1.0], [1.0], [0.0], [0.0]] * 2)
    groups = ["p"] * 4 + ["q"] * 4
    assert prompt_scale(two_two, groups)[0] == pytest.approx(1.4826 * 0.5)
    assert prompt_std(three_one, groups)[0] == pytest.approx(np.sqrt(2 * 0.75 / 6))  # 3 x 0.25^2 + 0.75^2
    assert prompt_std(two_two, groups)[0] == pytest.approx(np.sqrt(8 * 0.25 / 6))
    scores = np.array([[0.1, 5.0], [0.3, 5.0], [0.2, 9.0], [1.0, 1.0], [1.4, 2.0]])
    squared_deviations = np.array([[0.01, 16 / 9], [0.01, 16 / 9], [0.0, 64 / 9],  # p: means 0.2, 19/3
                                   [0.04, 0.25], [0.04, 0.25]])  # q: means 1.2, 1.5
    written_out = np.sqrt(squared_deviations.sum(axis=0) / (5 - 2))  # 5 videos, 2 prompts
    np.testing.assert_allclose(prompt_std(scores, ["p", "p", "p", "q", "q"]), written_out)
    with pytest.raises(ValueError, match=">= 2 samples"):
        prompt_std(scores[:2], ["p", "q"])

    config, run, parts = trainer
    config = dataclasses.replace(config, calibration_prompts=2, calibration_samples=3, batch_size=2,
                                 calibration_spread="std")
    parts.scorers = {"brightness": WeightedScorer(BrightnessScorer(), 1.0)}
    norm_std = calibrate_rewards(run, parts, config)
    norm_mad = calibrate_rewards(run, parts, dataclasses.replace(config, calibration_spread="mad"))
    assert norm_std.centre == norm_mad.centre  # the same videos: only the spread differs
    assert norm_std.scale != norm_mad.scale
