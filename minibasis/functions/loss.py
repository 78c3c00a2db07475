"""Softmax cross-entropy, computed through a stable log-sum-exp."""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Function, Tensor

__all__ = ["softmax_cross_entropy", "cross_entropy", "log_softmax", "softmax"]


def _log_softmax(x, xp):
    shifted = x - x.max(axis=1, keepdims=True)  # exp never overflows: the largest term is exp(0)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


class SoftmaxCrossEntropy(Function):
    """Mean (or summed) −log softmax(x)[label]. Backward: (softmax − onehot)·gy/N."""

    name = "softmax_cross_entropy"

    def __init__(self, labels, reduction: str):
        self.labels, self.reduction = labels, reduction

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        log_p = _log_softmax(logits, xp)
        self.log_p = log_p
        rows = xp.arange(logits.shape[0])
        picked = -log_p[rows, self.labels]
        return picked.mean() if self.reduction == "mean" else picked.sum()

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        grad = xp.exp(self.log_p)
        grad[xp.arange(grad.shape[0]), self.labels] -= 1
        scale = gy / grad.shape[0] if self.reduction == "mean" else gy
        return backend.mul(grad, scale.astype(grad.dtype))


def softmax_cross_entropy(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """logits (N, K) float, labels (N,) integers in [0, K) → scalar loss."""
    shape = tuple(logits.shape)
    if len(shape) != 2:
        raise ValueError(f"softmax_cross_entropy expects logits of shape (N, K), got {shape}")
    if getattr(logits.dtype, "kind", "f") != "f":
        raise TypeError(f"softmax_cross_entropy: logits must be floating, got {logits.dtype}")
    labels = labels.data if isinstance(labels, Tensor) else labels
    labels = backend.asarray(labels) if not hasattr(labels, "shape") else labels
    xp = backend.get_array_module(logits.data if isinstance(logits, Tensor) else logits)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"softmax_cross_entropy: labels must be integers, got dtype {labels.dtype}")
    if tuple(labels.shape) != (shape[0],):
        raise ValueError(f"softmax_cross_entropy: labels must have shape ({shape[0]},), got {tuple(labels.shape)}")
    if backend.get_array_module(labels) is not xp:
        labels = xp.asarray(backend.to_numpy(labels))
    # One host read of one flag (on CuPy: one synchronisation per call), not two of min and max.
    if labels.size and bool(((labels < 0) | (labels >= shape[1])).any()):
        raise ValueError(f"softmax_cross_entropy: labels must lie in [0, {shape[1]}), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return SoftmaxCrossEntropy(labels, reduction)(logits)


cross_entropy = softmax_cross_entropy


class LogSoftmax(Function):
    def forward(self, x):
        self.y = _log_softmax(x, backend.get_array_module(x))
        return self.y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return gy - backend.mul(xp.exp(self.y), gy.sum(axis=1, keepdims=True))


def log_softmax(x: Tensor) -> Tensor:
    """Row-wise log-softmax of (N, K) logits."""
    if len(tuple(x.shape)) != 2:
        raise ValueError(f"log_softmax expects (N, K), got shape {tuple(x.shape)}")
    return LogSoftmax()(x)


def softmax(x: Tensor) -> Tensor:
    """Row-wise softmax of (N, K) logits (as a differentiable exp of log_softmax)."""
    return log_softmax(x).exp()
