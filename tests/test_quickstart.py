"""The quickstart runs every stage through the real CLI on the shipped world and ends with the eval table and a report."""

import json
from pathlib import Path

import yaml

from tests.conftest import call_cli

ROOT = Path(__file__).resolve().parents[1]
WORLD_CONFIGS = ROOT / "configs" / "world"

SMALL = ("--device", "cpu", "--train-steps", "4", "--reward-gradient-steps", "2", "--train-prompts", "8",
         "--samples-per-prompt", "2", "--eval-seeds", "1")


def test_quickstart_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "qs"
    code, stdout, stderr = call_cli(capsys, "quickstart", "--out", out, *SMALL)
    assert code == 0, stderr
    for stage in ("rollout", "score", "pairs", "train (Flow-DPO)", "train (reward-gradient)", "merge", "eval",
                  "report"):
        assert f"] {stage}: contentv-rlhf " in stdout, stage
    assert "combined" in stdout and "95% CI" in stdout  # the eval table
    assert (out / "merged" / "transformer").is_dir() and (out / "report.html").is_file()
    result = json.loads((out / "eval" / "eval.json").read_text())
    kinds = result["rewards"]
    assert {kinds[r] for r in ("clip", "aesthetic", "motion")} == {"trained"}
    assert {kinds[r] for r in ("colorfulness", "contrast", "frame_diff_motion")} == {"held_out"}
    assert {kinds[r] for r in ("oracle_colour", "oracle_size", "oracle_direction", "oracle_taught", "oracle_all",
                               "oracle_cleanliness")} == {"truth"}
    assert "oracle_taught" in stdout  # the oracle's accuracy is in the printed table
    assert len(result["prompts"]) == 16  # the test combinations, all four directions
    assert len(json.loads((out / "train" / "summary.json").read_text())) > 0
    gradient = json.loads((out / "reward_gradient" / "summary.json").read_text())
    assert gradient["steps_done"] == 2
    # reward-gradient trains on the reward its shipped config names (with `consistency`), not the scoring one
    shipped = yaml.safe_load((WORLD_CONFIGS / "reward_gradient.yaml").read_text())["rewards"]
    trained_on = yaml.safe_load(Path(gradient["rewards"]).read_text())["scorers"]
    assert trained_on.keys() == yaml.safe_load((ROOT / shipped).read_text())["scorers"].keys()
    assert "consistency" in trained_on
    # Both trainers' adapters are evaluated beside the base, on the same prompts and seeds.
    assert sorted(result["candidates"].values()) == sorted(str(out / t / "adapter") for t in ("reward_gradient", "train"))
    assert "oracle_all" in (out / "report.html").read_text()

    # A rerun skips the finished stages.
    code, stdout, stderr = call_cli(capsys, "quickstart", "--out", out, *SMALL)
    assert code == 0, stderr
    assert stdout.count("already done") == 6
