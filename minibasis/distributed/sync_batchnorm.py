"""Batch normalization whose batch statistics span every rank's slice of the global batch.

Default data-parallel training keeps BatchNorm local (as PyTorch DDP does): each rank
normalizes its own B/W samples. That is a different model from one process with batch B.
:class:`SyncBatchNorm` normalizes with the statistics of the whole global batch instead, so
a W-rank run computes exactly what one process computes with ``BatchNorm2d`` and batch B.

Forward (training): one all-reduce of the per-channel sums and the sample count gives the
global mean; a second all-reduce of the per-channel sums of squared deviations from it gives the
global (biased) variance. Two passes rather than one all-reduce of Σx and Σx² because
``E[x²] − E[x]²`` cancels catastrophically in float32 when |mean| ≫ std; two passes compute
the same numbers as the single-process ``batch_norm``. Running statistics use the unbiased
variance over the global count, as ``BatchNorm2d`` would with batch B.

Backward: with x̂ the normalized input and g the upstream gradient,
``dx = γ/σ · (g − Σg/N − x̂ · Σ(g·x̂)/N)`` where the sums run over the *global* batch: one
all-reduce of the per-channel (Σg, Σg·x̂). The parameter gradients dγ = Σ g·x̂ and dβ = Σ g stay
local sums; the data-parallel gradient all-reduce averages them like every other gradient.
Evaluation uses the running statistics, with no communication.
"""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Function, Tensor
from minibasis.distributed.comm import Communicator, get_world
from minibasis.functions import batch_norm
from minibasis.functions.normalization import check_batch_norm_inputs, update_running_stats
from minibasis.nn.layers import BatchNorm1d, BatchNorm2d, _BatchNorm
from minibasis.nn.module import Module

__all__ = ["SyncBatchNorm", "sync_batch_norm", "convert_sync_batchnorm"]


class SyncBatchNormFunction(Function):
    """Training-mode batch norm over the global batch; products counted like ``batch_norm``'s."""

    name = "batch_norm"

    def __init__(self, running_mean, running_var, momentum: float, eps: float, comm: Communicator):
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.comm = momentum, eps, comm

    def forward(self, x, gamma, beta):
        xp = backend.get_array_module(x)
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
        channels = x.shape[1]
        sums = xp.empty(channels + 1, dtype=x.dtype)
        sums[:channels] = x.sum(axis=axes)
        sums[channels] = x.size // channels
        self.comm.allreduce_(sums, "sum")
        count = int(round(float(sums[channels])))
        if count < 2:
            raise ValueError(f"synchronized batch_norm in training needs more than one value per channel "
                             f"over all ranks, got {count}")
        mean = sums[:channels] / count
        centered = x - mean.reshape(shape)
        squares = backend.mul(centered, centered).sum(axis=axes)
        squares = xp.ascontiguousarray(squares)
        self.comm.allreduce_(squares, "sum")
        var = squares / count
        if self.running_mean is not None:
            update_running_stats(self.running_mean, self.running_var, mean, var, count, self.momentum)
        inv_std = (1.0 / xp.sqrt(var + self.eps)).astype(x.dtype)
        x_hat = backend.mul(centered, inv_std.reshape(shape))
        self.x_hat, self.inv_std, self.gamma, self.axes, self.shape, self.count = x_hat, inv_std, gamma, axes, shape, count
        y = backend.mul(x_hat, gamma.reshape(shape))
        y += beta.reshape(shape)
        return y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        shape, axes = self.shape, self.axes
        need_x, need_gamma, need_beta = self.needs_input_grad
        g_beta = gy.sum(axis=axes)
        g_gamma = backend.mul(gy, self.x_hat).sum(axis=axes)
        g_x = None
        if need_x:
            # needs_input_grad is the same on every rank (same model), so either all ranks make
            # this collective or none does.
            channels = g_beta.shape[0]
            sums = xp.empty(2 * channels, dtype=gy.dtype)
            sums[:channels], sums[channels:] = g_beta, g_gamma
            self.comm.allreduce_(sums, "sum")
            mean_gy, mean_gy_xhat = sums[:channels] / self.count, sums[channels:] / self.count
            scale = backend.mul(self.gamma, self.inv_std).reshape(shape)
            g_x = backend.mul(gy - mean_gy.reshape(shape) - backend.mul(self.x_hat, mean_gy_xhat.reshape(shape)), scale)
        return g_x, (g_gamma if need_gamma else None), (g_beta if need_beta else None)


def sync_batch_norm(x: Tensor, running_mean, running_var, weight: Tensor, bias: Tensor, training: bool,
                    momentum: float = 0.1, eps: float = 1e-5, comm: Communicator | None = None) -> Tensor:
    """``batch_norm`` with training statistics over all ranks of ``comm`` (default: the world).

    x: (N, C) or (N, C, H, W) with the same C on every rank; N may differ between ranks.
    Evaluation, or a world of one process, is plain ``batch_norm``.
    """
    comm = comm or get_world()
    if not training or comm.size == 1:
        return batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    check_batch_norm_inputs(x, weight, bias, running_mean, running_var, "sync_batch_norm")
    return SyncBatchNormFunction(running_mean, running_var, momentum, eps, comm)(x, weight, bias)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, H, W) with statistics over all ranks in training.

    Same parameters, buffers and ``state_dict`` keys as ``BatchNorm1d``/``BatchNorm2d``, so a
    checkpoint moves between the two freely. In a single process it is plain batch norm.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim not in (2, 4):
            raise ValueError(f"SyncBatchNorm expects a 2-D (N, C) or 4-D (N, C, H, W) input, got shape {x.shape}")
        stats = (self._buffers["running_mean"], self._buffers["running_var"]) if self.track_running_stats else (None, None)
        training = self.training or not self.track_running_stats
        return sync_batch_norm(x, stats[0], stats[1], self.weight, self.bias, training, self.momentum, self.eps)

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> "SyncBatchNorm":
        """A SyncBatchNorm that shares ``bn``'s Parameters (so optimizers holding them keep
        working) and buffers."""
        sync = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, track_running_stats=bn.track_running_stats)
        sync.weight, sync.bias = bn.weight, bn.bias
        for name, array in bn._buffers.items():
            sync._buffers[name] = array
        object.__setattr__(sync, "training", bn.training)
        return sync


def convert_sync_batchnorm(model: Module) -> Module:
    """Replace every ``BatchNorm1d``/``BatchNorm2d`` in ``model`` by a :class:`SyncBatchNorm`
    sharing its parameters and buffers (in place; returns the model, or the replacement when
    ``model`` itself is a batch norm). ``state_dict`` keys are unchanged."""
    if isinstance(model, (BatchNorm1d, BatchNorm2d)):
        return SyncBatchNorm.from_batchnorm(model)
    for _, module in list(model.named_modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, (BatchNorm1d, BatchNorm2d)) and not isinstance(child, SyncBatchNorm):
                module._modules[name] = SyncBatchNorm.from_batchnorm(child)
    return model
