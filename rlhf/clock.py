"""When the current command started: the origin of every wall-time budget (`max_seconds`).

`rlhf.cli.main` marks it on entry, so a budget pays for everything the command does before its first
optimiser step too (imports aside: model loading, calibration, a rollout). Code called without the CLI (a
test, a notebook) falls back to the first time it asks.
"""

from __future__ import annotations

import time

_started: float | None = None


def mark_command_start() -> None:
    global _started
    _started = time.perf_counter()


def seconds_since_command_start() -> float:
    global _started
    if _started is None:
        _started = time.perf_counter()
    return time.perf_counter() - _started
