"""Batch normalization over (N,) or (N, H, W) for each channel, PyTorch's conventions.

Training normalizes with the batch mean and the biased batch variance, and
updates the running statistics in place as
``running = (1 − momentum)·running + momentum·batch_stat`` with the *unbiased*
variance (PyTorch's convention). Evaluation uses the running statistics.
"""
from __future__ import annotations

import numbers
from typing import Callable

from minibasis import backend
from minibasis.autograd import Function, Tensor

__all__ = ["batch_norm"]


class BatchNorm(Function):
    """Every product (centering², scaling, running-stat updates, backward terms) is counted.

    Inputs: x, then the weight γ when ``has_weight`` and the bias β when ``has_bias`` (PyTorch
    accepts ``weight=None``/``bias=None``: no scaling, no shift).

    ``allreduce`` (training only): an in-place sum of a 1-D array over the processes that
    share the batch. Given, the statistics span every process's slice: the per-channel sums
    and the count are reduced for the mean, then Σ(x − μ)² for the variance (two passes, so
    float32 does not cancel as E[x²] − E[x]² would), and in backward Σg and Σg·x̂. None is
    one process. Every process must make the same calls (same model, same modes).
    """

    name = "batch_norm"

    def __init__(self, running_mean, running_var, training: bool, momentum: float, eps: float, *,
                 has_weight: bool = True, has_bias: bool = True, allreduce: Callable | None = None):
        self.running_mean, self.running_var = running_mean, running_var
        self.training, self.momentum, self.eps = training, momentum, eps
        self.has_weight, self.has_bias, self.allreduce = has_weight, has_bias, allreduce

    def _statistics(self, x, axes, shape):
        """(mean, centered x, biased var, count) over the batch (all processes' with ``allreduce``)."""
        xp = backend.get_array_module(x)
        count = x.size // x.shape[1]
        if self.allreduce is None:
            mean = x.mean(axis=axes)
        else:
            channels = x.shape[1]
            sums = xp.empty(channels + 1, dtype=x.dtype)
            sums[:channels] = x.sum(axis=axes)
            sums[channels] = count
            self.allreduce(sums)
            count = int(round(float(sums[channels])))
            if count < 2:
                raise ValueError(f"synchronized batch_norm in training needs more than one value per channel "
                                 f"over all ranks, got {count}")
            mean = sums[:channels] / count
        centered = x - mean.reshape(shape)
        squares = _channel_dot(centered, centered)  # Σ(x − μ)², no squared copy
        if self.allreduce is not None:
            squares = xp.ascontiguousarray(squares)
            self.allreduce(squares)
        return mean, centered, squares / count, count

    def forward(self, x, *affine):
        # Temporaries are written in place where this op owns them: one (N, C, H, W)
        # buffer in evaluation without a graph, two in training (x̂ is kept for backward).
        gamma = affine[0] if self.has_weight else None
        beta = affine[-1] if self.has_bias else None
        xp = backend.get_array_module(x)
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
        keep = any(self.needs_input_grad)
        if not self.training and not (self.has_weight and self.needs_input_grad[1]):
            return self._affine_forward(x, gamma, beta, shape, keep)
        if self.training:
            mean, centered, var, count = self._statistics(x, axes, shape)
            if self.running_mean is not None:
                update_running_stats(self.running_mean, self.running_var, mean, var, count, self.momentum)
        else:
            mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
            centered = x - mean.reshape(shape)
            count = None
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype)
        x_hat = backend.mul(centered, inv_std.reshape(shape), out=centered)
        if keep:
            self.x_hat, self.inv_std, self.gamma, self.axes, self.shape, self.count = \
                x_hat, inv_std, gamma, axes, shape, count
        if gamma is not None:
            y = backend.mul(x_hat, gamma.reshape(shape), out=None if keep else x_hat)  # y overwrites x̂ if unneeded
        else:
            y = x_hat.copy() if keep else x_hat  # the output must not alias the saved x̂
        if beta is not None:
            y += beta.reshape(shape)
        return y

    def _affine_forward(self, x, gamma, beta, shape, keep: bool):
        """Evaluation when γ needs no gradient: y = (x − μ)·s + β with s = γ/σ, three passes over x.

        The running statistics are constants here, so x̂ (which only γ's gradient reads) is
        never written: one product per element where the four-pass form (x − μ, ·σ⁻¹, ·γ,
        + β) makes two. s is a per-channel quotient, like σ⁻¹ in that form, so every
        counted product is per element and a count stays N times one image's.
        """
        xp = backend.get_array_module(x)
        mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
        sigma = xp.sqrt(var + self.eps)
        inv_std = (1.0 / sigma).astype(x.dtype)
        scale = inv_std if gamma is None else (gamma / sigma).astype(x.dtype)
        if keep:  # backward needs only the scale: dx = gy·γ/σ, dβ = Σ gy
            self.x_hat, self.inv_std, self.gamma, self.axes, self.shape, self.count = \
                None, inv_std, gamma, (0,) if x.ndim == 2 else (0, 2, 3), shape, None
        y = x - mean.reshape(shape)
        backend.mul(y, scale.reshape(shape), out=y)
        if beta is not None:
            y += beta.reshape(shape)
        return y

    def backward(self, gy):
        shape, axes = self.shape, self.axes
        need_x = self.needs_input_grad[0]
        need_gamma = self.has_weight and self.needs_input_grad[1]
        need_beta = self.has_bias and self.needs_input_grad[-1]
        g_beta = gy.sum(axis=axes) if need_beta else None
        g_gamma = None
        if need_gamma or (need_x and self.training):
            g_gamma = _channel_dot(gy, self.x_hat)  # Σ gy·x̂ per channel
        g_x = None
        if need_x:
            scale = self.inv_std if self.gamma is None else backend.mul(self.gamma, self.inv_std)
            scale = scale.reshape(shape)
            if self.training:
                # dx = γ/σ · (gy − mean(gy) − x̂ · mean(gy · x̂)): the batch statistics depend on x.
                # Computed in place in one new buffer (gy may be shared: it is only read).
                sum_gy = g_beta if g_beta is not None else gy.sum(axis=axes)
                sum_gy_xhat = g_gamma
                if self.allreduce is not None:
                    # The means run over every process's batch; dγ and dβ stay local sums (the
                    # data-parallel gradient all-reduce averages them like every other gradient).
                    channels = sum_gy.shape[0]
                    sums = backend.get_array_module(gy).empty(2 * channels, dtype=gy.dtype)
                    sums[:channels], sums[channels:] = sum_gy, sum_gy_xhat
                    self.allreduce(sums)
                    sum_gy, sum_gy_xhat = sums[:channels], sums[channels:]
                mean_gy, mean_gy_xhat = sum_gy / self.count, sum_gy_xhat / self.count
                g_x = backend.mul(self.x_hat, mean_gy_xhat.reshape(shape))
                backend.get_array_module(gy).subtract(gy, g_x, out=g_x)
                g_x -= mean_gy.reshape(shape)
                backend.mul(g_x, scale, out=g_x)
            else:
                g_x = backend.mul(gy, scale)
        grads = [g_x]
        if self.has_weight:
            grads.append(g_gamma if need_gamma else None)
        if self.has_bias:
            grads.append(g_beta)
        return tuple(grads)


def check_batch_norm_settings(momentum, eps, who: str = "batch_norm") -> None:
    """Raise unless ``momentum`` is a real number in [0, 1] and ``eps`` a real number > 0."""
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{who}: momentum must be in [0, 1], got {momentum!r}")
    if not eps > 0.0:  # eps <= 0 gives NaN or inf for a constant channel
        raise ValueError(f"{who}: eps must be > 0, got {eps!r}")


def check_batch_norm_inputs(x, weight, bias, running_mean, running_var, who: str = "batch_norm") -> None:
    """Raise ValueError unless x is (N, C) or (N, C, H, W) and each of the others is None or (C,)."""
    shape = tuple(x.shape)
    if len(shape) not in (2, 4):
        raise ValueError(f"{who} expects (N, C) or (N, C, H, W), got shape {shape}")
    channels = shape[1]
    for label, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"{who}: {label} must have shape ({channels},), got {tuple(t.shape)}")


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In place, with counted products: running ← (1 − momentum)·running + momentum·statistic.

    ``mean`` and ``var`` (C,) are the batch's statistics over ``count`` values per channel;
    the variance enters unbiased, var·count/(count − 1), as PyTorch keeps it.
    """
    unbiased = momentum * count / max(count - 1, 1)
    for running, stat, rate in ((running_mean, mean, momentum), (running_var, var, unbiased)):
        backend.mul(running, 1 - momentum, out=running)
        running += backend.mul(stat.astype(running.dtype), rate)


def _channel_dot(a, b):
    """Σ a·b over every axis but the channel axis 1 of (N, C) or (N, C, H, W) arrays → (C,).

    One counted product per element, like ``backend.mul(a, b).sum(...)``, but the
    einsum reduces as it multiplies, so no (N, C, H, W) temporary is written.
    """
    return backend.einsum("nc,nc->c" if a.ndim == 2 else "nchw,nchw->c", a, b)


def batch_norm(x: Tensor, running_mean, running_var, weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalize x (N, C) or (N, C, H, W) per channel; running stats are raw arrays updated in place.

    ``weight`` (γ) and ``bias`` (β), each (C,) or None (no scale, no shift), as in PyTorch.
    """
    check_batch_norm_settings(momentum, eps)
    check_batch_norm_inputs(x, weight, bias, running_mean, running_var)
    shape = tuple(x.shape)
    if training and shape[0] * (1 if len(shape) == 2 else shape[2] * shape[3]) < 2:
        raise ValueError(f"batch_norm in training needs more than one value per channel, got input {shape}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in evaluation needs running_mean and running_var")
    return batch_norm_function(running_mean, running_var, weight, bias, training, momentum, eps)(
        *affine_inputs(x, weight, bias))


def batch_norm_function(running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float,
                        allreduce: Callable | None = None) -> BatchNorm:
    """The :class:`BatchNorm` op for these settings; call it with :func:`affine_inputs`."""
    return BatchNorm(running_mean, running_var, training, momentum, eps,
                     has_weight=weight is not None, has_bias=bias is not None, allreduce=allreduce)


def affine_inputs(x, weight, bias) -> list:
    """x, then weight and bias where they are not None: the inputs :class:`BatchNorm` takes."""
    return [x] + [t for t in (weight, bias) if t is not None]
