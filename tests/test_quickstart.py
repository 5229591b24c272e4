"""The quickstart runs every stage through the real CLI and ends with the eval table and a report."""

import json

from tests.conftest import call_cli


def test_quickstart_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "qs"
    code, stdout, stderr = call_cli(capsys, "quickstart", "--out", out, "--device", "cpu", "--train-steps", "10")
    assert code == 0, stderr
    for stage in ("tiny model", "rollout", "score", "pairs", "train (Flow-DPO)", "merge", "eval", "report"):
        assert f"] {stage}: contentv-rlhf " in stdout, stage
    assert "combined" in stdout and "95% CI" in stdout  # the eval table
    assert (out / "merged" / "transformer").is_dir() and (out / "report.html").is_file()
    result = json.loads((out / "eval" / "eval.json").read_text())
    assert result["rewards"] == {"brightness": "trained", "colorfulness": "held_out", "contrast": "held_out",
                                 "combined": "trained"}
    assert len(json.loads((out / "train" / "summary.json").read_text())) > 0

    # A rerun skips the finished stages.
    code, stdout, stderr = call_cli(capsys, "quickstart", "--out", out, "--device", "cpu", "--train-steps", "10")
    assert code == 0, stderr
    assert stdout.count("already done") == 6
