"""`contentv-rlhf reward-server` and `remote:` scorer entries, on localhost.

References: the same scorers built in this process and called on the same frames and batches (exact equality,
`torch.equal`); the store's score files as written before the server died.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from rewards.build import build_scorers, score_videos, weighted_reward
from rewards.server import RewardServer
from rewards.wire import as_uint8, decode_request, encode_request
from rlhf.errors import UserError
from tests.conftest import REPO, TRAIN_PROMPTS, call_cli

WORLD_REWARDS = REPO / "configs" / "world" / "rewards.yaml"


def world_rewards() -> dict:
    """configs/world/rewards.yaml with its weight paths made absolute, on the CPU."""
    text = WORLD_REWARDS.read_text().replace("rlhf/world/weights", str(REPO / "rlhf" / "world" / "weights"))
    return {**yaml.safe_load(text), "device": "cpu"}


class Served:
    """A RewardServer running in a thread of this process."""

    def __init__(self, scorers, max_request_bytes: int = 64 << 20):
        self.server = RewardServer(scorers, "127.0.0.1", 0, max_request_bytes)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def remote(self, names, **options) -> dict:
        return {"scorers": {name: {"remote": self.server.url, "weight": 0.5 + i, **options}
                            for i, name in enumerate(names)}, "device": "cpu"}

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@pytest.fixture(scope="module")
def world_server():
    served = Served(build_scorers(world_rewards()))
    yield served
    served.close()


def world_videos(count: int, frames: int = 9, seed: int = 0) -> torch.Tensor:
    """Rendered-like frames: uint8 values / 255, as a rollout store gives them. `(B, T, 3, 64, 64)`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, frames, 3, 64, 64), generator=generator, dtype=torch.uint8).float() / 255


def test_remote_scores_equal_in_process_scores_exactly(world_server):
    local = world_server.server.scorers
    remote = build_scorers(world_server.remote(["clip", "aesthetic", "motion"]))
    prompts = [TRAIN_PROMPTS[i % len(TRAIN_PROMPTS)] for i in range(5)]
    for frames in (world_videos(5), torch.rand(5, 9, 3, 64, 64, generator=torch.Generator().manual_seed(1))):
        want = score_videos(local, frames, prompts, batch_size=3)
        got = score_videos(remote, frames, prompts, batch_size=3)
        for name in want:
            assert torch.equal(got[name], want[name]), name
            assert got[name].dtype == torch.float32
    # Weighted sums use the client's weights on the server's exact scores.
    total, parts = weighted_reward(remote, frames[:3], prompts[:3])
    for name, (scorer, _) in local.items():
        assert torch.equal(parts[name], scorer(frames[:3], prompts[:3]))
    assert torch.allclose(total, 0.5 * parts["clip"] + 1.5 * parts["aesthetic"] + 2.5 * parts["motion"])
    # What a store records, and which frames of a video a scorer reads, are the server's.
    for name, (scorer, _) in local.items():
        assert remote[name].scorer.info() == json.loads(json.dumps(scorer.info(), default=str))
        assert remote[name].scorer.frame_positions(9) == scorer.frame_positions(9)


def test_a_stores_frame_subset_scores_as_in_process(world_server):
    """Frames at given video positions (a rollout store's kept frames): the remote side reads the same ones."""
    local = world_server.server.scorers
    remote = build_scorers(world_server.remote(["clip", "motion"]))
    video = world_videos(2, frames=17, seed=3)
    positions = sorted(set(local["clip"].scorer.frame_positions(17)) | set(local["motion"].scorer.frame_positions(17)))
    kept = video[:, positions]
    for name in ("clip", "motion"):
        want = local[name].scorer(kept, TRAIN_PROMPTS[:2], positions=positions, num_frames=17)
        assert torch.equal(remote[name].scorer(kept, TRAIN_PROMPTS[:2], positions=positions, num_frames=17), want)
        assert torch.equal(want, local[name].scorer(video, TRAIN_PROMPTS[:2]))  # the subset holds what it reads
    with pytest.raises(ValueError, match="missing"):
        remote["clip"].scorer(kept[:, :1], TRAIN_PROMPTS[:2], positions=positions[:1], num_frames=17)


def test_frames_travel_as_uint8_only_when_that_is_exact():
    frames = world_videos(2)
    compact, exact = encode_request(frames, ["a", "b"], None, 9), encode_request(frames + 1e-4, ["a", "b"], None, 9)
    assert as_uint8(frames) is not None and as_uint8(frames + 1e-4) is None
    assert len(compact) < len(exact) / 3.9  # 1 byte a value instead of 4
    for body, sent in ((compact, frames), (exact, frames + 1e-4)):
        request = decode_request(body)
        assert torch.equal(request.frames, sent) and request.frames.dtype == torch.float32
        assert request.prompts == ["a", "b"] and request.positions is None and request.num_frames == 9
    half = frames.half()
    assert torch.equal(decode_request(encode_request(half, ["a", "b"], [0, 1, 2, 3, 4, 5, 6, 7, 8], 9)).frames, half)


def test_bodies_over_the_limit_are_refused(world_server):
    served = Served(world_server.server.scorers, max_request_bytes=40_000)
    try:
        host, port = served.server.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.putrequest("POST", "/v1/score?scorer=clip")
        connection.putheader("Content-Length", str(1 << 40))  # announced, never sent
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413 and "over this server's limit of 40000 bytes" in json.loads(answer.read())["error"]
        connection.close()

        remote = build_scorers(served.remote(["clip"]))["clip"].scorer
        with pytest.raises(UserError, match=r"is over the limit of http://127\.0\.0\.1:\d+ \(40000 bytes\); lower "
                                            "batch_size") as err:
            remote(world_videos(4), TRAIN_PROMPTS[:4])  # 4 videos x 3 frames x 12 KiB
        assert "\n" not in str(err.value)
        remote.max_request_bytes = 1 << 30  # a client that believes the limit is higher: the server's 413 says no
        with pytest.raises(UserError, match="answered 413: request body of .* over this server's limit"):
            remote(world_videos(4), TRAIN_PROMPTS[:4])
        assert remote(world_videos(1), TRAIN_PROMPTS[:1]).shape == (1,)  # 36 KiB: under the limit, served
    finally:
        served.close()


def test_bad_remote_entries_are_one_line_user_errors(world_server):
    with pytest.raises(UserError, match=r"rewards.scorers.clip: field 'remote' expects http://host:port"):
        build_scorers({"scorers": {"clip": {"remote": "ftp://127.0.0.1:1"}}})
    with pytest.raises(UserError, match=r"rewards.scorers.judge: .* serves no scorer 'judge' \(it serves clip, "
                                        r"aesthetic, motion\)"):
        build_scorers(world_server.remote(["judge"]))
    with pytest.raises(UserError, match="rewards.scorers.clip: an entry takes remote"):
        build_scorers({"scorers": {"clip": {"remote": world_server.server.url, "class": "clip"}}})
    closed = Served({})
    url = closed.server.url
    closed.close()
    started = time.monotonic()
    with pytest.raises(UserError, match=f"no answer from {url}/v1/scorers after 3 attempt") as err:
        build_scorers({"scorers": {"clip": {"remote": url, "retries": 2, "backoff_s": 0.1}}})
    assert time.monotonic() - started >= 0.3 and "\n" not in str(err.value)  # waited 0.1 + 0.2 s between tries


def start_server(rewards: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`contentv-rlhf reward-server` in a subprocess; its URL from the line it prints when ready."""
    process = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "reward-server", "--rewards", str(rewards),
                                "--port", "0", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline()
    if "serving" not in line:
        process.kill()
        raise AssertionError(f"server did not start: {line}{process.stderr.read()[-2000:]}")
    return process, line.split(" on ")[1].split()[0]


def test_score_through_a_server_killed_mid_run_keeps_its_scores_and_resumes(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store.root, store)
    served = tmp_path / "served.yaml"
    served.write_text(yaml.safe_dump({"scorers": {"slow": {"class": "tests.slow_scorer:SlowBrightness",
                                                           "options": {"seconds": 0.4}}}, "device": "cpu"}))
    client = tmp_path / "remote.yaml"
    scores_file = store / "scores" / "slow.json"
    in_process = build_scorers({"scorers": {"brightness": {}}, "device": "cpu"})["brightness"].scorer
    from rollouts.store import RolloutStore

    copy = RolloutStore(store)
    ids = [r["sample_id"] for r in copy.manifest()]
    expected = {}
    for start in range(0, len(ids), 4):  # the batches `score` sends
        chunk = ids[start:start + 4]
        values = in_process(torch.stack([copy.saved_frames(sid)[0] for sid in chunk]), ["x"] * len(chunk))
        expected.update(zip(chunk, values.tolist(), strict=True))

    server, url = start_server(served)
    try:
        assert url.startswith("http://127.0.0.1:")  # localhost unless told otherwise
        client.write_text(yaml.safe_dump({"scorers": {"slow": {"remote": url, "retries": 2, "backoff_s": 0.2}},
                                          "batch_size": 4}))
        score = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "score", "--store", str(store), "--config",
                                  str(client)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not scores_file.exists() and time.monotonic() < deadline and score.poll() is None:
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)  # mid-run: a 0.4 s request is in flight or about to be
        server.wait(10)
        _, stderr = score.communicate(timeout=120)
    finally:
        server.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("contentv-rlhf score: error:")]
    assert score.returncode == 2, stderr[-2000:]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0]
    assert f"remote scorer 'slow': no answer from {url}/v1/score?scorer=slow after 3 attempt(s)" in errors[0]
    kept = json.loads(scores_file.read_text())["scores"]
    assert 4 <= len(kept) < 24 and len(kept) % 4 == 0  # whole batches, written before the server died
    assert all(kept[sid] == expected[sid] for sid in kept)

    server, url = start_server(served)  # a new server (another port): the rerun scores only what is missing
    try:
        client.write_text(yaml.safe_dump({"scorers": {"slow": {"remote": url}}, "batch_size": 4}))
        code = subprocess.run([sys.executable, "-m", "rlhf.cli", "score", "--store", str(store), "--config",
                               str(client)], cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        server.kill()
    assert code.returncode == 0, code.stderr[-2000:]
    assert f"({len(kept)} scores already there)" in code.stderr
    final = json.loads(scores_file.read_text())["scores"]
    assert final == expected  # every sample, each equal to the in-process score


def test_reward_server_bad_input_exits_2_with_one_line(tmp_path, capsys):
    code, _, err = call_cli(capsys, "reward-server", "--rewards", tmp_path / "missing.yaml", "--port", "0")
    assert code == 2 and err.count("\n") == 1 and "rewards: " in err and "rewards config not found" in err
    remote = tmp_path / "remote.yaml"
    remote.write_text(yaml.safe_dump({"scorers": {"clip": {"remote": "http://127.0.0.1:1"}}}))
    code, _, err = call_cli(capsys, "reward-server", "--rewards", remote, "--port", "0")
    assert code == 2 and err.count("\n") == 1 and "are remote themselves" in err
    busy = Served({})
    try:
        port = busy.server.url.rsplit(":", 1)[1]
        code, _, err = call_cli(capsys, "reward-server", "--rewards", WORLD_REWARDS, "--port", port)
        assert code == 2 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    finally:
        busy.close()
    code, _, err = call_cli(capsys, "reward-server", "--rewards", WORLD_REWARDS, "--port", "70000")
    assert code == 2 and "port" in err and "[0, 65535]" in err


def test_throughput_benchmark_runs_reduced():
    result = subprocess.run([sys.executable, "benchmarks/reward_server.py", "--videos", "4", "--frames", "5",
                             "--size", "32", "--batch-size", "2", "--repeats", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.splitlines()[0])
    assert row["scores_equal_exactly"] is True and row["figure"].startswith("under load")
    assert sorted(row["per_scorer"]) == ["aesthetic", "brightness", "clip", "motion"]
    # clip reads 3 of the 5 frames, brightness all 5: its request carries 5/3 the frame bytes (uint8 frames).
    sizes = {name: entry["request_bytes"] for name, entry in row["per_scorer"].items()}
    assert 5 * 2 * 3 * 32 * 32 < sizes["brightness"] < 5 * 2 * 3 * 32 * 32 + 1024
    assert 3 * 2 * 3 * 32 * 32 < sizes["clip"] < 3 * 2 * 3 * 32 * 32 + 1024


def test_eval_through_a_server_reports_the_in_process_scores(tiny_store, tmp_path, capsys):
    from tests.conftest import random_adapter

    model = tiny_store.settings["model"]
    adapter = random_adapter(model, tmp_path / "adapter", std=0.3)
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a purple flower\na grey rock\n")
    local = {"scorers": {"brightness": {"weight": 1.0}, "contrast": {"weight": 0.5}}, "device": "cpu"}
    served = Served(build_scorers(local))
    try:
        results = {}
        for way, rewards in (("in_process", local), ("remote", served.remote(["brightness", "contrast"]))):
            path = tmp_path / f"{way}.yaml"
            path.write_text(yaml.safe_dump(rewards))
            code, _, err = call_cli(capsys, "eval", "--model", model, "--adapters", adapter, "--prompts", prompts,
                                    "--seeds", "2", "--rewards", path, "--out", tmp_path / way, "--frames", "5",
                                    "--height", "32", "--width", "32", "--steps", "2", "--dtype", "fp32")
            assert code == 0, err
            results[way] = json.loads((tmp_path / way / "eval.json").read_text())
    finally:
        served.close()
    assert results["remote"]["scores"] == results["in_process"]["scores"]
    assert set(results["remote"]["scores"]["base"]) >= {"brightness", "contrast"}


def test_a_vlm_judge_served_remotely_scores_as_in_process(tmp_path):
    from tests.test_rewards_vlm import build_tiny_judge, judge_config

    local = build_scorers(judge_config(build_tiny_judge(tmp_path / "judge", "qwen2_vl"), batch_size=3))
    served = Served(local)
    try:
        remote = build_scorers(served.remote(["judge"]))
        frames, prompts = world_videos(3, frames=7), TRAIN_PROMPTS[:3]
        assert torch.equal(score_videos(remote, frames, prompts, batch_size=3)["judge"],
                           score_videos(local, frames, prompts, batch_size=3)["judge"])
        assert remote["judge"].scorer.info()["model_type"] == "qwen2_vl"
    finally:
        served.close()
