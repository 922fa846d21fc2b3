"""A bytes/ETA progress line on a terminal; silent when stderr is not a TTY or in CI (logs carry the summary)."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    def __init__(self, total_bytes: int, label: str, enabled: bool | None = None) -> None:
        self.total = max(total_bytes, 1)
        self.label = label
        self.done = 0
        self.enabled = (sys.stderr.isatty() and not os.environ.get("CI")) if enabled is None else enabled
        self._start = time.monotonic()
        self._last = 0.0

    def set_label(self, label: str) -> None:
        self.label = label

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.25:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-6)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done / 2**30:6.2f}/{self.total / 2**30:.2f} GiB "
                         f"{rate / 2**20:7.1f} MiB/s ETA {eta:5.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
