"""A progress line on stderr for commands that can run for minutes.

It shows what is done against a real total (never the lines read so far),
the percentage, the rate and the time left, redrawn at most five times a
second on a terminal; elsewhere (a log file, CI) it prints nothing, so
stdout and stderr stay machine-readable. A total of None (stdin) shows the
count and the rate only.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``advance(n)`` as work completes; ``close()`` ends the line."""

    def __init__(
        self,
        what: str,
        total: float | None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval_s: float = 0.2,
    ) -> None:
        self.what = what
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0.0
        self._interval_s = interval_s
        self._started = time.monotonic()
        self._drawn = 0.0
        self._shown = False

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        now = time.monotonic()
        if self.enabled and now - self._drawn >= self._interval_s:
            self._drawn = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled and (self._shown or self.done):
            self._draw(time.monotonic())
            print(file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """The text of the progress line (without the carriage return)."""
        elapsed = max((now if now is not None else time.monotonic()) - self._started, 1e-9)
        rate = self.done / elapsed
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.what}: {self.done:,.0f}"
        if self.total:
            share = min(self.done / self.total, 1.0)
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            text += f" of {self.total:,.0f}{unit} ({share:.0%}), {rate:,.0f}{unit}/s, "
            text += f"{max(left, 0.0):,.0f} s left"
        else:
            text += f"{unit}, {rate:,.0f}{unit}/s"
        return text

    def _draw(self, now: float) -> None:
        self._shown = True
        print("\r" + self.line(now) + "\x1b[K", end="", file=self.stream, flush=True)
