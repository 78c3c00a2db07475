"""A dependency-free progress line: rate, ETA and running metrics (on stderr by default)."""
from __future__ import annotations

import sys
import time
from typing import TextIO

import numpy as np

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.2`` → ``"1:15"``; ``3725`` → ``"1:02:05"``."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _format_metric(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressBar:
    """A one-line progress display: ``desc [#####.....] done/total pct rate unit/s ETA m:ss key=value``.

    ``update(n, **metrics)`` advances by ``n`` items (images) and shows the latest
    metrics. On a terminal the line is redrawn in place (at most every
    ``min_interval`` seconds); on a file or pipe, a full line is written at most
    every ``log_interval`` seconds so that logs stay short. ``close()`` writes the
    final line with the total time. Disabled bars (``enabled=False``) print
    nothing but still track ``done`` and ``elapsed``. Usable as a context manager.
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool = True, unit: str = "img",
                 stream: TextIO | None = None, width: int = 24, min_interval: float = 0.1,
                 log_interval: float = 10.0):
        if total is not None and (isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0):
            raise ValueError(f"ProgressBar total must be a non-negative int or None, got {total!r}")
        self.total = None if total is None else int(total)
        self.desc, self.enabled, self.unit, self.width = desc, bool(enabled), unit, int(width)
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval, self.log_interval = float(min_interval), float(log_interval)
        self.done = 0
        self.metrics: dict = {}
        self.start = time.perf_counter()
        self._last_draw = float("-inf")
        self._closed = False
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        """Items per second so far (0 before any time has passed)."""
        elapsed = self.elapsed
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **metrics) -> None:
        self.done += int(n)
        self.metrics.update(metrics)
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if finished and not self._tty:
            return  # close() writes the final line; a log needs no "100%, ETA 0:00" line before it
        interval = self.min_interval if self._tty else self.log_interval
        if finished or now - self._last_draw >= interval:
            self._draw(final=False)
            self._last_draw = now

    def due(self) -> bool:
        """True when the next :meth:`update` would draw a line: the moment to read metrics that
        live on the device (reading them at every step would synchronize at every step)."""
        if not self.enabled:
            return False
        interval = self.min_interval if self._tty else self.log_interval
        return time.perf_counter() - self._last_draw >= interval

    def line(self, final: bool = False) -> str:
        """The text of the progress line (without a line ending)."""
        parts = [self.desc] if self.desc else []
        rate = self.rate
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            filled = int(round(fraction * self.width))
            parts.append("[" + "#" * filled + "." * (self.width - filled) + "]")
            parts.append(f"{self.done}/{self.total} {100 * fraction:3.0f}%")
        else:
            parts.append(f"{self.done}")
        parts.append(f"{rate:.1f} {self.unit}/s")
        if final:
            parts.append(f"in {format_duration(self.elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        parts.extend(f"{k}={_format_metric(v)}" for k, v in self.metrics.items())
        return " ".join(parts)

    def _draw(self, final: bool) -> None:
        text = self.line(final)
        if self._tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Write the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(final=True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
