"""Issue 22, the output rules (rlhf/outputs.py): an output never destroys an input or a folder of another kind,
`--overwrite` is needed and enough only for the command's own kind of output, a failed write (full disk) is one
line with exit 2 and leaves no staging, a rerun removes what a killed run left, and an error line quotes a value
in at most ~200 characters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import REPO, call_cli
from tests.test_dpo_trainer import train_args

SMALL_VIDEO = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--dtype", "fp32"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` -> its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(capsys, *args, names: tuple[str, ...]) -> str:
    """The command exits 2 with one line that names every one of `names`."""
    code, out, err = call_cli(capsys, *args)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def test_overwrite_never_deletes_what_the_command_did_not_make(tiny_model_dir, tiny_store, tiny_pairs, tmp_path,
                                                               capsys):
    # Copies: the commands below must leave them exactly as they were.
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    store = Path(shutil.copytree(tiny_store.root, tmp_path / "store"))
    pairs = Path(shutil.copytree(tiny_pairs, tmp_path / "pairs"))
    other_pairs = Path(shutil.copytree(tiny_pairs, tmp_path / "other-pairs"))
    mine = tmp_path / "my-folder"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("years of work\n")
    # A checkpoints/ folder that our trainer did not write (no step-*/trainer_state.json).
    not_ours = tmp_path / "not-a-run"
    (not_ours / "checkpoints" / "step-0000001").mkdir(parents=True)
    (not_ours / "checkpoints" / "step-0000001" / "weights.bin").write_bytes(b"someone else's")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    (tmp_path / "link-to-store").symlink_to(store)
    before = tree(tmp_path)
    rollout = ["rollout", "--model", model, "--prompts", prompts, *SMALL_VIDEO, "--overwrite"]

    # An output that is, lies inside or contains an input: refused, naming both.
    refused(capsys, "pairs", "--store", store, "--out", store, "--overwrite", names=("out", "store", "must not be"))
    refused(capsys, "pairs", "--store", store, "--out", store / "pairs", names=("lie inside", "store"))
    refused(capsys, "pairs", "--store", store, "--out", tmp_path, "--overwrite", names=("contain", "store"))
    refused(capsys, *rollout, "--out", model, names=("out", "model", "must not be"))
    refused(capsys, *rollout, "--out", model / "transformer", names=("lie inside", "model"))
    refused(capsys, *rollout, "--adapter", pairs, "--out", pairs / "x", names=("lie inside", "adapter"))
    refused(capsys, *train_args(pairs, pairs, "--overwrite"), names=("output_dir", "pairs", "must not be"))
    refused(capsys, *train_args(pairs, store, "--store", store, "--overwrite"), names=("output_dir", "store", "must not be"))
    refused(capsys, "merge", "--model", model, "--adapter", pairs, "--out", model / "merged", "--overwrite",
            names=("lie inside", "model"))
    refused(capsys, "generate", "--model", model, "--prompt", "x", "--out", model / "x.mp4", "--overwrite",
            names=("lie inside", "model"))
    # A symlinked output is resolved first: the link to the store is the store.
    refused(capsys, "pairs", "--store", store, "--out", tmp_path / "link-to-store", "--overwrite",
            names=("link-to-store", str(store.resolve()), "must not be"))

    # --overwrite replaces only the command's own kind of output.
    refused(capsys, *rollout, "--out", mine, names=("is not a rollout store", "store.json"))
    refused(capsys, *rollout, "--out", other_pairs, names=("is not a rollout store",))
    refused(capsys, "pairs", "--store", store, "--out", mine, "--overwrite", names=("is not a pairs dataset",))
    refused(capsys, "merge", "--model", model, "--adapter", pairs, "--out", mine, "--overwrite",
            names=("is not a model checkpoint",))
    refused(capsys, "tiny-model", store, "--overwrite", names=("is not a model checkpoint",))
    refused(capsys, *train_args(other_pairs, store / "..", "--overwrite"), names=("contain",))
    refused(capsys, *train_args(pairs, other_pairs, "--overwrite"), names=("summary.json", "not a training run"))
    for flag in ("--overwrite", "--resume-from"):
        args = train_args(pairs, not_ours, flag, *(["latest"] if flag == "--resume-from" else []))
        refused(capsys, *args, names=("checkpoints", "not a training run", "trainer_state.json"))
    assert tree(tmp_path) == before


def test_generate_eval_and_report_replace_an_output_only_with_overwrite(tiny_model_dir, tmp_path, capsys):
    video = tmp_path / "a.mp4"
    generate = ["generate", "--model", tiny_model_dir, "--prompt", "a cat", *SMALL_VIDEO, "--out", video]
    assert call_cli(capsys, *generate)[0] == 0
    written = video.read_bytes()
    refused(capsys, *generate, "--seed", "1", names=("already holds an mp4 video", "--overwrite"))
    assert video.read_bytes() == written
    assert call_cli(capsys, *generate, "--seed", "1", "--overwrite")[0] == 0
    # Not an mp4: never replaced.
    (tmp_path / "notes.mp4").write_text("my notes\n")
    refused(capsys, *generate[:-1], tmp_path / "notes.mp4", "--overwrite", names=("is not an mp4 video",))

    run = tmp_path / "eval"
    run.mkdir()
    (run / "eval.json").write_text("{}")
    (tmp_path / "rewards.yaml").write_text("scorers: {brightness: {weight: 1.0}}\n")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    eval_args = ["eval", "--model", tiny_model_dir, "--adapters", tmp_path / "adapter", "--prompts", tmp_path / "prompts.txt",
                 "--rewards", tmp_path / "rewards.yaml", *SMALL_VIDEO]
    refused(capsys, *eval_args, "--out", run, names=("already holds an eval", "--overwrite"))

    page = run / "report.html"
    page.write_text("<!DOCTYPE html><html><head><title>contentv-rlhf report: eval</title></head></html>\n")
    refused(capsys, "report", "--run", run, names=("already holds a contentv-rlhf report", "--overwrite"))
    refused(capsys, "report", "--run", run, "--out", run / "eval.json", "--overwrite",
            names=("is not a contentv-rlhf report",))
    assert (run / "eval.json").read_text() == "{}"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_rerun_removes_what_a_killed_run_left(tiny_model_dir, tiny_store, tmp_path, capsys):
    pid = dead_pid()
    out = tmp_path / "videos" / "out.mp4"
    out.parent.mkdir()
    (out.parent / f".out.tmp-{pid}.mp4").write_bytes(b"half a video")  # a generate killed while encoding
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    live = out.parent / f".out.tmp-{running.pid}.mp4"  # a generate still running: left alone
    live.write_bytes(b"being written")
    try:
        code, _, err = call_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "a cat", *SMALL_VIDEO,
                                "--out", out)
    finally:
        running.kill()
        running.wait()
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, live.name])

    store = Path(shutil.copytree(tiny_store.root, tmp_path / "store"))
    scores = store / "scores"
    scores.mkdir(exist_ok=True)
    stale = scores / f".brightness.tmp-{pid}.json"  # a score killed while rewriting its file
    stale.write_text("{")
    score(capsys, store, tmp_path)
    assert not stale.exists()

    pairs = tmp_path / "pairs"
    staging = tmp_path / ".pairs.k1ll3d00.partial"  # a pairs killed while saving its dataset
    (staging / "data").mkdir(parents=True)
    (tmp_path / ".pairs.k1ll3d00.partial.owner").write_text(json.dumps({"pid": pid, "host": os.uname().nodename}))
    code, _, err = call_cli(capsys, "pairs", "--store", store, "--out", pairs, "--min-margin", "0")
    assert code == 0, err
    assert not staging.exists() and not (tmp_path / ".pairs.k1ll3d00.partial.owner").exists()


def score(capsys, store: Path, folder: Path) -> None:
    rewards = folder / "rewards.yaml"
    rewards.write_text("scorers: {brightness: {weight: 1.0}}\n")
    code, _, err = call_cli(capsys, "score", "--store", store, "--config", rewards)
    assert code == 0, err


# Runs the CLI under a file size limit (`ulimit -f`): a write past it fails with EFBIG ("File too large"), as on a
# full disk; Python ignores SIGXFSZ, and so does this process.
LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from rlhf.cli import main
sys.exit(main(sys.argv[2:]))
"""


def limited(limit: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED_CLI, str(limit), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})


def assert_failed_write(result: subprocess.CompletedProcess, path: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "File too large" in lines[-1], result.stderr[-3000:]
    assert lines[-1].startswith("contentv-rlhf ") and str(path) in lines[-1], lines[-1]


def same_safetensors(a: Path, b: Path) -> bool:
    """Equal tensors (bit for bit, same dtypes) and equal metadata."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as first, safe_open(str(b), "pt") as second:
        return (first.metadata() == second.metadata() and sorted(first.keys()) == sorted(second.keys())
                and all(first.get_tensor(k).dtype == second.get_tensor(k).dtype
                        and first.get_tensor(k).view(-1).view(torch.uint8).equal(
                            second.get_tensor(k).view(-1).view(torch.uint8)) for k in first.keys()))


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or p.suffix == ".partial")


def test_a_full_disk_is_one_line_exit_2_and_the_rerun_completes(tiny_model_dir, tiny_store, tiny_pairs, tmp_path,
                                                                capsys):
    # rollout: the store fails at a sample file; the rerun writes the bytes of an uninterrupted rollout.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_store.read_prompts().values()) + "\n")
    settings = tiny_store.settings
    store = tmp_path / "store"
    rollout = ["rollout", "--model", settings["model"], "--prompts", prompts, "--out", store,
               "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "3",
               "--samples-per-prompt", "4", "--batch-size", "4", "--save-frames", "4", "--dtype", "fp32"]
    assert_failed_write(limited(12_000, *rollout), store)
    assert leftovers(store) == []
    code, _, err = call_cli(capsys, *rollout)
    assert code == 0, err
    for row in tiny_store.manifest():  # safetensors orders a header's metadata by hash: compare the content
        assert same_safetensors(store / row["latents"], tiny_store.root / row["latents"]), row["latents"]

    # generate: the mp4 is too large; nothing is left beside it.
    video = tmp_path / "videos" / "a.mp4"
    assert_failed_write(limited(1_000, "generate", "--model", tiny_model_dir, "--prompt", "a cat", *SMALL_VIDEO,
                                "--out", video), video)
    assert list(video.parent.iterdir()) == []

    # train: the first checkpoint fails; no .step-N.tmp is left, and the rerun trains what an uninterrupted run does.
    run, reference = tmp_path / "run", tmp_path / "reference"
    assert call_cli(capsys, *train_args(tiny_pairs, reference, "--max-steps", "2", "--save-every", "1"))[0] == 0
    assert_failed_write(limited(20_000, *train_args(tiny_pairs, run, "--max-steps", "2", "--save-every", "1")),
                        run / "checkpoints")
    assert leftovers(run) == [] and not list((run / "checkpoints").glob("step-*"))
    code, _, err = call_cli(capsys, *train_args(tiny_pairs, run, "--max-steps", "2", "--save-every", "1",
                                                "--resume-from", "latest"))
    assert code == 0, err
    weights = "adapter/adapter_model.safetensors"
    assert same_safetensors(run / weights, reference / weights)

    # pairs: the dataset fails in its staging folder, which is removed.
    score(capsys, store, tmp_path)
    pairs = tmp_path / "pairs"
    assert_failed_write(limited(200, "pairs", "--store", store, "--out", pairs, "--min-margin", "0"), pairs)
    assert not pairs.exists() and leftovers(tmp_path) == []


def test_an_error_line_quotes_at_most_200_characters_of_a_value(tiny_model_dir, tmp_path, capsys):
    # Half a KB of YAML whose aliases nest to 9**7 (4.8 million) leaves: its full repr has ~30 million characters.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    config = tmp_path / "aliases.yaml"
    config.write_text(f"model: {tiny_model_dir}\nprompt: x\nguidance:\n" + "".join(f"  - {v}\n" for v in levels))
    assert len(config.read_bytes()) < 1024
    start = time.perf_counter()
    err = refused(capsys, "generate", "--config", config, "--out", tmp_path / "x.mp4",
                  names=("field 'guidance' expects a number, got [[",))
    assert time.perf_counter() - start < 10
    assert len(err) < 400, len(err)


def test_tensor_files_are_byte_identical_across_processes(tmp_path):
    """safetensors orders `__metadata__` by a per-process hash, so a rerun (after a kill or a full disk) wrote other
    bytes for the same tensors and metadata; `io.save_tensors` writes one canonical header."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, torch\nfrom rlhf.io import save_tensors\n"
            "save_tensors(sys.argv[1], {'b': torch.arange(6.0).view(2, 3), 'a': torch.ones(3, dtype=torch.int64)}, "
            "{'sample_id': 'x', 'frame_indices': '[0, 4]', 'prompt': 'p', 'seed': '7', 'model': 'm'})")
    digests = set()
    for index in range(5):
        path = tmp_path / f"{index}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert handle.metadata()["frame_indices"] == "[0, 4]" and handle.get_tensor("b")[1, 2] == 5.0
