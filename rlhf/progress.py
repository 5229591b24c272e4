"""Progress for long loops: a tqdm bar on a terminal, periodic plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import logging
import sys
import time

logger = logging.getLogger("contentv-rlhf")


class Progress:
    """`update(n)` as work completes; shows done/total, items per second and the ETA.

    On a TTY this is a tqdm bar; otherwise a log line every `log_every` seconds and one at the end.
    `enabled=False` (e.g. non-zero ranks) shows nothing.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 log_every: float = 30.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.initial = initial, initial
        self.enabled, self.log_every = enabled, log_every
        self.start = self.last_log = time.perf_counter()
        self.bar = None
        self.postfix: dict[str, float] = {}
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last_log >= self.log_every:
            self._log()

    def set_postfix(self, **values: float) -> None:
        """Latest figures (e.g. loss) shown beside the bar or in the next log line."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def _log(self) -> None:
        self.last_log = time.perf_counter()
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        extra = "".join(f", {k} {v:.4g}" for k, v in self.postfix.items())
        logger.info("%s: %d/%d %s, %.2f %s/s, ETA %.0fs%s", self.desc, self.done, self.total, self.unit, rate,
                    self.unit, eta, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._log()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
