"""Batched evaluation and the one host→device copy per batch.

Device habits (issue 15): each batch crosses to the device in one copy; correct counts and
the loss are summed on the device and read back once, at the end (or when a progress line
is drawn), so the loop never waits for the device between batches.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from minibasis import backend
from minibasis.autograd import Tensor, no_grad
from minibasis.nn import Module
from minibasis.training.progress import ProgressBar

__all__ = ["EvalResult", "evaluate", "eval_metrics", "to_device_batch", "correct_and_loss_sums"]

# Labels travel inside the float32 image buffer; float32 holds every integer below 2**24 exactly.
_MAX_PACKED_LABEL = 2 ** 24


def to_device_batch(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, object]:
    """Host batch (x (N, ...) float, y (N,) int) → (input Tensor in the default dtype, int64
    labels on the device), in ONE host→device copy: the labels ride at the end of the image
    buffer and are split off and cast on the device."""
    x = np.asarray(x)
    y = np.asarray(y)
    dtype = np.dtype(backend.default_dtype)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= _MAX_PACKED_LABEL or dtype.itemsize < 4):
        return tensor_on_device(x), backend.asarray(y.astype(np.int64, copy=False))
    packed = np.empty(x.size + y.size, dtype=dtype)
    packed[:x.size] = x.reshape(-1)
    packed[x.size:] = y
    device = backend.asarray(packed)
    return Tensor(device[:x.size].reshape(x.shape)), device[x.size:].astype(backend.xp.int64)


def tensor_on_device(x: np.ndarray) -> Tensor:
    """Host images → a Tensor on the device in the default dtype (one copy)."""
    if x.dtype != backend.default_dtype:
        x = x.astype(backend.default_dtype)
    return Tensor(backend.asarray(x))


def correct_and_loss_sums(logits, labels) -> tuple[object, object]:
    """(number of top-1 hits, Σ cross-entropy in float64) as 0-d device arrays — no host read."""
    xp = backend.get_array_module(logits)
    z = logits.astype(xp.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = xp.log(xp.exp(z).sum(axis=1))
    picked = xp.take_along_axis(z, labels.reshape(-1, 1), axis=1).reshape(-1)
    return (logits.argmax(axis=1) == labels).sum(), (log_norm - picked).sum()


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate` measured. ``logits`` (N, num_classes) float32 only when asked for."""

    accuracy: float          # top-1, in [0, 1]
    correct: int
    total: int
    loss: float              # mean cross-entropy (natural log), summed in float64
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


def evaluate(model: Module, images: np.ndarray, labels, batch_size: int = 256,
             transform: Callable[[np.ndarray], np.ndarray] | None = None, progress: bool = True,
             return_logits: bool = False, desc: str = "eval") -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` on host ``images`` (N, C, H, W) with
    integer ``labels`` (N,).

    Each batch is ``transform(images[i:i+batch_size])`` (e.g. ``data.Normalize``; None: the
    images are used as they are and must be floating), copied to the active backend once,
    and run in eval mode under ``no_grad``; the model's previous train/eval mode is restored
    afterwards. The labels are copied to the device once, up front. Labels outside the
    model's output range raise ValueError. Only one batch of logits is on the device at a time.
    """
    images, labels = _check_eval_inputs(images, labels, batch_size)
    n = images.shape[0]
    was_training = model.training
    model.eval()
    all_logits = [] if return_logits else None
    device_labels = backend.asarray(labels)
    correct = loss_sum = 0
    low, high = (int(labels.min()), int(labels.max())) if n else (0, 0)
    bar = ProgressBar(n, desc=desc, enabled=progress)
    try:
        with no_grad():
            for start in range(0, n, batch_size):
                batch = images[start:start + batch_size]
                batch = transform(batch) if transform is not None else batch
                if batch.dtype.kind != "f":
                    raise ValueError(f"evaluate: the model needs floating input; got {batch.dtype} "
                                     f"(pass a transform such as data.Normalize)")
                logits = model(Tensor(backend.asarray(batch))).data
                count = len(batch)
                if logits.ndim != 2 or logits.shape[0] != count:
                    raise ValueError(f"evaluate: the model returned shape {tuple(logits.shape)}, "
                                     f"expected ({count}, classes)")
                if low < 0 or high >= logits.shape[1]:
                    raise ValueError(f"evaluate: labels must lie in [0, {logits.shape[1]}), got [{low}, {high}]")
                hits, losses = correct_and_loss_sums(logits, device_labels[start:start + count])
                correct, loss_sum = correct + hits, loss_sum + losses
                if all_logits is not None:
                    all_logits.append(backend.to_numpy(logits).astype(np.float32, copy=False))
                if bar.due():
                    bar.update(count, acc=int(correct) / (start + count))
                else:
                    bar.update(count)
    finally:
        model.train(was_training)
    correct = int(correct)
    bar.metrics["acc"] = correct / n if n else 0.0
    bar.close()
    seconds = bar.elapsed
    return EvalResult(accuracy=correct / n if n else 0.0, correct=correct, total=n,
                      loss=float(loss_sum) / n if n else 0.0, seconds=seconds,
                      images_per_s=n / seconds if seconds > 0 else 0.0,
                      logits=np.concatenate(all_logits) if all_logits else
                      (np.zeros((0, 0), np.float32) if return_logits else None))


def eval_metrics(images: np.ndarray, labels, transform=None, batch_size: int = 256) -> Callable[[Module], dict]:
    """``metrics(model) -> {"test_acc": float, "test_loss": float}`` on ``images`` (N, C, H, W) with
    ``labels`` (N,), through ``transform``, in batches without a progress line: the ``eval_fn``
    a :class:`~minibasis.training.Trainer` takes."""

    def metrics(model: Module) -> dict:
        result = evaluate(model, images, labels, batch_size=batch_size, transform=transform, progress=False)
        return {"test_acc": result.accuracy, "test_loss": result.loss}

    return metrics
