"""The stages the per-family files leave out, on every family's tiny checkpoint but ContentV's (the rest of the suite
runs them on ContentV): SFT on the scored store, an online-DPO round, eval -> report, and the compare page's sampler.

Each family's tiny checkpoint and Flow-DPO adapter (rollout -> score -> pairs -> train -> merge -> eval) are the
session's (tests/conftest.py `family_model` / `family_run`), shared with tests/test_models_*.py. Every adapter a stage
writes must record the family and be trained away from the zero init of lora_B.
"""

import json
import math

import pytest

from tests.conftest import TRAIN_PROMPTS, call_cli
from tests.family_checks import EVAL_PROMPTS, PROMPT, SAMPLING, check_trained_adapter, write_inputs

FAMILIES = ["wan2.1", "wan2.2-ti2v", "wan2.2-a14b", "hunyuanvideo"]
TINY_TRAIN = ["--dtype", "fp32", "--mixed-precision", "no", "--lora-rank", "4", "--lora-alpha", "8", "--report-to",
              "none", "--no-gradient-checkpointing", "--max-steps", "2", "--batch-size", "1"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


def check_written_adapters(root, family: str) -> list:
    """Every adapter folder under `root` (checkpoints included) records `family`; returns the folders."""
    written = [p.parent for p in root.rglob("adapter_config.json")]
    for folder in written:
        assert json.loads((folder / "base_model.json").read_text())["family"] == family, folder
    return written


def test_sft_trains_an_adapter_on_the_top_samples_of_the_scored_store(family, family_run, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = call_cli(capsys, "train", "--method", "sft", "--store", family_run(family).store, "--top-k", "1",
                            "--output-dir", run, *TINY_TRAIN)
    assert code == 0, err[-2000:]
    check_trained_adapter(run / "adapter", family)
    assert run / "adapter" in check_written_adapters(tmp_path, family)
    selection = json.loads((run / "summary.json").read_text())["selection"]
    assert selection["samples"] == selection["prompts"] == len(TRAIN_PROMPTS)  # the best sample of each prompt


def test_an_online_round_samples_scores_pairs_and_trains(family, family_model, tmp_path, capsys):
    from rollouts.store import RolloutStore

    prompts, rewards = write_inputs(tmp_path / "inputs", EVAL_PROMPTS)
    out = tmp_path / "online"
    code, _, err = call_cli(
        capsys, "online", "--model", family_model(family), "--prompts", prompts, "--rewards", rewards, "--out", out,
        "--rounds", "1", "--device", "cpu",
        "--rollout", "{samples_per_prompt: 2, batch_size: 2, frames: 5, height: 64, width: 64, steps: 2, "
                     "save_frames: 1, dtype: fp32}",
        "--pairs", "{min_margin: 0.0}",
        "--train", "{max_steps: 1, dtype: fp32, mixed_precision: 'no', lora_rank: 4, lora_alpha: 4, "
                   "report_to: none, gradient_checkpointing: false}")
    assert code == 0, err[-2000:]
    [row] = json.loads((out / "rounds.json").read_text())
    assert row["round"] == 0 and row["pairs"] == len(EVAL_PROMPTS)  # best vs worst of each prompt's 2 samples
    assert row["mean_rewards"] and all(math.isfinite(v) for v in row["mean_rewards"].values())
    store = RolloutStore(out / "round-00" / "rollout")
    assert store.settings["family"] == family and len(store.manifest()) == 2 * len(EVAL_PROMPTS)
    adapter = out / "round-00" / "train" / "adapter"
    check_trained_adapter(adapter, family)
    assert adapter in check_written_adapters(tmp_path, family)


def test_eval_scores_base_and_adapter_and_the_report_shows_their_videos(family, family_run, tmp_path, capsys):
    trained = family_run(family)
    result = json.loads((trained.evaluation / "eval.json").read_text())
    assert result["candidates"] == {"candidate0": str(trained.adapter)}
    assert result["prompts"] == EVAL_PROMPTS and len(result["seeds"]) == 1
    for model in ("base", "candidate0"):
        rows = result["scores"][model]["brightness"]
        assert len(rows) == len(EVAL_PROMPTS) and all(len(r) == 1 and math.isfinite(r[0]) for r in rows), rows
        assert sorted(result["videos"][model]) == ["0", "1"]  # both prompts' videos saved, for the report
        for paths in result["videos"][model].values():
            assert all((trained.evaluation / path).stat().st_size > 0 for path in paths)
    assert result["scores"]["base"] != result["scores"]["candidate0"]  # the adapter changes the videos
    comparison = result["comparisons"]["candidate0"]["brightness"]
    assert comparison["n"] == len(EVAL_PROMPTS) and math.isfinite(comparison["mean_diff"])

    page_file = tmp_path / "report.html"
    code, out, err = call_cli(capsys, "report", "--run", trained.evaluation, "--out", page_file)
    assert code == 0 and str(page_file) in out, err
    page = page_file.read_text(encoding="utf-8")
    assert "contentv-rlhf evaluation report" in page
    # A row per prompt: base | tuned, embedded; the training run's curves and pairs are found from the adapter.
    assert page.count('<video ') == page.count('src="data:video/mp4;base64,') == 2 * len(EVAL_PROMPTS)
    assert "Section skipped" not in page


def test_compare_samples_the_base_and_the_adapter_column(family, family_model, family_run, tmp_path):
    """The compare page's sampler (what each column shows, with its scores), without serving the page."""
    from rewards.config import load_rewards_config
    from rlhf.commands.compare import CompareConfig
    from rlhf.compare import BASE, COMBINED, Comparer
    from rlhf.config import config_from_dict
    from rlhf.video import read_video

    adapter = str(family_run(family).adapter)
    _, rewards = write_inputs(tmp_path / "inputs")
    config = config_from_dict(CompareConfig, {"model": str(family_model(family)), "adapters": [adapter],
                                              "device": "cpu", "dtype": "fp32", **SAMPLING, "steps": 2})
    comparer = Comparer(config, load_rewards_config(str(rewards)), tmp_path / "videos")
    assert comparer.generator.family.name == family
    results = comparer.compare(PROMPT, 3)
    assert [r.label for r in results] == [BASE, adapter]
    for result in results:
        assert result.frames.shape == (5, 64, 64, 3)
        assert read_video(result.video_path).shape == result.frames.shape
        assert set(result.scores) == {"brightness", COMBINED} and all(map(math.isfinite, result.scores.values()))
    assert (results[0].frames != results[1].frames).any()  # the adapter's column differs from the base's
