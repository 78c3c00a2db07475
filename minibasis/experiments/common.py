"""Helpers the experiments share: a progress bar, batched evaluation, where the shared material lives.

* :class:`ProgressBar`: a dependency-free progress line on stderr with the rate
  (images/s), the ETA and any running metrics.
* :func:`evaluate`: top-1 accuracy (and mean cross-entropy, and optionally the
  logits) of a model on host arrays, batch by batch, in eval mode without a graph.
* :func:`shared_dir`: the read-only shared folder (``$MINIBASIS_SHARED``, else
  ``../shared`` beside the repository or the current directory).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from minibasis import backend
from minibasis.autograd import Tensor, no_grad
from minibasis.nn import Module

__all__ = ["ProgressBar", "EvalResult", "evaluate", "shared_dir", "format_duration", "peak_memory_mib"]


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


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``logits`` (N, num_classes) float32 only when asked for."""

    accuracy: float          # top-1, in [0, 1]
    correct: int
    total: int
    loss: float              # mean cross-entropy (natural log), computed on the host in float64
    seconds: float
    images_per_s: float
    logits: np.ndarray | None = None

    def as_dict(self) -> dict:
        """JSON-ready summary (without the logits)."""
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total, "loss": self.loss,
                "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 1)}


def _check_eval_inputs(images, labels, batch_size) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise ValueError(f"evaluate: images must be a NumPy array (N, C, H, W), got "
                         f"{type(images).__name__} with shape {getattr(images, 'shape', None)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.dtype.kind not in "iu":
        raise ValueError(f"evaluate: labels must be integers of shape ({images.shape[0]},), got "
                         f"dtype {labels.dtype} shape {labels.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be a positive int, got {batch_size!r}")
    return images, labels.astype(np.int64, copy=False)


def _cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).sum())


def evaluate(model: Module, images: np.ndarray, labels, batch_size: int = 256,
             transform: Callable[[np.ndarray], np.ndarray] | None = None, progress: bool = True,
             return_logits: bool = False, desc: str = "eval") -> EvalResult:
    """Top-1 accuracy of ``model`` on host ``images`` (N, C, H, W) with integer ``labels`` (N,).

    Each batch is ``transform(images[i:i+batch_size])`` (e.g. ``data.Normalize``;
    None: the images are used as they are and must be floating), moved to the
    active backend, and run in eval mode under ``no_grad``; the model's previous
    train/eval mode is restored afterwards. Labels outside the model's output
    range raise ValueError. Only one batch of logits is on the device at a time.
    """
    images, labels = _check_eval_inputs(images, labels, batch_size)
    n = images.shape[0]
    was_training = model.training
    model.eval()
    all_logits = [] if return_logits else None
    correct, loss_sum = 0, 0.0
    bar = ProgressBar(n, desc=desc, enabled=progress)
    try:
        with no_grad():
            for start in range(0, n, batch_size):
                batch = images[start:start + batch_size]
                batch = transform(batch) if transform is not None else batch
                if batch.dtype.kind != "f":
                    raise ValueError(f"evaluate: the model needs floating input; got {batch.dtype} "
                                     f"(pass a transform such as data.Normalize)")
                out = model(Tensor(backend.asarray(batch)))
                logits = backend.to_numpy(out.data)
                y = labels[start:start + batch_size]
                if logits.ndim != 2 or logits.shape[0] != len(y):
                    raise ValueError(f"evaluate: the model returned shape {logits.shape}, expected ({len(y)}, classes)")
                if y.min() < 0 or y.max() >= logits.shape[1]:
                    raise ValueError(f"evaluate: labels must lie in [0, {logits.shape[1]}), got "
                                     f"[{y.min()}, {y.max()}]")
                correct += int((logits.argmax(axis=1) == y).sum())
                loss_sum += _cross_entropy_sum(logits, y)
                if all_logits is not None:
                    all_logits.append(logits.astype(np.float32, copy=False))
                done = start + len(y)
                bar.update(len(y), acc=correct / done)
    finally:
        model.train(was_training)
    bar.close()
    seconds = bar.elapsed
    return EvalResult(accuracy=correct / n if n else 0.0, correct=correct, total=n,
                      loss=loss_sum / n if n else 0.0, seconds=seconds,
                      images_per_s=n / seconds if seconds > 0 else 0.0,
                      logits=np.concatenate(all_logits) if all_logits else
                      (np.zeros((0, 0), np.float32) if return_logits else None))


def shared_dir() -> Path:
    """The shared material: ``$MINIBASIS_SHARED``, else the first existing of ``<repo>/../shared``,
    ``./shared`` and ``../shared`` (the repository-relative one returned when none exists)."""
    env = os.environ.get("MINIBASIS_SHARED")
    if env:
        return Path(env)
    repo_sibling = Path(__file__).resolve().parents[2].parent / "shared"
    for candidate in (repo_sibling, Path.cwd() / "shared", Path.cwd().parent / "shared"):
        if candidate.is_dir():
            return candidate
    return repo_sibling


def peak_memory_mib() -> float | None:
    """This process's peak resident memory in MiB (Linux/macOS), or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak / (2 ** 20 if sys.platform == "darwin" else 1024)
