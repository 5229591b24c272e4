"""Rollout store: layout and manifest, resume after kill -9, 2 processes == 1 process, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf.sampling import latent_shape
from rlhf.video import probe_video
from rollouts.rollout import frame_indices, sample_seed
from rollouts.store import RolloutStore
from tests.conftest import REPO, call_cli

PROMPTS = "a red ball rolling\na blue sky with clouds\n\na red ball rolling\na green tree in wind\n"
SMALL = ["--frames", "9", "--height", "32", "--width", "48", "--steps", "3", "--guidance", "4", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def rollout_args(model, prompts, out, *extra):
    return ["rollout", "--model", model, "--prompts", prompts, "--out", out, *SMALL,
            "--samples-per-prompt", "3", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def reference_store(tiny_model_dir, prompt_file, tmp_path_factory):
    """One uninterrupted single-process rollout, with videos."""
    out = tmp_path_factory.mktemp("ref") / "store"
    from rlhf.cli import main

    assert main([str(a) for a in rollout_args(tiny_model_dir, prompt_file, out, "--save-videos", "--fps", "6")]) == 0
    return RolloutStore(out)


def latents_of(store: RolloutStore) -> dict[str, torch.Tensor]:
    return {row["sample_id"]: store.load_sample(row["sample_id"])["latents"] for row in store.manifest()}


def test_layout_and_manifest(reference_store):
    store = reference_store
    meta = json.loads(store.meta_path.read_text())
    assert meta["format"] == "contentv-rlhf.rollout" and meta["version"] == 1
    assert tuple(meta["latent_shape"]) == latent_shape(9, 32, 48)
    prompts = store.read_prompts()
    assert list(prompts.values()) == ["a red ball rolling", "a blue sky with clouds", "a green tree in wind"]
    rows = store.manifest()
    assert [r["sample_id"] for r in rows] == [f"{p}_s{k:03d}" for p in prompts for k in range(3)]
    for row in rows:
        sample = store.load_sample(row["sample_id"])
        assert sample["latents"].dtype == torch.bfloat16 and tuple(sample["latents"].shape) == store.latent_shape
        # save_frames 8 of 9 frames plus the stride-3 motion pairs: every frame, at recorded positions.
        assert sample["frames"].shape == (9, 32, 48, 3) and sample["frames"].dtype == torch.uint8
        assert store.sample_metadata(row["sample_id"])["frame_indices"] == list(range(9))
        assert row["seed"] == sample_seed(0, prompts[row["prompt_id"]], row["sample_index"])
        info = probe_video(store.root / row["video"])
        assert (info.frames, info.fps, info.width, info.height) == (9, 6.0, 48, 32)
    # Embeddings once per prompt (+ the negative prompt), not per sample.
    assert sorted(p.stem for p in (store.root / "embeds").iterdir()) == sorted([*prompts, "negative"])
    embeds = store.load_embeds("p00000")
    assert embeds.prompt_embeds.shape == (1, 77 + 256, 32) and embeds.pooled.shape == (1, 24)
    assert not any(".tmp-" in p.name for p in store.root.rglob("*"))
    # Different seeds -> different samples of one prompt.
    latents = latents_of(store)
    assert not torch.equal(latents["p00000_s000"], latents["p00000_s001"])


def test_frame_subset_indices():
    # Segment middles (e_i + e_{i+1} - 1) // 2 with e_i = i * total // count, as VBench samples frames.
    assert frame_indices(9, 8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert frame_indices(9, 3) == [1, 4, 7]
    assert frame_indices(5, 8) == [0, 1, 2, 3, 4]
    # Plus the pairs (t, t + stride), t = min(middle, total - 1 - stride).
    assert frame_indices(9, 3, 3) == [1, 4, 5, 7, 8]
    assert frame_indices(9, 3, 2) == [1, 3, 4, 6, 7, 8]


def test_rerun_is_a_noop_and_other_settings_are_refused(reference_store, tiny_model_dir, prompt_file, capsys):
    before = {p: p.stat().st_mtime_ns for p in reference_store.root.rglob("*.safetensors")}
    args = rollout_args(tiny_model_dir, prompt_file, reference_store.root, "--save-videos", "--fps", "6")
    code, _, err = call_cli(capsys, *args)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in reference_store.root.rglob("*.safetensors")} == before
    code, _, err = call_cli(capsys, *args, "--steps", "5")
    assert code == 2 and "store was made with other settings: steps (store: 3, now: 5)" in err
    assert len(err.strip().splitlines()) == 1


def test_resume_after_kill_equals_uninterrupted(reference_store, tiny_model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "store"
    args = rollout_args(tiny_model_dir, prompt_file, out, "--save-videos", "--fps", "6")
    process = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *map(str, args)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("samples/*/*.safetensors"))) < 2 and time.time() < deadline:
        assert process.poll() is None, "rollout finished before it could be interrupted"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(out.glob("samples/*/*.safetensors")))
    assert 2 <= done < 9 and not (out / "manifest.parquet").exists()

    code, _, err = call_cli(capsys, *args)
    assert code == 0, err
    resumed = RolloutStore(out)
    assert [r["sample_id"] for r in resumed.manifest()] == [r["sample_id"] for r in reference_store.manifest()]
    reference = latents_of(reference_store)
    for sid, latents in latents_of(resumed).items():
        assert torch.equal(latents, reference[sid]), sid
    assert not any(".tmp-" in p.name for p in out.rglob("*"))


def test_two_processes_equal_one(reference_store, tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "store"
    args = rollout_args(tiny_model_dir, prompt_file, out, "--save-videos", "--fps", "6", "--device", "cpu")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlhf.cli",
         *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 process(es)" in result.stderr  # the run really had two ranks
    store = RolloutStore(out)
    assert store.manifest() == reference_store.manifest()
    reference = latents_of(reference_store)
    for sid, latents in latents_of(store).items():
        assert torch.equal(latents, reference[sid]), sid
        # Decoded frames may differ by one level: torchrun runs each process with one thread.
        frames = load_file(store.sample_path(sid))["frames"].int()
        assert (frames - reference_store.load_sample(sid)["frames"].int()).abs().max() <= 1


def test_every_rank_checks_the_store_before_rank_0_writes_it(tiny_model_dir, prompt_file, tmp_path, monkeypatch,
                                                              capsys):
    """Rank 0 writes the header (store.json, then prompts.jsonl) while other ranks check an existing store: a rank
    still checking would find it half written and refuse it. So the order must be check -> barrier -> write, on a
    fresh store and on one replaced by --overwrite (recorded in one process: the barrier is what other ranks wait at)."""
    import rollouts.rollout as rollout
    from rlhf.distributed import Processes

    events = []
    check = rollout._check_existing
    write_header = RolloutStore.write_header
    monkeypatch.setattr(rollout, "_check_existing", lambda *a, **k: events.append("check") or check(*a, **k))
    monkeypatch.setattr(RolloutStore, "write_header", lambda *a, **k: events.append("write") or write_header(*a, **k))
    monkeypatch.setattr(Processes, "barrier", lambda self: events.append("barrier"))
    out = tmp_path / "store"
    for extra in ([], ["--overwrite", "--steps", "2"]):
        events.clear()
        code, _, stderr = call_cli(capsys, *rollout_args(tiny_model_dir, prompt_file, out, *extra))
        assert code == 0, stderr
        assert events[:3] == ["check", "barrier", "write"], events


def test_batches_span_prompts_and_give_each_sample_its_own_prompt_and_seed(reference_store, tiny_model_dir,
                                                                          prompt_file, tmp_path, capsys):
    """batch_size 9 > K = 3: one unit holds every prompt's samples; batch_size 1: one sample per unit. Both must
    give the reference's samples (batch_size 2: units such as [p00000_s002, p00001_s000]) up to float rounding:
    a sample given a neighbour's prompt or seed would differ completely."""
    from rollouts.rollout import plan_units

    units = plan_units({"p0": "a", "p1": "b", "p2": "c"}, 3, 4)
    assert [[(s.prompt_id, s.index) for s in u.samples] for u in units] == [
        [("p0", 0), ("p0", 1), ("p0", 2), ("p1", 0)], [("p1", 1), ("p1", 2), ("p2", 0), ("p2", 1)], [("p2", 2)]]
    reference = latents_of(reference_store)
    for batch_size in ("9", "1"):
        out = tmp_path / f"batch{batch_size}"
        args = rollout_args(tiny_model_dir, prompt_file, out)
        args[args.index("--batch-size") + 1] = batch_size
        code, _, err = call_cli(capsys, *args)
        assert code == 0, err
        store = RolloutStore(out)
        same = lambda rows: [{k: v for k, v in row.items() if k != "video"} for row in rows]  # noqa: E731
        assert same(store.manifest()) == same(reference_store.manifest())  # the reference also wrote mp4s
        for sid, latents in latents_of(store).items():
            torch.testing.assert_close(latents.float(), reference[sid].float(), atol=0.02, rtol=0.02, msg=sid)
    # The tolerance is far below the difference between two samples, or between two prompts' samples.
    assert (reference["p00000_s000"].float() - reference["p00001_s000"].float()).abs().max() > 0.5


def test_bad_input(tiny_model_dir, prompt_file, reference_store, tmp_path, capsys):
    def fails(*args, expected):
        code, _, err = call_cli(capsys, *args)
        assert code == 2, err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    fails(*rollout_args(tiny_model_dir, tmp_path / "nope.txt", tmp_path / "s1"), expected="nope.txt: prompt file not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails(*rollout_args(tiny_model_dir, empty, tmp_path / "s2"), expected="empty.txt: no prompts found")
    bad_jsonl = tmp_path / "p.jsonl"
    bad_jsonl.write_text('{"text": "x"}\n')
    fails(*rollout_args(tiny_model_dir, bad_jsonl, tmp_path / "s3"), expected="line 1 has no 'prompt' field")

    corrupt = tmp_path / "corrupt"
    import shutil

    shutil.copytree(reference_store.root, corrupt)
    victim = corrupt / "samples" / "p00001" / "p00001_s000.safetensors"
    victim.write_bytes(b"\x00" * 10)
    args = rollout_args(tiny_model_dir, prompt_file, corrupt, "--save-videos", "--fps", "6")
    fails(*args, expected="p00001_s000.safetensors: corrupt sample file")
    (corrupt / "store.json").write_text("{not json")
    fails(*args, expected="store.json: corrupt store metadata")
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_prompt_formats(tmp_path):
    from datasets import Dataset

    from rlhf.prompts import load_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n{"prompt": "a"}\n')
    (tmp_path / "p.csv").write_text('id,prompt\n1,a\n2,"b, with comma"\n3,\n')
    Dataset.from_dict({"prompt": ["x", "y", "x"]}).save_to_disk(str(tmp_path / "ds"))
    jsonl = load_prompts(tmp_path / "p.jsonl")
    assert jsonl.prompts == ["a", "b"] and jsonl.empty_rows == [2] and jsonl.duplicate_rows == [4]
    assert load_prompts(tmp_path / "p.csv").prompts == ["a", "b, with comma"]
    assert load_prompts(tmp_path / "ds").prompts == ["x", "y"]
    assert "1 duplicate (rows 3)" in load_prompts(tmp_path / "ds").report()
