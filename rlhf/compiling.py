"""Regional `torch.compile` of the transformer blocks, with the time spent compiling measured apart.

Only the repeated `JointTransformerBlock`s are compiled (diffusers' `compile_repeated_blocks`), each block
separately, not the whole model: the blocks share one code object, so the first block's graph serves every
other block of the same kind and compile time stays that of one or two blocks instead of the whole network.
Compilation is lazy: it happens during the first forward (and, for training, the first backward) of each
variant the blocks see: with and without gradients, adapter on and off, the last block (text stream pre-only).
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("contentv-rlhf")


def compile_blocks(transformer: torch.nn.Module) -> int:
    """Wrap each repeated transformer block of `transformer` in `torch.compile`; returns how many were wrapped."""
    transformer.compile_repeated_blocks()
    return sum(1 for module in transformer.modules() if getattr(module, "_compiled_call_impl", None) is not None)


class CompileTimer:
    """Seconds spent compiling (dynamo tracing and the backend, lazy backward compiles included) while started.

    torch runs the registered callbacks once around each compilation, nested ones merged, so `seconds` is wall
    time spent inside the compiler, apart from the time the compiled code then runs.

        with CompileTimer() as timer:
            ...  # steps that may compile
        timer.seconds
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compilations = 0
        self._started: float | None = None
        self._taken = 0.0

    def _on_start(self, _args) -> None:
        self._started = time.perf_counter()

    def _on_end(self, _args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.compilations += 1
            self._started = None

    def start(self) -> CompileTimer:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        return self

    def stop(self) -> None:
        from torch._dynamo.callback import callback_handler

        if self._on_start in callback_handler.start_callbacks:
            callback_handler.remove_start_callback(self._on_start)
            callback_handler.remove_end_callback(self._on_end)

    def take(self) -> float:
        """Seconds spent compiling since the previous `take` (or the start)."""
        taken, self._taken = self.seconds - self._taken, self.seconds
        return taken

    def __enter__(self) -> CompileTimer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
