"""DiffusionNFT trainer: the loss against its formula written out, the optimality probability, the first-update
invariants (tied groups give no gradient), resume N + N = 2N with the old policy restored, 2 processes = 1, bad
input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpo.losses import group_advantages, nft_loss, optimality_probability
from dpo.nft import OLD_PREFIX, follow_policy, nft_update, sample_round, training_levels
from dpo.nft_config import NFTConfig
from dpo.rounds import load_parts
from rlhf.config import config_from_dict, help_problems, load_yaml
from rlhf.training import TRAINER_TENSORS_FILE, TrainingRun
from tests.conftest import REPO, TRAIN_PROMPTS, call_cli
from tests.test_grpo import flags

TINY = dict(frames=5, height=32, width=32, steps=3, guidance=2.0, dtype="fp32", mixed_precision="no",
            report_to="none", lora_rank=4, lora_alpha=8, device="cpu", gradient_checkpointing=False,
            group_size=4, prompts_per_round=2, updates_per_round=2, batch_size=2, timestep_fraction=0.67,
            save_every=2, max_steps=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the loss ----------------------------------------------------------------------------------------------
def test_nft_loss_equals_the_formula_written_out():
    # Two samples of two dimensions; every term computed with plain floats.
    x0 = [[1.0, -1.0], [0.5, 0.0]]
    eps = [[0.0, 2.0], [-1.0, 1.0]]
    s = [0.5, 0.8]
    v = [[-0.5, 2.5], [-1.2, 0.7]]
    v_old = [[-1.0, 3.0], [-1.5, 1.0]]
    v_ref = [[-0.8, 2.0], [-1.5, 1.2]]
    r, beta, scale, kl_weight = [0.9, 0.2], 0.5, 5.0, 0.1
    policy_terms, kl_terms = [], []
    for i in range(2):
        x_s = [(1 - s[i]) * x0[i][d] + s[i] * eps[i][d] for d in range(2)]
        pos = [x_s[d] - s[i] * (beta * v[i][d] + (1 - beta) * v_old[i][d]) for d in range(2)]
        neg = [x_s[d] - s[i] * ((1 + beta) * v_old[i][d] - beta * v[i][d]) for d in range(2)]
        w_pos = sum(abs(pos[d] - x0[i][d]) for d in range(2)) / 2
        w_neg = sum(abs(neg[d] - x0[i][d]) for d in range(2)) / 2
        l_pos = sum((pos[d] - x0[i][d]) ** 2 for d in range(2)) / 2 / w_pos
        l_neg = sum((neg[d] - x0[i][d]) ** 2 for d in range(2)) / 2 / w_neg
        policy_terms.append(r[i] * l_pos / beta + (1 - r[i]) * l_neg / beta)
        kl_terms.append(sum((v[i][d] - v_ref[i][d]) ** 2 for d in range(2)) / 2)
    expected = scale * sum(policy_terms) / 2 + kl_weight * sum(kl_terms) / 2

    t = torch.tensor
    x0_t, eps_t, s_t = t(x0), t(eps), t(s)
    noisy = (1 - s_t[:, None]) * x0_t + s_t[:, None] * eps_t
    loss, metrics = nft_loss(t(v), t(v_old), t(v_ref), noisy, s_t, x0_t, t(r), beta, scale, kl_weight)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx(sum(kl_terms) / 2, rel=1e-6)
    assert float(metrics["policy_loss"]) == pytest.approx(scale * sum(policy_terms) / 2, rel=1e-6)


def test_gradient_at_the_old_policy_is_proportional_to_2r_minus_1():
    g = torch.Generator().manual_seed(0)
    x0, eps, v_old = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.6, 0.9])
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps

    def gradient(r: float) -> torch.Tensor:
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, None, noisy, sigma, x0, torch.full((3,), r), 0.7, 5.0, 0.0)
        loss.backward()
        return v.grad

    assert not gradient(0.5).any()  # a sample as good as its group: no gradient at all
    torch.testing.assert_close(gradient(1.0), -gradient(0.0))
    torch.testing.assert_close(gradient(0.75), 0.5 * gradient(1.0))
    # The good sample's gradient step moves the clean prediction x_s - s v towards x0.
    v = v_old - 1e-3 * gradient(1.0)
    before = (noisy - sigma.view(-1, 1, 1, 1) * v_old - x0).square().sum()
    after = (noisy - sigma.view(-1, 1, 1, 1) * v - x0).square().sum()
    assert after < before


def test_optimality_probability():
    a = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])
    torch.testing.assert_close(optimality_probability(a, 5.0), expected)


def test_follow_policy_and_decay_schedule():
    param = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    old = torch.tensor([0.0, -1.0])
    follow_policy([(param, old)], 0.25)
    torch.testing.assert_close(old, torch.tensor([0.75, 2.0]))  # 0.25 old + 0.75 policy
    config = NFTConfig(model="m", prompts="p", rewards="r", output_dir="o", old_decay_start=10,
                       old_decay_rate=0.01, old_decay_max=0.5, max_steps=2, save_every=2)
    assert [config.old_decay(s) for s in (0, 9, 10, 30, 100)] == [0.0, 0.0, 0.0, pytest.approx(0.2), 0.5]


def test_training_levels_are_distinct_per_video_and_batch_independent():
    config = NFTConfig(model="m", prompts="p", rewards="r", output_dir="o", steps=10, timestep_fraction=0.99,
                       max_steps=2, save_every=2)
    assert config.train_timesteps == 9
    levels = training_levels(config, 3, [0, 5, 7])
    assert levels.shape == (3, 9) and all(len(set(row.tolist())) == 9 for row in levels)
    assert int(levels.max()) <= 9 and int(levels.min()) >= 0
    assert torch.equal(training_levels(config, 3, [5]), levels[1:2])
    assert not torch.equal(training_levels(config, 4, [5]), levels[1:2])


# ---- the trainer -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("nft")
    (root / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "rewards.yaml").write_text("scorers:\n  brightness: {weight: 1.0}\n  contrast: {weight: 0.5}\n"
                                       "device: cpu\n")
    return {"model": str(tiny_model_dir), "prompts": str(root / "prompts.txt"), "rewards": str(root / "rewards.yaml")}


def lora_grads(run):
    return {n: p.grad.clone() for n, p in run.unwrapped.named_parameters() if "lora_" in n and p.grad is not None}


def test_first_update_learns_and_tied_groups_give_no_gradient(inputs, tmp_path):
    config = NFTConfig(**inputs, output_dir=str(tmp_path / "run"), **TINY)
    run = TrainingRun(config, config, "cpu", config)
    parts = load_parts(config, run.device)
    policy = run.load_policy(config.model, "fp32")
    run.prepare(policy)
    named = dict(run.unwrapped.named_parameters())
    old = [(p, p.detach().clone()) for n, p in named.items() if p.requires_grad]
    round_ = sample_round(run, parts, config, 0, old)
    chunks = [c for update in round_.updates for c in update]
    assert sorted(s for c in chunks for s in c.slots) == list(range(8))
    assert all(c.latents.shape == (len(c.slots), 16, 2, 4, 4) for c in chunks)
    assert round_.metrics["reward_std"] > 0 and "reward_contrast" in round_.metrics
    finite, metrics = nft_update(run, parts, config, round_, 0, 0, old)
    # The policy starts as the old policy and the base: no deviation, no KL; rewards still give a gradient.
    assert finite and metrics["old_deviation"] == 0.0 and metrics["kl"] == 0.0
    assert any(g.abs().sum() > 0 for n, g in lora_grads(run).items() if "lora_B" in n)
    for name, param in run.unwrapped.named_parameters():
        assert "lora_" in name or param.grad is None, name
    # Every group tied: r = 1/2 for every video, and no gradient at all (the KL's is 0 at the base too).
    run.optimizer.zero_grad(set_to_none=True)
    for c in chunks:
        c.advantages = group_advantages(torch.ones(len(c.slots), 2), torch.tensor(c.prompts), torch.tensor([1.0, 1.0]))
    _, metrics = nft_update(run, parts, config, round_, 0, 0, old)
    assert metrics["optimality"] == 0.5
    assert all(not g.any() for g in lora_grads(run).values())


def test_resume_gives_identical_weights_and_restores_the_old_policy(inputs, tmp_path, capsys):
    # The old policy keeps half of itself after step 2, so at the step-4 checkpoint it differs from the policy
    # and from its start: a resume that did not restore it would sample round 2 differently.
    common = flags(**inputs, **{**TINY, "max_steps": 6, "save_every": 2, "learning_rate": 1e-2,
                                "kl_weight": 0.5, "old_decay_rate": 0.25, "old_decay_max": 0.5,
                                "lr_scheduler": "cosine"})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, _, err = call_cli(capsys, "train", "--method", "nft", *common, "--output-dir", straight)
    assert code == 0, err
    checkpoint = straight / "checkpoints" / "step-0000004"
    old = load_file(str(checkpoint / TRAINER_TENSORS_FILE))
    adapter = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    assert len(old) == len(adapter) and all(k.startswith(OLD_PREFIX) for k in old)
    # LoRA B starts at 0: the old policy has moved from its start (so a resume must restore it, not rebuild it).
    assert any(v.abs().sum() > 0 for k, v in old.items() if "lora_B" in k)
    shutil.copytree(checkpoint, resumed / "checkpoints" / "step-0000004")
    code, _, err = call_cli(capsys, "train", "--method", "nft", *common, "--output-dir", resumed,
                            "--resume-from", "latest")
    assert code == 0, err
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (straight / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    for key in ("reward_mean", "policy_loss", "kl", "old_deviation", "optimality", "old_decay", "prompts_seen"):
        assert all(key in r for r in records), key
    assert [r["old_decay"] for r in records] == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5]
    assert records[0]["old_deviation"] == 0.0 and records[1]["old_deviation"] > 0  # policy moved within a round
    assert records[2]["old_deviation"] > 0  # the old policy kept half of itself
    resumed_records = [json.loads(line) for line in (resumed / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_records] == [4, 5]
    for key in ("reward_mean", "loss", "old_deviation"):
        assert resumed_records[0][key] == records[4][key], key
    # Damaged state: a checkpoint without the old policy is refused in one line.
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken / "checkpoints" / "step-0000004")
    (broken / "checkpoints" / "step-0000004" / TRAINER_TENSORS_FILE).unlink()
    code, _, err = call_cli(capsys, "train", "--method", "nft", *common, "--output-dir", broken,
                            "--resume-from", "latest")
    assert code == 2 and f"{TRAINER_TENSORS_FILE} missing" in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_is_one_line(inputs, tmp_path, capsys):
    def fails(args, expected):
        code, _, err = call_cli(capsys, "train", *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    good = {**inputs, **TINY, "output_dir": tmp_path / "run"}
    m = ["--method", "nft"]
    fails([*m, *flags(**{**good, "beta": 0})], "field 'beta' must be > 0")
    fails([*m, *flags(**{**good, "timestep_fraction": 0})], "field 'timestep_fraction' must be in (0, 1]")
    fails([*m, *flags(**{**good, "old_decay_max": 1.0})], "field 'old_decay_max' must be in [0, 1)")
    fails([*m, *flags(**{**good, "kl_weight": float("nan")})], "field 'kl_weight' expects a finite number")
    fails([*m, *flags(**{**good, "kl_weight": -1})], "field 'kl_weight' must be >= 0")
    fails([*m, *flags(**{**good, "group_size": 1})], "field 'group_size' must be >= 2")
    fails([*m, *flags(**{**good, "save_every": 3})], "field 'save_every' must be a multiple of updates_per_round")
    fails([*m, *flags(**good), "--noise-level", "0.7"], "--noise-level is not an option of method nft")
    fails([*m, *flags(**{**good, "prompts": tmp_path / "none.txt"})], "none.txt: prompt file not found")
    zero = tmp_path / "zero.yaml"
    zero.write_text("scorers:\n  brightness: {weight: 0.0}\n")
    fails([*m, *flags(**{**good, "rewards": zero})], "every scorer has weight 0; nft needs a reward")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", ["configs/nft.yaml", "configs/world/nft.yaml"])
def test_shipped_configs_load(path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = config_from_dict(NFTConfig, load_yaml(REPO / path), source=path)
    assert config.method == "nft" and config.group_size >= 2
    assert help_problems(NFTConfig) == []


@pytest.mark.slow
def test_two_processes_equal_one(inputs, tmp_path, capsys):
    """Same groups, rewards and advantages, (nearly) the same adapter under torchrun with 2 CPU processes."""
    args = flags(**inputs, **{**TINY, "max_steps": 4, "learning_rate": 1e-2, "old_decay_rate": 0.25})
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = call_cli(capsys, "train", "--method", "nft", *args, "--output-dir", one)
    assert code == 0, err
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf.cli",
         "train", "--method", "nft", *args, "--output-dir", str(two)], cwd=REPO, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr

    def records(out):
        return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]

    for a, b in zip(records(one), records(two), strict=True):
        # Round 0 is sampled by the same weights in other micro-batches (float sums in another order: advantages,
        # normalised by a group's spread, agree to ~2e-5); round 1 by weights that differ in the last digits.
        rel = 1e-4 if a["step"] < 2 else 1e-3
        for key in ("reward_mean", "reward_std", "advantage_abs_mean", "tied_groups", "prompts_seen", "optimality"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-6)
    wa = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    # Adam divides by the gradients' running magnitude, so elements whose gradients are float noise can move by a
    # step in either direction: compare each tensor as a whole (relative norm of the difference).
    for key in wa:
        difference = float((wb[key] - wa[key]).norm() / wa[key].norm().clamp(min=1e-12))
        assert difference < 1e-2, (key, difference)


def test_checkpoints_by_wall_time_fall_at_round_ends(inputs, tmp_path, capsys):
    """save_every_seconds: with a tiny interval every step is due, but a trainer in rounds checkpoints only at a
    round's end; each metrics record carries the wall time since the command started."""
    out = tmp_path / "timed"
    code, _, err = call_cli(capsys, "train", "--method", "nft",
                            *flags(**inputs, **{**TINY, "max_steps": 6, "save_every": 0, "keep_last": 10}),
                            "--save-every-seconds", "1e-6", "--output-dir", out)
    assert code == 0, err
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000004", "step-0000006"]
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["command_seconds"] for line in lines]
    assert len(seconds) == 6 and all(b > a > 0 for a, b in zip(seconds, seconds[1:], strict=False))
    code, _, err = call_cli(capsys, "train", "--method", "nft", *flags(**inputs, **TINY), "--save-every-seconds",
                            "0", "--output-dir", tmp_path / "bad")
    assert code == 2 and "field 'save_every_seconds' must be a finite number of seconds > 0" in err, err
