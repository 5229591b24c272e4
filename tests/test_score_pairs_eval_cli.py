"""score -> pairs -> eval through the real CLI on the tiny store: outputs, resumability, bad input."""

import json
import shutil
from collections.abc import Sequence

import pytest
import torch
import yaml
from datasets import load_from_disk

from rewards.base import Scorer
from rollouts.store import RolloutStore
from tests.conftest import call_cli, random_adapter


class NanForFirstPrompt(Scorer):
    """Returns NaN for videos of the prompt 'a red ball' (to test exclusion), brightness otherwise."""

    name = "nan_for_first"
    differentiable = False

    def score(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        values = frames.float().mean(dim=(1, 2, 3, 4))
        return torch.where(torch.tensor([p == "a red ball" for p in prompts]), torch.nan, values)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    root = shutil.copytree(tiny_store.root, tmp_path / "store")
    shutil.rmtree(root / "scores", ignore_errors=True)
    return RolloutStore(root)


def test_score_then_pairs(store_copy, tmp_path, capsys, caplog):
    rewards = write_yaml(tmp_path / "r.yaml", {"scorers": {
        "brightness": {"weight": 1.0}, "contrast": {"weight": 0.5},
        "nan": {"class": "tests.test_score_pairs_eval_cli:NanForFirstPrompt", "weight": 0.0},
    }, "device": "cpu", "batch_size": 5})
    code, out, err = call_cli(capsys, "score", "--store", store_copy.root, "--config", rewards)
    assert code == 0, err
    scores = json.loads(store_copy.score_path("brightness").read_text())
    assert len(scores["scores"]) == 24 and scores["weight"] == 1.0
    # brightness = mean BT.601 luma of the saved frames, written out here.
    frames = store_copy.load_frames("p00002_s001")
    luma = 0.299 * frames[:, 0] + 0.587 * frames[:, 1] + 0.114 * frames[:, 2]
    assert scores["scores"]["p00002_s001"] == pytest.approx(luma.mean().item(), rel=1e-5)
    nan = json.loads(store_copy.score_path("nan").read_text())["scores"]
    assert [sid for sid, v in nan.items() if v is None] == [f"p00000_s{k:03d}" for k in range(4)]
    assert "nan: 4 non-finite score(s), excluded from pairs: p00000_s000" in caplog.text

    # Rerunning scores nothing new; changed options are refused without --rescore.
    before = store_copy.score_path("brightness").stat().st_mtime_ns
    assert call_cli(capsys, "score", "--store", store_copy.root, "--config", rewards)[0] == 0
    assert store_copy.score_path("brightness").stat().st_mtime_ns == before

    code, out, err = call_cli(capsys, "pairs", "--store", store_copy.root, "--out", tmp_path / "pairs",
                              "--min-margin", "0")
    assert code == 0, err
    pairs = load_from_disk(str(tmp_path / "pairs"))
    assert len(pairs) == 5  # one per prompt, the NaN prompt excluded
    assert all(row["chosen_score"] > row["rejected_score"] for row in pairs)
    assert not any(row["prompt_id"] == "p00000" for row in pairs)
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary["weights"] == {"brightness": 1.0, "contrast": 0.5, "nan": 0.0}
    assert summary["metadata"]["store"] == str(store_copy.root.resolve())


def test_score_and_pairs_bad_input(store_copy, tmp_path, capsys):
    def fails(args, expected):
        code, _, err = call_cli(capsys, *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    unknown = write_yaml(tmp_path / "u.yaml", {"scorers": {"brightnes": {"weight": 1.0}}})
    fails(["score", "--store", store_copy.root, "--config", unknown], "brightness")
    missing = write_yaml(tmp_path / "m.yaml", {"scorers": {"clip": {"checkpoint": str(tmp_path / "nope.pt")}}})
    fails(["score", "--store", store_copy.root, "--config", missing], "nope.pt")
    fails(["pairs", "--store", store_copy.root, "--out", tmp_path / "p"], "the store has no scores")
    fails(["pairs", "--store", tmp_path / "nostore", "--out", tmp_path / "p"], "nostore: rollout store not found")
    fails(["score", "--store", tmp_path / "nostore", "--config", unknown], "")
    assert not (tmp_path / "p").exists()


def test_eval_table_and_json(tiny_store, tmp_path, capsys):
    model = tiny_store.settings["model"]
    adapter = random_adapter(model, tmp_path / "adapter", std=0.3)
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a purple flower\na grey rock\n")
    trained = write_yaml(tmp_path / "t.yaml", {"scorers": {"brightness": {"weight": 1.0}}, "device": "cpu"})
    held = write_yaml(tmp_path / "h.yaml", {"scorers": {"contrast": {"weight": 1.0}}, "device": "cpu"})

    def eval_args(adapters, out):
        return ["eval", "--model", model, "--adapters", adapters, "--prompts", prompts, "--seeds", "3",
                "--rewards", trained, "--held-out-rewards", held, "--out", out, "--frames", "5",
                "--height", "32", "--width", "32", "--steps", "2", "--dtype", "fp32", "--save-videos", "1"]

    code, out, err = call_cli(capsys, *eval_args(adapter, tmp_path / "eval"))
    assert code == 0, err
    assert "combined" in out and "brightness" in out and "contrast" in out and "95% CI" in out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["seeds"] == [100000, 100001, 100002]
    base = torch.tensor(result["scores"]["base"]["brightness"])
    tuned = torch.tensor(result["scores"]["candidate0"]["brightness"])
    row = result["comparisons"]["candidate0"]["brightness"]
    assert row["mean_diff"] == pytest.approx((tuned - base).mean().item(), abs=1e-9)
    assert row["win_rate"] == pytest.approx((tuned > base).float().mean().item())
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"]
    assert result["rewards"] == {"brightness": "trained", "contrast": "held_out", "combined": "trained"}
    assert len(result["videos"]["base"]["0"]) == 3 and "1" not in result["videos"]["base"]

    # The base rows do not depend on which adapters are loaded: they run with every adapter disabled.
    second = random_adapter(model, tmp_path / "adapter2", std=0.3)
    code, _, err = call_cli(capsys, *eval_args(f"{second},{adapter}", tmp_path / "eval2"))
    assert code == 0, err
    again = json.loads((tmp_path / "eval2" / "eval.json").read_text())
    assert again["scores"]["base"] == result["scores"]["base"]
    assert again["scores"]["candidate1"] == result["scores"]["candidate0"]

    # Batches spanning prompts (3 seeds, batches of 4 and 1) give every (prompt, seed) the scores and videos
    # of the per-prompt batches: a video's noise comes from its seed alone.
    for batch_size in ("4", "1"):
        code, _, err = call_cli(capsys, *eval_args(adapter, tmp_path / f"eval_b{batch_size}"), "--batch-size",
                                batch_size)
        assert code == 0, err
        batched = json.loads((tmp_path / f"eval_b{batch_size}" / "eval.json").read_text())
        for name in ("base", "candidate0"):
            for reward in ("brightness", "contrast"):
                torch.testing.assert_close(torch.tensor(batched["scores"][name][reward]),
                                           torch.tensor(result["scores"][name][reward]), rtol=1e-5, atol=1e-6)
        assert batched["videos"] == result["videos"]
    code, _, err = call_cli(capsys, *eval_args(adapter, tmp_path / "eval_b0"), "--batch-size", "0")
    assert code == 2 and "field 'batch_size'" in err and len(err.strip().splitlines()) == 1, err

    # An adapter from another base model is refused in one line.
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    from safetensors.torch import load_file, save_file

    weights = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v
               for k, v in load_file(str(other / "adapter_model.safetensors")).items()}
    save_file(weights, str(other / "adapter_model.safetensors"))
    code, _, err = call_cli(capsys, *eval_args(other, tmp_path / "eval3"))
    assert code == 2 and "adapter could not be loaded" in err and len(err.strip().splitlines()) == 1, err
