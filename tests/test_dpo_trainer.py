"""Flow-DPO trainer on the tiny model: init invariants, learning, exact resume, 2 processes, bad input."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpo.config import DPOConfig
from dpo.data import PairData
from dpo.trainer import dpo_step
from rlhf.models.loader import load_contentv
from rlhf.sampling import FlowSchedule
from rlhf.training import TrainingRun, step_generator
from tests.conftest import REPO, call_cli

FAST = ["--dtype", "fp32", "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none",
        "--no-gradient-checkpointing"]


def train_args(pairs, out, *extra):
    return ["train", "--pairs", pairs, "--output-dir", out, *FAST, *extra]


def adapter_weights(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_parts(tiny_pairs, tiny_store, tmp_path):
    config = DPOConfig(pairs=str(tiny_pairs), output_dir=str(tmp_path / "run"), dtype="fp32", mixed_precision="no",
                       lora_rank=4, lora_alpha=8, report_to="none", gradient_checkpointing=False)
    data = PairData(tiny_pairs, tiny_store)
    model_dir = tiny_store.settings["model"]
    run = TrainingRun(config, config, "cpu", config)
    run.prepare(run.load_policy(model_dir, "fp32"))
    return config, data, run, FlowSchedule.from_file(f"{model_dir}/scheduler/scheduler_config.json")


def test_init_loss_is_log2_and_reference_is_the_base_model(run_parts):
    config, data, run, schedule = run_parts
    batch = data.batch([0, 1])
    loss, metrics = dpo_step(run, batch, config, schedule, step_generator(0, 0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["implicit_accuracy"].item() == 0.5

    # Make the adapter non-zero: the policy moves, the reference (adapter disabled) stays the base model.
    with torch.no_grad():
        for name, param in run.unwrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    base = load_contentv(data.store.settings["model"], dtype="fp32", load_vae=False, load_text_encoders=False)
    inputs = dict(hidden_states=batch.latents_w.float(), encoder_hidden_states=batch.text.prompt_embeds.float(),
                  pooled_projections=batch.text.pooled.float(), timestep=torch.tensor([300.0, 700.0]))
    with torch.no_grad():
        expected = base.transformer(**inputs).sample
        run.unwrapped.disable_adapters()
        reference = run.unwrapped(**inputs).sample
        run.unwrapped.enable_adapters()
        policy = run.unwrapped(**inputs).sample
    assert torch.equal(reference, expected)
    assert not torch.allclose(policy, expected)


def test_training_raises_implicit_accuracy(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "40", "--learning-rate", "3e-3",
                                                "--beta", "2000", "--save-every", "0"))
    assert code == 0, err
    rows = metrics(out)
    assert len(rows) == 40
    assert rows[0]["implicit_accuracy"] == 0.5 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    late = rows[-10:]
    assert sum(r["implicit_accuracy"] for r in late) / 10 >= 0.8
    assert sum(r["loss"] for r in late) / 10 < math.log(2) - 0.05
    trainable = adapter_weights(out)
    assert trainable and all("lora_" in k for k in trainable)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["skipped_steps"] == 0
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert (out / "adapter" / "training_config.yaml").exists()


def test_resume_gives_identical_weights(tiny_pairs, tmp_path, capsys):
    common = ["--max-steps", "6", "--save-every", "3", "--learning-rate", "1e-3", "--lora-dropout", "0.1",
              "--gradient-accumulation-steps", "2", "--lr-scheduler", "cosine", "--warmup-steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert call_cli(capsys, *train_args(tiny_pairs, straight, *common))[0] == 0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    # A second run that only has the step-3 checkpoint continues to step 6.
    shutil.copytree(straight / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, resumed, *common, "--resume-from", "latest"))
    assert code == 0, err
    a, b = adapter_weights(straight), adapter_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(resumed)] == [3, 4, 5]


def test_keep_last_checkpoints(tiny_pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "9", "--save-every", "2",
                                        "--keep-last", "2"))[0] == 0
    # The last step is always checkpointed, on top of every save_every.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000008", "step-0000009"]


def test_two_cpu_processes(tiny_pairs, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_pairs, out, "--max-steps", "3", "--device", "cpu", "--save-every", "2")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf.cli",
         *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stderr
    state = json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert sorted(p.name for p in (out / "checkpoints" / "step-0000002").glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]
    assert adapter_weights(out)


def test_bad_input(tiny_pairs, tiny_store, tmp_path, capsys):
    def fails(args, expected):
        code, _, err = call_cli(capsys, *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    # Pairs naming samples the store does not have.
    from datasets import load_from_disk

    pairs = load_from_disk(str(tiny_pairs))
    broken = tmp_path / "broken_pairs"
    pairs.map(lambda row: {"chosen_id": "p09999_s000"}).save_to_disk(str(broken))
    shutil.copy(tiny_pairs / "summary.json", broken / "summary.json")
    capsys.readouterr()
    fails(train_args(broken, tmp_path / "r1"), "(e.g. p09999_s000); were the pairs built from another store?")
    # A store made with another model (latent channels differ).
    other = tmp_path / "other_store"
    shutil.copytree(tiny_store.root, other)
    meta = json.loads((other / "store.json").read_text())
    meta["latent_shape"][0] = 8
    (other / "store.json").write_text(json.dumps(meta))
    fails(train_args(tiny_pairs, tmp_path / "r2", "--store", other), "latent channels is 8 but the transformer")
    # LoRA targets that do not exist.
    fails(train_args(tiny_pairs, tmp_path / "r3", "--lora-targets", "attn.to_qq"), "attn.to_qq not found")
    # A corrupt checkpoint.
    ckpt = tmp_path / "r4" / "checkpoints" / "step-0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    fails(train_args(tiny_pairs, tmp_path / "r4", "--resume-from", "latest"), "step-0000001: incomplete checkpoint")
    for name in ("r1", "r2", "r3"):
        assert not (tmp_path / name).exists(), name
    assert not (tmp_path / "r4" / "adapter").exists()


def test_init_adapter_and_previous_round_reference(tiny_pairs, tmp_path, capsys):
    first = tmp_path / "round0"
    assert call_cli(capsys, *train_args(tiny_pairs, first, "--max-steps", "8", "--learning-rate", "3e-3",
                                        "--beta", "2000", "--save-every", "0"))[0] == 0
    adapter = first / "adapter"
    # Reference = base + the previous adapter, policy starts there too: the first step is exactly log 2.
    continued = tmp_path / "round1"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, continued, "--max-steps", "2", "--save-every", "0",
                                                "--init-adapter", adapter, "--reference", "init"))
    assert code == 0, err
    assert metrics(continued)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Reference = base while the policy starts from the previous adapter: it already prefers the winners.
    against_base = tmp_path / "round1_base"
    assert call_cli(capsys, *train_args(tiny_pairs, against_base, "--max-steps", "2", "--save-every", "0",
                                        "--init-adapter", adapter, "--beta", "2000"))[0] == 0
    assert metrics(against_base)[0]["loss"] < math.log(2) - 0.01
    # The frozen reference adapter is not saved into the result; only the trained one is.
    assert all(".reference." not in k for k in adapter_weights(continued))
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, tmp_path / "bad", "--reference", "init"))
    assert code == 2 and "init_adapter" in err


def test_non_finite_steps_are_skipped_then_stop(tiny_pairs, tmp_path, capsys, monkeypatch):
    import dpo.trainer

    real_loss = dpo.trainer.flow_dpo_loss
    calls = {"n": 0}

    def nan_on_second_call(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * torch.nan if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(dpo.trainer, "flow_dpo_loss", nan_on_second_call)
    out = tmp_path / "one_nan"
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, out, "--max-steps", "4", "--save-every", "0"))
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    assert "grad_norm" not in metrics(out)[1] and "grad_norm" in metrics(out)[2]  # step 1 made no update

    monkeypatch.setattr(dpo.trainer, "flow_dpo_loss", lambda *a, **k: (real_loss(*a, **k)[0] * torch.nan,
                                                                       real_loss(*a, **k)[1]))
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, tmp_path / "all_nan", "--max-steps", "20",
                                                "--max-nonfinite-steps", "3"))
    assert code == 2
    assert "training stopped at step 2: 3 consecutive non-finite losses (last batch: p0" in err
    assert ">" in err  # pair ids are "chosen>rejected"
