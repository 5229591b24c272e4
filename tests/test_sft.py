"""SFT on the best samples (`train --method sft`) on the tiny model: the loss and the selection against hand
computations, learning, exact resume, bad input."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpo.losses import flow_matching_loss
from dpo.sft import SampleData, select_best, selection_of, sft_step
from dpo.sft_config import SFTConfig
from rewards.pairs import ScoreCombination
from rlhf.sampling import FlowSchedule, shift_sigmas
from rlhf.training import TrainingRun, step_generator
from rollouts.store import RolloutStore
from tests.conftest import REPO, call_cli

FAST = ["--dtype", "fp32", "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "8", "--report-to", "none",
        "--no-gradient-checkpointing"]
WEIGHTS = {"latent_mean": 1.0, "latent_std": -0.5}  # what the scored store's score files record


def train_args(store, out, *extra):
    return ["train", "--method", "sft", "--store", store, "--output-dir", out, *FAST, *extra]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scored_store(tiny_store, tmp_path_factory):
    """A copy of the tiny store scored on two synthetic rewards: the latents' mean (weight 1) and std (-0.5)."""
    root = tmp_path_factory.mktemp("sft") / "store"
    shutil.copytree(tiny_store.root, root)
    store = RolloutStore(root)
    latents = {r["sample_id"]: store.load_sample(r["sample_id"])["latents"].float() for r in store.manifest()}
    store.write_scores("latent_mean", {"synthetic": True}, WEIGHTS["latent_mean"],
                       {k: float(v.mean()) for k, v in latents.items()})
    store.write_scores("latent_std", {"synthetic": True}, WEIGHTS["latent_std"],
                       {k: float(v.std()) for k, v in latents.items()})
    return store


# ---- the loss ------------------------------------------------------------------------------------------------
def test_flow_matching_loss_equals_the_formula():
    # One element by hand: x0 = 2, eps = -1, v = 0.5 -> target eps - x0 = -3, error (0.5 + 3)^2 = 12.25.
    loss, _ = flow_matching_loss(torch.full((1, 1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1, 1), -1.0),
                                 torch.full((1, 1, 1, 1, 1), 2.0))
    assert loss.item() == 12.25
    # A batch: mean over C, T, H, W of each sample's squared error, then the mean over samples.
    g = torch.Generator().manual_seed(3)
    v, eps, x0 = (torch.randn(3, 2, 2, 3, 4, generator=g) for _ in range(3))
    per_sample = [sum((v[i].flatten()[j] - (eps[i].flatten()[j] - x0[i].flatten()[j])) ** 2 for j in range(48)) / 48
                  for i in range(3)]
    loss, metrics = flow_matching_loss(v, eps, x0)
    assert loss.item() == pytest.approx(float(sum(per_sample) / 3), rel=1e-6)
    assert metrics["loss"].item() == loss.item() and not metrics["loss"].requires_grad


def test_sft_step_noises_the_chosen_latents_as_written(scored_store, tmp_path):
    """sft_step's loss with a zero adapter = the base model's error at x_s = (1 - s) x0 + s eps, with the noise and
    sigma drawn from the step's generator (noise first, then the logit-normal sigma, shifted)."""
    config = SFTConfig(store=str(scored_store.root), output_dir=str(tmp_path / "run"), dtype="fp32",
                       mixed_precision="no", lora_rank=4, lora_alpha=8, report_to="none", gradient_checkpointing=False,
                       top_k=2, batch_size=2)
    selected, _ = selection_of(config, scored_store)
    data = SampleData(scored_store, selected)
    model_dir = scored_store.settings["model"]
    schedule = FlowSchedule.from_file(f"{model_dir}/scheduler/scheduler_config.json")
    run = TrainingRun(config, config, "cpu", config)
    run.prepare(run.load_policy(model_dir, "fp32"))
    batch = data.batch([0, 3])
    loss, _ = sft_step(run, batch, config, schedule, step_generator(0, 5))

    g = step_generator(0, 5)
    x0 = batch.latents.float()
    eps = torch.randn(x0.shape, generator=g)
    s = shift_sigmas(torch.sigmoid(torch.randn(2, generator=g)), schedule.shift)
    x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    with torch.no_grad(), run.reference_mode() as base:
        v = base(hidden_states=x_s, encoder_hidden_states=batch.text.prompt_embeds, pooled_projections=batch.text.pooled,
                 timestep=s * 1000).sample
    expected = ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3, 4)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- the selection -------------------------------------------------------------------------------------------
def hand_z(values):
    """Robust per-prompt z-score of one prompt's values (pairs' normalize: prompt, no pooling), written out."""
    median = sorted(values)[len(values) // 2] if len(values) % 2 else sum(sorted(values)[len(values) // 2 - 1:
                                                                                     len(values) // 2 + 1]) / 2
    deviations = sorted(abs(v - median) for v in values)
    n = len(deviations)
    mad = deviations[n // 2] if n % 2 else (deviations[n // 2 - 1] + deviations[n // 2]) / 2
    return [(v - median) / (1.4826 * mad + 1e-6) for v in values]


def test_selection_is_the_top_k_by_the_pairs_combined_score():
    a = {"s0": (1.0, 0.1), "s1": (3.0, 0.9), "s2": (2.0, 0.2), "s3": (0.5, 0.4), "s4": (2.5, 0.3)}
    b = {"t0": (0.2, 1.0), "t1": (0.9, 0.5), "t2": (0.4, 2.0), "t3": (float("nan"), 0.0), "t4": (0.3, 0.7)}
    table = [{"sample_id": k, "prompt_id": pid, "scores": {"clip": c, "flicker": f}}
             for pid, group in (("pa", a), ("pb", b)) for k, (c, f) in group.items()]
    weights = {"clip": 1.0, "flicker": -2.0}  # flicker is a penalty
    combination = ScoreCombination(weights=weights, normalize="prompt", pool_scale_below=0)

    expected = {}
    for pid, group in (("pa", a), ("pb", b)):
        valid = {k: v for k, v in group.items() if not math.isnan(v[0])}  # t3 has a NaN score: never selected
        z_clip, z_flicker = hand_z([v[0] for v in valid.values()]), hand_z([v[1] for v in valid.values()])
        combined = {k: 1.0 * zc - 2.0 * zf for k, zc, zf in zip(valid, z_clip, z_flicker, strict=True)}
        expected[pid] = sorted(combined.items(), key=lambda item: -item[1])
    selected, summary = select_best(table, combination, top_k=2)
    assert [(s.prompt_id, s.sample_id, s.rank) for s in selected] == [
        (pid, k, r) for pid in ("pa", "pb") for r, (k, _) in enumerate(expected[pid][:2])]
    for s in selected:
        assert s.score == pytest.approx(dict(expected[s.prompt_id])[s.sample_id], rel=1e-9)
        assert s.scores == {"clip": a.get(s.sample_id, b.get(s.sample_id))[0],
                            "flicker": a.get(s.sample_id, b.get(s.sample_id))[1]}
    assert summary["samples"] == 4 and summary["prompts"] == 2 and summary["excluded_samples"] == 1
    assert summary["weights"] == weights and summary["store_samples"] == 10

    # min_score keeps only the top_k at or above it; top_k larger than a prompt takes all its valid samples.
    threshold = expected["pa"][1][1] + 1e-9
    kept, summary = select_best(table, combination, top_k=10, min_score=threshold)
    assert {s.sample_id for s in kept} == {k for pid in expected for k, v in expected[pid] if v >= threshold}
    assert summary["below_min_score"] == 9 - len(kept)
    # Ties keep store order.
    tied = [{"sample_id": f"x{i}", "prompt_id": "p", "scores": {"r": 1.0}} for i in range(3)]
    assert [s.sample_id for s in select_best(tied, ScoreCombination(), top_k=2)[0]] == ["x0", "x1"]


def test_empty_weights_take_the_weights_recorded_by_score(scored_store, tmp_path):
    config = SFTConfig(store=str(scored_store.root), output_dir=str(tmp_path / "run"), top_k=1)
    selected, summary = selection_of(config, scored_store)
    assert summary["weights"] == WEIGHTS
    from rewards.scoring import score_table

    explicit = select_best(score_table(scored_store), ScoreCombination(weights=WEIGHTS), top_k=1)[0]
    assert selected == explicit and len(selected) == 6  # one per prompt
    flipped = select_best(score_table(scored_store), ScoreCombination(weights={"latent_mean": -1.0}), top_k=1)[0]
    assert [s.sample_id for s in flipped] != [s.sample_id for s in selected]


# ---- training --------------------------------------------------------------------------------------------------
def chosen_error(model_dir, adapter, store, sample_ids):
    """Mean flow-matching error over the samples at 8 fixed (noise, sigma) draws each."""
    from rlhf.lora import load_adapter
    from rlhf.models.loader import load_contentv

    transformer = load_contentv(model_dir, dtype="fp32", load_vae=False, load_text_encoders=False).transformer
    if adapter is not None:
        load_adapter(transformer, adapter)
    g = torch.Generator().manual_seed(123)
    errors = []
    with torch.no_grad():
        for sample in sample_ids:
            x0 = store.load_sample(sample)["latents"].float()[None].expand(8, -1, -1, -1, -1)
            text = store.load_embeds(sample.rsplit("_s", 1)[0])
            eps = torch.randn(x0.shape, generator=g)
            s = torch.linspace(0.1, 0.9, 8)
            x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
            v = transformer(hidden_states=x_s, encoder_hidden_states=text.prompt_embeds.expand(8, -1, -1),
                            pooled_projections=text.pooled.expand(8, -1), timestep=s * 1000).sample
            errors.append(flow_matching_loss(v, eps, x0)[0].item())
    return sum(errors) / len(errors)


def test_training_lowers_the_error_on_the_chosen_samples(scored_store, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call_cli(capsys, *train_args(scored_store.root, out, "--max-steps", "40", "--learning-rate", "3e-3",
                                                "--batch-size", "2", "--save-every", "0"))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sft" and summary["steps_done"] == 40 and summary["skipped_steps"] == 0
    selection = summary["selection"]
    assert selection["samples"] == 6 and selection["prompts"] == 6 and selection["top_k"] == 1
    assert selection["weights"] == WEIGHTS and selection["file"] == "logs/selected_samples.jsonl"
    recorded = [json.loads(line) for line in (out / selection["file"]).read_text().splitlines()]
    expected, _ = selection_of(SFTConfig(store=str(scored_store.root), output_dir=str(out)), scored_store)
    assert [r["sample_id"] for r in recorded] == [s.sample_id for s in expected]
    assert len(metrics(out)) == 40 and all(math.isfinite(r["loss"]) for r in metrics(out))
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # the adapter moved off zero

    model_dir = scored_store.settings["model"]
    chosen = [r["sample_id"] for r in recorded]
    base = chosen_error(model_dir, None, scored_store, chosen)
    tuned = chosen_error(model_dir, out / "adapter", scored_store, chosen)
    assert tuned < 0.9 * base, (base, tuned)


def test_resume_gives_identical_weights(scored_store, tmp_path, capsys):
    common = ["--max-steps", "6", "--save-every", "3", "--learning-rate", "1e-3", "--lora-dropout", "0.1",
              "--gradient-accumulation-steps", "2", "--batch-size", "2", "--top-k", "2", "--lr-scheduler", "cosine",
              "--warmup-steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert call_cli(capsys, *train_args(scored_store.root, straight, *common))[0] == 0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    # A second run that only has the step-3 checkpoint (and logs up to step 6, as a run killed while writing its
    # last checkpoint) continues to step 6, logging steps 3-5 once more.
    shutil.copytree(straight / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    shutil.copytree(straight / "logs", resumed / "logs")
    code, _, err = call_cli(capsys, *train_args(scored_store.root, resumed, *common, "--resume-from", "latest"))
    assert code == 0, err
    a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(resumed)] == list(range(6))
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]
    # Another selection is other data: resuming under it is refused, naming what changed.
    code, _, err = call_cli(capsys, *train_args(scored_store.root, resumed, *common, "--top-k", "1",
                                                "--resume-from", "latest"))
    assert code == 2 and "top_k" in err, err


def test_two_cpu_processes(scored_store, tmp_path):
    out = tmp_path / "run"
    args = train_args(scored_store.root, out, "--max-steps", "2", "--device", "cpu", "--top-k", "2")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf.cli",
         *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stderr
    state = json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    # Each process draws its own slice of one permutation: a global batch never repeats a sample.
    data = SampleData(scored_store, selection_of(SFTConfig(store=str(scored_store.root), output_dir=str(out), top_k=2),
                                                 scored_store)[0])
    for micro in range(2):
        ranks = [data.indices(micro, 1, rank, 2, 0) for rank in range(2)]
        assert len(set(ranks[0] + ranks[1])) == 2


# ---- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_exits_2_with_one_line(scored_store, tmp_path, capsys):
    def fails(args, expected):
        code, _, err = call_cli(capsys, *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    unscored = tmp_path / "unscored"
    shutil.copytree(scored_store.root, unscored, ignore=shutil.ignore_patterns("scores"))
    fails(train_args(unscored, tmp_path / "r1"), "the store has no scores; run `contentv-rlhf score")
    fails(train_args(scored_store.root, tmp_path / "r2", "--top-k", "0"), "field 'top_k' must be >= 1, got 0")
    fails(train_args(scored_store.root, tmp_path / "r3", "--min-score", "nan"), "min_score")
    nan_store = RolloutStore(tmp_path / "nan_store")
    shutil.copytree(scored_store.root, nan_store.root)
    for name in nan_store.scored_dimensions():  # every score NaN, as a file written by hand would hold it
        data = nan_store.read_scores(name)
        (nan_store.score_path(name)).write_text(json.dumps({**data, "scores": dict.fromkeys(data["scores"], np.nan)}))
    fails(train_args(nan_store.root, tmp_path / "r4"),
          "no sample selected: 24 of 24 sample(s) have a non-finite or missing score")
    fails(train_args(scored_store.root, tmp_path / "r5", "--min-score", "1000"),
          "no sample selected: none of the 24 scored sample(s) has a combined score >= min_score 1000")
    fails(train_args(scored_store.root, tmp_path / "r6", "--weights", "{clipp: 1.0}"),
          "unknown dimension 'clipp'")
    fails(train_args(scored_store.root, tmp_path / "r7", "--batch-size", "7"),
          "6 selected sample(s) are fewer than one global batch")
    fails(train_args(scored_store.root, tmp_path / "r8", "--pairs", "x"), "--pairs is not an option of method sft")
    for name in ("r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8"):
        assert not (tmp_path / name).exists(), name
