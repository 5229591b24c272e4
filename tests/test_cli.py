"""The real `contentv-rlhf` entry point: help, tiny-model + generate end to end, and bad input."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import COMMANDS
from rlhf.video import probe_video, read_video
from tests.conftest import call_cli, random_adapter, run_cli

SMALL = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "3", "--guidance", "4", "--fps", "8"]


def test_help_lists_every_command_and_is_light():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout
        sub = run_cli(name, "--help")
        assert sub.returncode == 0 and "examples:" in sub.stdout, name
    # --help must not pay for torch/diffusers imports.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from rlhf.cli import build_parser; build_parser(); "
         "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_eval_help_lists_only_what_eval_accepts(capsys):
    code, out, _ = call_cli(capsys, "eval", "--help")
    assert code == 0 and "--adapters" in out
    assert re.findall(r"--adapter\b(?!s)", out) == []  # eval compares `adapters`; the single adapter is no option
    code, out, _ = call_cli(capsys, "generate", "--help")
    assert code == 0 and len(re.findall(r"--adapter\b(?!s)", out)) >= 2  # generate takes --adapter, --adapter-scale


def test_generate_writes_mp4_with_requested_frames(tiny_model_dir, tmp_path):
    out = tmp_path / "clips" / "a.mp4"
    result = run_cli("generate", "--model", tiny_model_dir, "--prompt", "a cat", "--out", out, *SMALL, "--seed", "3")
    assert result.returncode == 0, result.stderr
    # stderr is a pipe, not a terminal: progress comes as log lines (one per phase, denoising every 30 s + at the end).
    assert "generate: 9 frames of 48x32, 3 steps, guidance 4, seed 3" in result.stderr
    assert "denoise: 3/3 step" in result.stderr and "generate: decoding 9 frames" in result.stderr
    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.fps) == (9, 48, 32, 8.0)
    if shutil.which("ffprobe"):
        frames = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
             "stream=nb_read_frames", "-of", "csv=p=0", str(out)], capture_output=True, text=True, check=True)
        assert frames.stdout.strip() == "9"
    assert read_video(out).std() > 1.0  # not a constant video
    assert [p.name for p in out.parent.iterdir()] == ["a.mp4"]  # no temporary files left behind


def test_generate_same_seed_same_video_and_frames_rounded(tiny_model_dir, tmp_path, capsys):
    paths = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        paths.append(tmp_path / f"{name}.mp4")
        args = [*SMALL[:1], "8", *SMALL[2:]]  # 8 frames -> rounded to 9 (4k + 1)
        code, _, stderr = call_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "a dog",
                                   "--out", paths[-1], *args, "--seed", seed)
        assert code == 0, stderr
    a, b, c = (read_video(p) for p in paths)
    assert a.shape[0] == 9
    assert (a == b).all()
    assert not (a == c).all()


def test_generate_with_adapter_and_config_file(tiny_model_dir, tmp_path, capsys):
    adapter = random_adapter(tiny_model_dir, tmp_path / "adapter", std=0.5)
    config = tmp_path / "gen.yaml"
    config.write_text(f"model: {tiny_model_dir}\nprompt: a bird\nframes: 5\nheight: 32\nwidth: 32\nsteps: 3\nseed: 1\n")
    base, tuned = tmp_path / "base.mp4", tmp_path / "tuned.mp4"
    assert call_cli(capsys, "generate", "--config", config, "--out", base)[0] == 0
    code, _, stderr = call_cli(capsys, "generate", "--config", config, "--out", tuned, "--adapter", adapter)
    assert code == 0, stderr
    assert not (read_video(base) == read_video(tuned)).all()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "{missing}", "--prompt", "x"], "model directory not found"),
        (["--model", "{model}", "--prompt", "x", "--dtype", "bf17"], "field 'dtype'"),
        (["--model", "{model}", "--prompt", "x", "--device", "tpu"], "field 'device'"),
        (["--model", "{model}", "--prompt", "x", "--steps", "0"], "field 'steps' must be >= 1"),
        (["--model", "{model}", "--prompt", "x", "--height", "40"], "field 'height' must be a positive multiple of 16"),
        (["--model", "{model}", "--prompt", "x", "--steps", "ten"], "field 'steps' expects an integer"),
        (["--model", "{model}"], "field 'prompt' is required"),
        (["--config", "{bad_yaml}"], "unknown field 'stpes'"),
        (["--model", "{model}", "--prompt", "x", "--stepz", "3"], "unknown flag --stepz (did you mean --steps?)"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, args, expected):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"model: {tiny_model_dir}\nprompt: x\nstpes: 3\n")
    values = {"missing": tmp_path / "missing", "model": tiny_model_dir, "bad_yaml": bad_yaml}
    out = tmp_path / "out.mp4"
    code, _, stderr = call_cli(capsys, "generate", *[a.format(**values) for a in args], "--out", out)
    assert code == 2
    assert expected in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and list(tmp_path.glob("*.mp4")) == []


def test_tiny_model_command_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "tiny"
    assert call_cli(capsys, "tiny-model", target)[0] == 0
    code, _, stderr = call_cli(capsys, "tiny-model", target)
    assert code == 2 and "--overwrite" in stderr
    assert call_cli(capsys, "tiny-model", target, "--overwrite", "--seed", "2")[0] == 0


def test_memory_options_do_not_change_the_video(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import rlhf.video

    # Compare the frames handed to the encoder: H.264 can turn a 1-level difference into a dozen.
    encoded, write_mp4 = {}, rlhf.video.write_mp4

    def recording_write_mp4(path, frames, fps):
        encoded[Path(path).name] = frames
        return write_mp4(path, frames, fps=fps)

    monkeypatch.setattr(rlhf.video, "write_mp4", recording_write_mp4)
    common = ["generate", "--model", tiny_model_dir, "--prompt", "a boat", *SMALL, "--seed", "2", "--dtype", "fp32"]
    assert call_cli(capsys, *common, "--out", tmp_path / "plain.mp4")[0] == 0
    code, _, stderr = call_cli(
        capsys, *common, "--out", tmp_path / "lean.mp4",
        "--cpu-offload", "--no-batch-cfg", "--vae-slicing", "--vae-tiling", "--no-free-text-encoders",
    )
    assert code == 0, stderr
    plain, lean = encoded["plain.mp4"], encoded["lean.mp4"]
    assert plain.shape == lean.shape
    assert abs(plain.astype(int) - lean.astype(int)).max() <= 2  # same up to float reassociation
    assert read_video(tmp_path / "lean.mp4").shape == read_video(tmp_path / "plain.mp4").shape


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--max-step", "3"], "contentv-rlhf train: error: unknown flag --max-step (did you mean --max-steps?) "
                                   "(see contentv-rlhf train --help)"),
    (["eval", "--adapter=x", "--seed", "1"], "contentv-rlhf eval: error: unknown flag --adapter (did you mean "
                                             "--adapters?); unknown flag --seed (did you mean --seeds?) "
                                             "(see contentv-rlhf eval --help)"),
    (["score", "--zzzz"], "contentv-rlhf score: error: unknown flag --zzzz (see contentv-rlhf score --help)"),
    (["--verboze", "score"], "contentv-rlhf score: error: unknown flag --verboze (did you mean --verbose?) "
                             "(see contentv-rlhf score --help)"),
    (["--verboze"], "contentv-rlhf: error: unknown flag --verboze (did you mean --verbose?) "
                    "(see contentv-rlhf --help)"),
])
def test_unknown_flag_suggests_the_nearest_one(args, expected, capsys):
    """Like an unknown config key: exit 2, one line, the nearest flag of that command (a value after it is its)."""
    code, out, err = call_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.strip() == expected


def test_help_texts_print_as_written(capsys):
    """argparse %-formats a command's summary in the command list but not its description: both say "95% CI".
    An empty-string default is shown as "", not as nothing."""
    code, out, _ = call_cli(capsys, "eval", "--help")
    assert code == 0 and "95% CI" in out and "%%" not in out
    code, out, _ = call_cli(capsys, "--help")
    assert code == 0 and "95% CI" in " ".join(out.split()) and "%%" not in out
    code, out, _ = call_cli(capsys, "compare", "--help")
    assert code == 0 and 'empty box with a hint. (default: "")' in " ".join(out.split())


def test_pairs_help_weights_example_parses(capsys):
    """The --weights example of the pairs help is a valid flag value, giving that mapping."""
    import argparse

    from rlhf.commands.pairs import PairsStageConfig, add_arguments
    from rlhf.config import config_from_args

    code, out, _ = call_cli(capsys, "pairs", "--help")
    help_text = " ".join(out.split())
    example = re.search(r"--weights '(\{[^']*\})'", help_text).group(1)
    assert "normalised" in help_text
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--store", "s", "--out", "o", "--weights", example])
    assert config_from_args(PairsStageConfig, args).weights == {"clip": 1.0, "aesthetic": 0.5}


def test_library_info_lines_only_with_verbose(tiny_store, tmp_path, capsys, caplog):
    """Scoring with an open_clip reward: its `INFO root:` lines are off by default, back with --verbose (before
    or after the command); this tool's own INFO lines stay."""
    import logging

    import yaml

    from rlhf.cli import configure_logging

    store = shutil.copytree(tiny_store.root, tmp_path / "store")
    shutil.rmtree(store / "scores", ignore_errors=True)
    clip = Path(__file__).resolve().parents[1] / "rlhf" / "world" / "weights" / "rewards" / "clip"
    rewards = tmp_path / "rewards.yaml"
    rewards.write_text(yaml.safe_dump({"scorers": {"clip": {"checkpoint": f"local-dir:{clip}", "num_frames": 1}},
                                       "device": "cpu"}))

    def info_lines(*args: str) -> dict[str, int]:
        caplog.clear()
        code, _, err = call_cli(capsys, *args)
        assert code == 0, err
        counts: dict[str, int] = {}
        for record in caplog.records:
            if record.levelno == logging.INFO:
                counts[record.name] = counts.get(record.name, 0) + 1
        return counts

    try:
        quiet = info_lines("score", "--store", store, "--config", rewards)
        assert "root" not in quiet and quiet.get("contentv-rlhf", 0) >= 1, quiet
        loud = info_lines("score", "--store", store, "--config", rewards, "--rescore", "--verbose")
        assert loud.get("root", 0) >= 1 and loud.get("contentv-rlhf", 0) >= 1, loud
        before = info_lines("-v", "score", "--store", store, "--config", rewards, "--rescore")
        assert before.get("root", 0) >= 1, before
    finally:
        configure_logging(verbose=False)


def test_a_stage_run_inside_a_command_keeps_its_logging(monkeypatch, tmp_path):
    """quickstart and online run their stages through `main`: `quickstart -v` stays verbose in every stage."""
    import logging

    from rlhf import cli
    from rlhf.commands import quickstart, tiny_model

    levels: list[int] = []
    monkeypatch.setattr(quickstart, "run", lambda args: cli.main(["tiny-model", str(tmp_path / "model")]))
    monkeypatch.setattr(tiny_model, "run", lambda args: levels.append(logging.getLogger().level) or 0)
    try:
        assert cli.main(["-v", "quickstart"]) == 0 and levels == [logging.DEBUG]
        assert cli.main(["quickstart", "--verbose"]) == 0 and levels[-1] == logging.DEBUG
        assert cli.main(["quickstart"]) == 0 and levels[-1] == logging.WARNING
    finally:
        cli.configure_logging(verbose=False)
