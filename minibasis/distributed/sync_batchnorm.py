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

from minibasis.autograd import Tensor
from minibasis.distributed.comm import Communicator, get_world
from minibasis.functions import batch_norm
from minibasis.functions.normalization import affine_inputs, batch_norm_function, check_batch_norm_inputs
from minibasis.nn.layers import BatchNorm1d, BatchNorm2d
from minibasis.nn.module import Module

__all__ = ["SyncBatchNorm", "sync_batch_norm", "convert_sync_batchnorm"]


def sync_batch_norm(x: Tensor, running_mean, running_var, weight: Tensor | None, bias: Tensor | None,
                    training: bool, momentum: float = 0.1, eps: float = 1e-5,
                    comm: Communicator | None = None) -> Tensor:
    """``batch_norm`` with training statistics over all ranks of ``comm`` (default: the world).

    x: (N, C) or (N, C, H, W) with the same C on every rank; N may differ between ranks.
    Evaluation, or a world of one process, is plain ``batch_norm``. Otherwise it is the same
    ``BatchNorm`` op with the sums all-reduced over ``comm`` (same products, same counts).
    """
    comm = comm or get_world()
    if not training or comm.size == 1:
        return batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    check_batch_norm_inputs(x, weight, bias, running_mean, running_var, "sync_batch_norm")
    op = batch_norm_function(running_mean, running_var, weight, bias, True, momentum, eps,
                             allreduce=lambda array: comm.allreduce_(array, "sum"))
    return op(*affine_inputs(x, weight, bias))


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm over (N, C) or (N, C, H, W) with statistics over all ranks in training.

    Same parameters, buffers and ``state_dict`` keys as ``BatchNorm1d``/``BatchNorm2d``, so a
    checkpoint moves between the two freely. In a single process it is plain batch norm.
    (A subclass of ``BatchNorm2d`` for its parameters and buffers; it accepts 2-D inputs too.)
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim not in (2, 4):
            raise ValueError(f"SyncBatchNorm expects a 2-D (N, C) or 4-D (N, C, H, W) input, got shape {x.shape}")
        stats = (self._buffers["running_mean"], self._buffers["running_var"]) if self.track_running_stats else (None, None)
        training = self.training or not self.track_running_stats
        return sync_batch_norm(x, stats[0], stats[1], self.weight, self.bias, training, self.momentum, self.eps)

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm1d | BatchNorm2d) -> "SyncBatchNorm":
        """A SyncBatchNorm that shares ``bn``'s Parameters (so optimizers holding them keep
        working) and buffers."""
        sync = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, track_running_stats=bn.track_running_stats)
        sync.weight, sync.bias = bn.weight, bn.bias
        for name, array in bn.named_buffers():  # a batch norm has no children: plain names
            sync.register_buffer(name, array)
        return sync.train(bn.training)


def convert_sync_batchnorm(model: Module) -> Module:
    """Replace every ``BatchNorm1d``/``BatchNorm2d`` in ``model`` by a :class:`SyncBatchNorm`
    sharing its parameters and buffers (in place; returns the model, or the replacement when
    ``model`` itself is a batch norm). ``state_dict`` keys are unchanged."""
    if isinstance(model, (BatchNorm1d, BatchNorm2d)) and not isinstance(model, SyncBatchNorm):
        return SyncBatchNorm.from_batchnorm(model)
    for path, module in list(model.named_modules()):
        if path and isinstance(module, (BatchNorm1d, BatchNorm2d)) and not isinstance(module, SyncBatchNorm):
            model.set_submodule(path, SyncBatchNorm.from_batchnorm(module))
    return model
