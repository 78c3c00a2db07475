"""Softmax cross-entropy and the soft-target KL divergence, computed through a stable log-sum-exp."""
from __future__ import annotations

import numbers

from minibasis import backend
from minibasis.autograd import Function, Tensor
from minibasis.autograd.ops import check_axis

__all__ = ["softmax_cross_entropy", "cross_entropy", "log_softmax", "softmax", "soft_target_kl"]


def _log_softmax(x, xp, axis: int = 1):
    shifted = x - x.max(axis=axis, keepdims=True)  # exp never overflows: the largest term is exp(0)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


REDUCTIONS = ("mean", "sum", "none")


class SoftmaxCrossEntropy(Function):
    """−log softmax(x)[label] per row, mean, summed or kept ("none").

    With label smoothing ε over K classes the target is (1 − ε)·onehot + ε/K, so a row's
    loss is −(1 − ε)·log p[label] − (ε/K)·Σ_k log p_k (PyTorch's definition). Backward:
    (softmax − target)·gy (÷N for the mean).
    """

    name = "softmax_cross_entropy"

    def __init__(self, labels, reduction: str, label_smoothing: float = 0.0):
        self.labels, self.reduction, self.smoothing = labels, reduction, label_smoothing

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        log_p = _log_softmax(logits, xp)
        self.log_p = log_p
        rows = xp.arange(logits.shape[0])
        picked = -log_p[rows, self.labels]
        if self.smoothing:
            k = logits.shape[1]
            picked = (backend.mul(picked, logits.dtype.type(1 - self.smoothing))
                      - backend.mul(log_p.sum(axis=1), logits.dtype.type(self.smoothing / k)))
        if self.reduction == "none":
            return picked
        return picked.mean() if self.reduction == "mean" else picked.sum()

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        grad = xp.exp(self.log_p)
        if self.smoothing:
            grad -= self.smoothing / grad.shape[1]
        grad[xp.arange(grad.shape[0]), self.labels] -= 1 - self.smoothing
        if self.reduction == "none":
            scale = gy[:, None]
        else:
            scale = gy / grad.shape[0] if self.reduction == "mean" else gy
        return backend.mul(grad, scale.astype(grad.dtype))


def softmax_cross_entropy(logits: Tensor, labels, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """logits (N, K) float, labels (N,) integers in [0, K) → scalar loss ((N,) for reduction "none")."""
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
    check_loss_settings(reduction, label_smoothing)
    return SoftmaxCrossEntropy(labels, reduction, float(label_smoothing))(logits)


def check_loss_settings(reduction, label_smoothing) -> None:
    """Raise unless ``reduction`` is one of :data:`REDUCTIONS` and ``label_smoothing`` a number in [0, 1]."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


cross_entropy = softmax_cross_entropy


class LogSoftmax(Function):
    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, x):
        self.y = _log_softmax(x, backend.get_array_module(x), self.axis)
        return self.y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return gy - backend.mul(xp.exp(self.y), gy.sum(axis=self.axis, keepdims=True))


def log_softmax(x: Tensor, dim: int = 1) -> Tensor:
    """Log-softmax along axis ``dim`` (the classes of (N, K) logits by default)."""
    ndim = len(tuple(x.shape))
    if ndim == 0:
        raise ValueError("log_softmax needs a tensor with at least one axis, got a 0-d tensor")
    return LogSoftmax(check_axis(dim, ndim, "log_softmax"))(x)


def softmax(x: Tensor, dim: int = 1) -> Tensor:
    """Softmax along axis ``dim`` (as a differentiable exp of log_softmax)."""
    return log_softmax(x, dim).exp()


class SoftTargetKL(Function):
    """Batch mean of KL(p ‖ q), p = softmax(targets/T) (constant), q = softmax(logits/T).

    Forward: Σ_{n,k} p_nk (log p_nk − log q_nk) / N. Backward: (q − p)·gy / (T·N).
    """

    name = "soft_target_kl"

    def __init__(self, target_log_p, temperature: float):
        self.target_log_p, self.temperature = target_log_p, temperature

    def forward(self, logits):
        xp = backend.get_array_module(logits)
        log_q = _log_softmax(logits / logits.dtype.type(self.temperature), xp)
        self.q, self.p = xp.exp(log_q), xp.exp(self.target_log_p)
        return backend.mul(self.p, self.target_log_p - log_q).sum() / logits.shape[0]

    def backward(self, gy):
        scale = gy / (self.temperature * self.q.shape[0])
        return backend.mul(self.q - self.p, scale.astype(self.q.dtype))


def soft_target_kl(logits: Tensor, target_logits, temperature: float = 1.0) -> Tensor:
    """KL(softmax(target_logits/T) ‖ softmax(logits/T)), averaged over the batch → scalar.

    ``logits`` (N, K) is differentiated; ``target_logits`` (N, K) (a Tensor or array, e.g. a
    teacher's outputs) is a constant. This is PyTorch's
    ``kl_div(log_softmax(logits/T), softmax(target_logits/T), reduction="batchmean")``; its
    gradient with respect to ``logits`` is (softmax(logits/T) − softmax(target_logits/T)) / (T·N).
    """
    shape = tuple(logits.shape)
    if len(shape) != 2:
        raise ValueError(f"soft_target_kl expects logits of shape (N, K), got {shape}")
    targets = target_logits.data if isinstance(target_logits, Tensor) else target_logits
    if tuple(targets.shape) != shape:
        raise ValueError(f"soft_target_kl: target_logits must have the logits' shape {shape}, "
                         f"got {tuple(targets.shape)}")
    if isinstance(temperature, bool) or not float(temperature) > 0:
        raise ValueError(f"soft_target_kl: temperature must be a positive number, got {temperature!r}")
    xp = backend.get_array_module(logits.data if isinstance(logits, Tensor) else logits)
    dtype = (logits.data if isinstance(logits, Tensor) else logits).dtype
    targets = xp.asarray(targets, dtype=dtype)
    target_log_p = _log_softmax(targets / dtype.type(temperature), xp)
    return SoftTargetKL(target_log_p, float(temperature))(logits)
