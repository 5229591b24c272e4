"""Multi-process helpers shared by the stages: who am I, wait for the others, relaunch with torchrun.

Works the same under `torchrun` / `accelerate launch` (environment variables set by the launcher) and as a
plain single process. On the CPU the processes talk over gloo, so multi-process code is tested here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as set by the launcher (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


@dataclass
class Processes:
    """This process's place in the group; `barrier()` is a no-op for a single process."""

    rank: int = 0
    world_size: int = 1
    state: object | None = None  # accelerate.PartialState when distributed

    @classmethod
    def init(cls, cpu: bool) -> Processes:
        if launched_world_size() == 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        return cls(rank=state.process_index, world_size=state.num_processes, state=state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def shard(self, items: Sequence) -> list:
        """This rank's share of `items`: every `world_size`-th item from `rank` (stable across reruns)."""
        return list(items[self.rank :: self.world_size])


def relaunch_with_torchrun(num_processes: int, argv: Sequence[str]) -> int:
    """Run `contentv-rlhf ARGV` in `num_processes` processes on this machine; returns the exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
        "-m", "rlhf.cli", *argv,
    ]
    return subprocess.call(command)
