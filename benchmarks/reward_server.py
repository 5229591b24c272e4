"""Scoring throughput in-process against through `contentv-rlhf reward-server`: same scorers, same videos.

Builds the shapes world's scorers (configs/world/rewards.yaml: clip, aesthetic, motion) plus `brightness` (it
costs almost nothing, so its remote time is the transport: encode, HTTP, decode) in this process, starts a reward
server with the same YAML in a subprocess on 127.0.0.1, and scores the same videos (uint8 frames / 255, as a
rollout store holds them) with `score_videos` one scorer at a time, both ways interleaved, `batch_size` videos
per scorer call and request. Prints per scorer the videos per second each way (best of `--repeats` after a
warm-up round), the time a request adds, the request size, and whether every remote score equals the in-process
one exactly. Client and server share this machine's cores.

    python benchmarks/reward_server.py [--videos 64] [--frames 9] [--size 64] [--batch-size 16] [--record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import emit_rows  # noqa: E402

WORLD_REWARDS = "configs/world/rewards.yaml"


def start_server(rewards: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """A reward server for `rewards` on a free localhost port; its URL once it is ready."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "reward-server", "--rewards", str(rewards),
                                "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    if "serving" not in line:
        process.kill()
        raise SystemExit(f"reward-server did not start ({line.strip()})")
    return process, line.split(" on ")[1].split()[0]


def rewards_file(folder: Path) -> Path:
    """WORLD_REWARDS with absolute weight paths, on the CPU, plus `brightness` (costs ~nothing: the transport)."""
    settings = yaml.safe_load((ROOT / WORLD_REWARDS).read_text().replace("rlhf/world/weights",
                                                                          str(ROOT / "rlhf/world/weights")))
    settings["scorers"]["brightness"] = {"weight": 0.0}
    path = folder / "rewards.yaml"
    path.write_text(yaml.safe_dump({**settings, "device": "cpu"}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9, help="frames per video (the world rollout's 9)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width (the world's 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="videos per scorer call / request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, client and server each")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()
    import torch

    from rewards.build import build_scorers, score_videos
    from rewards.config import load_rewards_config
    from rewards.wire import encode_request

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp())
    rewards = rewards_file(work)
    local = build_scorers(load_rewards_config(rewards))
    generator = torch.Generator().manual_seed(0)
    videos = torch.randint(0, 256, (args.videos, args.frames, 3, args.size, args.size), generator=generator,
                           dtype=torch.uint8).float() / 255  # (N, T, 3, H, W)
    prompts = [f"a red circle moving left {i}" for i in range(args.videos)]
    server, url = start_server(rewards, args.threads)
    seconds: dict[str, dict[str, list[float]]] = {name: {"in_process": [], "reward_server": []} for name in local}
    equal = True
    try:
        remote = build_scorers({"scorers": {name: {"remote": url} for name in local}, "device": "cpu"})
        for repeat in range(args.repeats + 1):  # the first round warms up (allocations, the server's threads)
            for name in local:  # interleaved, so load from other jobs hits both ways alike
                for way, scorers in (("in_process", local), ("reward_server", remote)):
                    start = time.perf_counter()
                    scores = score_videos({name: scorers[name]}, videos, prompts, batch_size=args.batch_size)[name]
                    if repeat:
                        seconds[name][way].append(time.perf_counter() - start)
                    if way == "in_process":
                        want = scores
                    else:
                        equal = equal and torch.equal(scores, want)
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    requests = -(-args.videos // args.batch_size)
    per_scorer = {}
    for name, ways in seconds.items():
        best = {way: min(times) for way, times in ways.items()}
        batch = videos[: args.batch_size]
        kept = sorted(set(local[name].scorer.frame_positions(args.frames) or range(args.frames)))
        per_scorer[name] = {
            **{f"{way}_videos_per_s": round(args.videos / value, 1) for way, value in best.items()},
            "added_ms_per_request": round(1000 * (best["reward_server"] - best["in_process"]) / requests, 1),
            "request_bytes": len(encode_request(batch[:, kept], prompts[: args.batch_size], kept, args.frames)),
        }
    total = {way: sum(min(seconds[name][way]) for name in local) for way in ("in_process", "reward_server")}
    row = {
        "figure": "under load (2 CPU cores shared with other jobs; client and server on the same cores)",
        "videos": args.videos, "frames": args.frames, "size": args.size, "batch_size": args.batch_size,
        "threads": args.threads, "repeats": args.repeats,
        "all_scorers_videos_per_s": {way: round(args.videos / value, 1) for way, value in total.items()},
        "per_scorer": per_scorer,
        "scores_equal_exactly": equal,
    }
    emit_rows("reward_server", [row], time.perf_counter() - started, args.record)
    if not equal:
        raise SystemExit("remote scores differ from in-process scores")


if __name__ == "__main__":
    main()
