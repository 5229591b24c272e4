"""GRPO trainer: the SDE step against its formulas, advantages, the loss, first-update invariants, resume, bad input."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpo.grpo import grpo_update, sample_round
from dpo.grpo_config import GRPOConfig
from dpo.losses import group_advantages, grpo_loss
from dpo.rounds import load_parts, round_blocks, round_prompts
from rlhf.config import config_from_dict, help_problems, load_yaml
from rlhf.errors import UserError
from rlhf.sampling import euler_step, sde_step_with_logprob
from rlhf.training import TrainingRun
from tests.conftest import REPO, TRAIN_PROMPTS, call_cli

TINY = dict(frames=5, height=32, width=32, steps=3, guidance=2.0, dtype="fp32", mixed_precision="no",
            report_to="none", lora_rank=4, lora_alpha=8, device="cpu", gradient_checkpointing=False,
            group_size=4, prompts_per_round=2, updates_per_round=2, batch_size=2, sde_window_size=2,
            save_every=2, max_steps=2)


def flags(**fields):
    args = []
    for key, value in fields.items():
        name = key.replace("_", "-")
        args += [f"--{'' if value else 'no-'}{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the SDE step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, sigma_next", [(0.6, 0.45), (1.0, 0.8)])
def test_sde_step_equals_its_formulas(sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(2, 16, 2, 4, 4, generator=g) for _ in range(3))
    a, sigma_max = 0.7, 0.8
    nxt, log_prob, mean, std_t = sde_step_with_logprob(x, v, sigma, sigma_next, a, sigma_max=sigma_max, noise=eps)
    # The formulas written out (flow_grpo sd3_sde_with_logprob.py): at sigma = 1 the denominator uses sigma_max.
    dt = sigma_next - sigma
    expected_std_t = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    expected_mean = (x * (1 + expected_std_t**2 / (2 * sigma) * dt)
                     + v * (1 + expected_std_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    std = expected_std_t * math.sqrt(-dt)
    assert std_t == pytest.approx(expected_std_t, rel=1e-12)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nxt, expected_mean + std * eps, rtol=1e-6, atol=1e-6)
    density = torch.distributions.Normal(expected_mean, std).log_prob(nxt)  # (B, C, T, H, W)
    torch.testing.assert_close(log_prob, density.mean(dim=(1, 2, 3, 4)), rtol=1e-5, atol=1e-5)  # MEAN over dims
    # Recomputing the log-probability of the stored transition gives the same value; a generator draws the noise.
    again = sde_step_with_logprob(x, v, sigma, sigma_next, a, sigma_max=sigma_max, next_latents=nxt)
    assert torch.equal(again[0], nxt) and torch.equal(again[1], log_prob)
    drawn = sde_step_with_logprob(x, v, sigma, sigma_next, a, sigma_max=sigma_max,
                                  generator=torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(drawn, expected_mean + std * torch.randn(x.shape, generator=torch.Generator()
                                                                          .manual_seed(5)), rtol=1e-6, atol=1e-6)


def test_noise_level_zero_is_the_euler_step():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 16, 2, 4, 4, generator=g)
    for sigma, sigma_next in ((1.0, 0.9), (0.37, 0.21), (0.05, 0.0)):
        nxt, log_prob, mean, std_t = sde_step_with_logprob(x, v, sigma, sigma_next, 0.0, sigma_max=0.9)
        assert torch.equal(nxt, euler_step(x, v, sigma, sigma_next)) and torch.equal(mean, nxt)
        assert std_t == 0 and not log_prob.any()


# ---- advantages and loss -----------------------------------------------------------------------------------
def test_group_advantages_per_prompt_per_reward():
    # Prompt 7: rewards 1, 2, 3 (mean 2, population std sqrt(2/3)); prompt 3: all equal -> exactly 0.
    rewards = torch.tensor([[1.0], [2.0], [3.0], [0.1], [0.1], [0.1]])
    groups = torch.tensor([7, 7, 7, 3, 3, 3])
    adv = group_advantages(rewards, groups, torch.tensor([1.0]))
    s = math.sqrt(2 / 3) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0]))
    assert torch.equal(adv[3:], torch.zeros(3))  # not rounding noise of (0.1 - mean) / 1e-4
    # Two rewards in different units: each is normalised within the group, then weighted.
    two = torch.cat([rewards, 1000 * rewards[:, :1] + 5], dim=1)
    adv2 = group_advantages(two, groups, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(adv2[:3], 1.5 * adv[:3], rtol=1e-3, atol=1e-4)
    # Clipped to +-clip: one outlier among many equal rewards.
    outlier = torch.tensor([[0.0]] * 99 + [[1.0]])
    assert group_advantages(outlier, torch.zeros(100), torch.tensor([1.0]), clip=5.0).max() == 5.0


def test_grpo_loss_hand_values():
    log_prob = torch.tensor([0.1, -0.2], requires_grad=True)
    old = torch.tensor([0.0, 0.0])
    adv = torch.tensor([1.0, -2.0])
    mean = torch.zeros(2, 3)
    ref = torch.tensor([[0.0, 0.0, 0.3], [0.6, 0.0, 0.0]])
    loss, m = grpo_loss(log_prob, old, adv, 0.05, mean, ref, std=0.5, beta=0.1)
    r = torch.exp(torch.tensor([0.1, -0.2]))
    # Sample 0: A > 0, ratio 1.105 > 1.05 -> the clipped -1.05; sample 1: A < 0, ratio 0.819 < 0.95 -> clipped 1.9.
    policy = (max(-1 * r[0], -1 * 1.05) + max(2 * r[1], 2 * 0.95)) / 2
    kl = ((0.09 / 3) + (0.36 / 3)) / 2 / (2 * 0.25)
    assert m["policy_loss"].item() == pytest.approx(float(policy), rel=1e-6)
    assert m["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(float(policy) + 0.1 * kl, rel=1e-6)
    assert m["clip_frac"].item() == 1.0 and m["approx_kl"].item() == pytest.approx((0.01 + 0.04) / 4, rel=1e-6)
    loss.backward()
    assert not log_prob.grad.any()  # both clipped: no policy gradient


# ---- the trainer on the tiny model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    (root / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "rewards.yaml").write_text("scorers:\n  brightness: {weight: 1.0}\n  contrast: {weight: 0.5}\n"
                                       "device: cpu\n")
    return {"model": str(tiny_model_dir), "prompts": str(root / "prompts.txt"), "rewards": str(root / "rewards.yaml")}


@pytest.fixture
def trainer(inputs, tmp_path):
    config = GRPOConfig(**inputs, output_dir=str(tmp_path / "run"), **TINY)
    run = TrainingRun(config, config, "cpu", config)
    parts = load_parts(config, run.device)
    run.prepare(run.load_policy(config.model, "fp32"))
    return config, run, parts


def lora_grads(run):
    return {n: p.grad.clone() for n, p in run.unwrapped.named_parameters() if "lora_" in n and p.grad is not None}


def test_first_update_ratio_one_kl_zero_and_tied_groups_give_no_gradient(trainer):
    config, run, parts = trainer
    round_ = sample_round(run, parts, config, 0)
    chunks = [c for update in round_.updates for c in update]
    assert sorted(s for c in chunks for s in c.slots) == list(range(8))  # 2 prompts x G=4, split over 2 updates
    assert all(c.states.shape == (len(c.slots), 3, 16, 2, 4, 4) and c.log_probs.shape == (len(c.slots), 2)
               for c in chunks)
    # Advantages are per prompt: zero-mean within each group.
    prompts = round_prompts(0, config, len(TRAIN_PROMPTS))
    for p in prompts:
        assert abs(float(sum(c.advantages[i] for c in chunks for i, q in enumerate(c.prompts) if q == p))) < 1e-5
    assert round_.metrics["reward_std"] > 0 and "reward_brightness" in round_.metrics
    # The policy at the round's start recomputes the stored log-probabilities exactly; it is the reference (B = 0).
    finite, metrics = grpo_update(run, parts, config, round_, 0)
    assert finite and metrics["ratio"] == 1.0 and metrics["kl"] == 0.0 and metrics["clip_frac"] == 0.0
    assert metrics["approx_kl"] == 0.0
    grads = lora_grads(run)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    for name, param in run.unwrapped.named_parameters():
        assert "lora_" in name or param.grad is None, name
    # A group whose rewards are all equal: advantage 0, no gradient at all (the KL's too, at the reference).
    run.optimizer.zero_grad(set_to_none=True)
    for c in chunks:
        c.advantages = group_advantages(torch.ones(len(c.slots), 2), torch.tensor(c.prompts), torch.tensor([1.0, 1.0]))
    assert not any(c.advantages.any() for c in chunks)
    grpo_update(run, parts, config, round_, 0)
    assert all(not g.any() for g in lora_grads(run).values())


def test_ratio_moves_after_a_step_and_clip_fraction_is_reported(trainer):
    config, run, parts = trainer
    run.optimizer.param_groups[0]["lr"] = 5e-2
    round_ = sample_round(run, parts, config, 0)
    grpo_update(run, parts, config, round_, 0)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _, metrics = grpo_update(run, parts, config, round_, 1)
    assert metrics["approx_kl"] > 0 and metrics["kl"] > 0 and metrics["clip_frac"] > 0


def test_rounds_are_the_same_for_any_process_count():
    config = GRPOConfig(model="m", prompts="p", rewards="r", output_dir="o", group_size=4, prompts_per_round=3,
                        updates_per_round=2, max_steps=2, save_every=2)
    one = round_blocks(5, config, 0, 1)
    two = [round_blocks(5, config, r, 2) for r in range(2)]
    for u in range(2):  # update u trains on the same videos under 1 or 2 processes
        assert sorted(one[u]) == sorted(two[0][u] + two[1][u])
    assert sorted(one[0] + one[1]) == list(range(12))
    with pytest.raises(UserError, match="multiple of updates_per_round x processes"):
        round_blocks(0, config, 0, 4)
    assert round_prompts(3, config, 6) == round_prompts(3, config, 6)
    sliding = dataclasses.replace(config, steps=5, sde_window_size=2, sde_window_start=1, window_slide_every=2)
    assert [sliding.window(r).start for r in range(8)] == [1, 1, 2, 2, 3, 3, 0, 0]
    fixed = dataclasses.replace(sliding, sde_window="fixed")
    assert {fixed.window(r) for r in range(8)} == {range(1, 3)}


def test_resume_gives_identical_weights(inputs, tmp_path, capsys):
    common = flags(**inputs, **{**TINY, "max_steps": 4, "save_every": 2, "learning_rate": 1e-2, "beta": 0.5,
                                "lr_scheduler": "cosine"})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = call_cli(capsys, "train", "--method", "grpo", *common, "--output-dir", straight)
    assert code == 0, err
    shutil.copytree(straight / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    code, _, err = call_cli(capsys, "train", "--method", "grpo", *common, "--output-dir", resumed,
                            "--resume-from", "latest")
    assert code == 0, err
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "clip_frac", "kl", "approx_kl", "loss", "prompts_seen"):
        assert all(key in r for r in records), key
    assert records[0]["ratio"] == 1.0 and records[0]["kl"] == 0.0 and records[1]["approx_kl"] > 0
    assert records[0]["reward_mean"] == records[1]["reward_mean"]  # one round, two updates
    resumed_records = [json.loads(line) for line in (resumed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_records] == [2, 3]
    assert resumed_records[0]["reward_mean"] == records[2]["reward_mean"]


def test_bad_input_is_one_line(inputs, tmp_path, capsys):
    def fails(args, expected):
        code, _, err = call_cli(capsys, "train", *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    good = {**inputs, **TINY, "output_dir": tmp_path / "run"}
    g = ["--method", "grpo"]
    fails([*g, *flags(**{**good, "group_size": 1})], "field 'group_size' must be >= 2")
    fails([*g, *flags(**{**good, "sde_window_size": 4})], "field 'sde_window_size' must be in 1..steps (3)")
    fails([*g, *flags(**{**good, "sde_window_start": 2})], "field 'sde_window_start' must be in 0..steps")
    fails([*g, *flags(**{**good, "save_every": 3})], "field 'save_every' must be a multiple of updates_per_round")
    fails([*g, *flags(**{**good, "updates_per_round": 3, "max_steps": 3, "save_every": 3})],
          "field 'updates_per_round' must divide")
    fails([*g, *flags(**{**good, "noise_level": 0})], "field 'noise_level' must be in (0")
    fails([*g, *flags(**good), "--grad-steps", "1"], "--grad-steps is not an option of method grpo")
    fails([*g, *flags(**{**good, "prompts": tmp_path / "none.txt"})], "none.txt: prompt file not found")
    zero = tmp_path / "zero.yaml"
    zero.write_text("scorers:\n  brightness: {weight: 0.0}\n")
    fails([*g, *flags(**{**good, "rewards": zero})], "every scorer has weight 0")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["configs/grpo.yaml", "configs/world/grpo.yaml"])
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = config_from_dict(GRPOConfig, load_yaml(REPO / path), source=path)
    assert config.method == "grpo" and config.group_size >= 2
    assert help_problems(GRPOConfig) == []


def test_two_processes_equal_one(inputs, tmp_path, capsys):
    """Same groups, same rewards and advantages, (nearly) the same adapter under torchrun with 2 CPU processes."""
    import subprocess
    import sys

    args = flags(**inputs, **{**TINY, "learning_rate": 1e-2})
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = call_cli(capsys, "train", "--method", "grpo", *args, "--output-dir", one)
    assert code == 0, err
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf.cli",
         "train", "--method", "grpo", *args, "--output-dir", str(two)], cwd=REPO, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr

    def records(out):
        return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(records(one), records(two), strict=True):
        for key in ("reward_mean", "reward_std", "advantage_abs_mean", "tied_groups", "prompts_seen", "ratio"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-6)
    wa = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-3, atol=1e-6, msg=key)
