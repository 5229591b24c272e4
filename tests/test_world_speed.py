"""benchmarks/world_speed.py's read-outs: checkpoint times, time to target, the mean curve, the PNG."""

import json

import numpy as np
import pytest

from benchmarks.world_speed import checkpoint_times, curve_grid, draw_png, mean_curve, time_to


def test_checkpoint_times_add_the_charged_data_time(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "command_seconds": 10.0 * (s + 1)}) + "\n" for s in range(6)))
    for steps in (2, 6):
        (run / "checkpoints" / f"step-{steps:07d}" / "adapter").mkdir(parents=True)
    found = checkpoint_times(run, charged=7.5)
    # step-0000002 ends with step index 1 (20 s), step-0000006 with index 5 (60 s); plus the data's 7.5 s.
    assert found == [(27.5, run / "checkpoints" / "step-0000002" / "adapter"),
                     (67.5, run / "checkpoints" / "step-0000006" / "adapter")]


def test_time_to_target_and_mean_curve():
    a = [(30.0, 4.0), (60.0, 12.0), (90.0, 21.0)]
    b = [(40.0, 11.0), (80.0, 9.0)]
    assert time_to(a, 10.0) == 60.0 and time_to(a, 20.0) == 90.0 and time_to(b, 20.0) is None
    assert time_to(b, 10.0) == 40.0  # the first checkpoint at or above the target, even if a later one falls
    curve = mean_curve([a, b], np.array([0.0, 30.0, 45.0, 60.0, 85.0, 90.0]))
    # Each seed's latest checkpoint by then (0 before its first): (0+0)/2, (4+0)/2, (4+11)/2, (12+11)/2, ...
    assert curve == [(0.0, 0.0), (30.0, 2.0), (45.0, 7.5), (60.0, 11.5), (85.0, 10.5), (90.0, 15.0)]


def test_png_is_drawn(tmp_path):
    from PIL import Image

    path = tmp_path / "docs" / "speed.png"
    draw_png({"nft": [(0.0, 0.0), (60.0, 12.0)], "grpo": [(0.0, 0.0), (60.0, -3.0)]}, path, budget=120.0)
    image = Image.open(path)
    assert image.size == (820, 480)
    colours = {c for _, c in image.getcolors(maxcolors=100000)}
    assert (148, 103, 189) in colours and (214, 39, 40) in colours  # nft's and grpo's lines


@pytest.mark.parametrize("methods", ["nft,unknown", ""])
def test_unknown_methods_are_refused(methods, monkeypatch, capsys):
    import sys

    from benchmarks import world_speed

    monkeypatch.setattr(sys, "argv", ["world_speed.py", "--methods", methods])
    with pytest.raises(SystemExit) as exit_info:
        world_speed.main()
    assert exit_info.value.code == 2 and "--methods" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["grpo_fast=grpo", "grpo_fast=unknown:steps=10", "grpo=grpo:steps=10",
                                     "grpo_fast=grpo:stepz=10", "grpo_fast=grpo:steps=[10"])
def test_bad_variants_are_refused(variant, monkeypatch, capsys):
    import sys

    from benchmarks import world_speed

    monkeypatch.setattr(sys, "argv", ["world_speed.py", "--methods", "grpo", "--variant", variant])
    with pytest.raises(SystemExit) as exit_info:
        world_speed.main()
    assert exit_info.value.code == 2 and "--variant" in capsys.readouterr().err


def test_a_variant_is_the_shipped_config_with_its_changes(tmp_path):
    import yaml

    from benchmarks.world_speed import CONFIGS, variant_config

    path = variant_config(tmp_path, "grpo_10_steps", "grpo", {"steps": 10, "learning_rate": 5e-4})
    shipped = yaml.safe_load((CONFIGS / "grpo.yaml").read_text())
    assert yaml.safe_load(path.read_text()) == {**shipped, "steps": 10, "learning_rate": 5e-4}
    assert shipped["steps"] != 10


def test_the_grid_reaches_the_last_checkpoint_past_the_budget(tmp_path):
    runs = {"rg": [[(50.0, tmp_path), (150.4, tmp_path)], [(150.1, tmp_path)]], "grpo": [[(90.0, tmp_path)]]}
    grid = curve_grid(runs, budget=150.0, step=25.0)
    assert grid.tolist() == [0.0, 25.0, 50.0, 75.0, 100.0, 125.0, 150.0, 150.4]
    # A run that fell after its peak ends at its last gain, not at the peak it had at the budget's grid point.
    curve = mean_curve([[(100.0, 30.0), (150.4, 5.0)], [(150.1, 10.0)]], grid)
    assert curve[-2] == (150.0, 15.0) and curve[-1] == (150.4, 7.5)
    assert curve_grid({"rg": [[(120.0, tmp_path)]]}, budget=150.0, step=25.0).tolist()[-1] == 150.0
