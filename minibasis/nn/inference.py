"""Inference-only modules: the building blocks of a deployed network (:func:`minibasis.deploy`).

They compute on raw arrays, not Tensors: every ``forward`` takes and returns
arrays and calls the kernels of :mod:`minibasis.functions.fused`, which build no
autograd graph. Their weights are buffers, not Parameters, so an optimizer finds
nothing to update, and ``train()`` raises. A module that is not one of these (a
layer the deployment does not know, kept as it is) runs through its own forward
under ``no_grad`` inside an :class:`InferenceSequence`.
"""
from __future__ import annotations

from minibasis import backend
from minibasis import functions as F
from minibasis.autograd import Tensor, no_grad
from minibasis.functions.conv import resolve_padding
from minibasis.functions.fused import (ConvGeometry, Residual, avg_pool, fused_conv2d, global_avg_pool,
                                       linear_inference, relu)
from minibasis.nn.basisconv import BasisConv2d
from minibasis.nn.layers import Conv2d, Linear
from minibasis.nn.module import Module

__all__ = ["InferenceModule", "InferenceError", "FusedConv2d", "InferenceLinear", "InferenceSequence",
           "GlobalAvgPool", "AvgPool", "Flatten", "ReLUStep", "ReLUAfter", "run_array", "Residual"]


class InferenceError(RuntimeError):
    """Training or differentiating a deployed (inference-only) model."""


class InferenceModule(Module):
    """Base of the deployed modules: forward on arrays, no parameters, no training mode."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "training", False)

    def train(self, mode: bool = True) -> "Module":
        if mode:
            raise InferenceError(f"{type(self).__name__} is part of a deployed, inference-only model: it cannot "
                                 "be trained (train or fine-tune the source model, then deploy it again)")
        return super().train(False)


def run_array(module: Module, x):
    """``module(x)`` on array ``x``: an inference module directly, any other through Tensors without a graph."""
    if isinstance(module, InferenceModule):
        return module(x)
    with no_grad():
        return module(Tensor(x)).data


class FusedConv2d(InferenceModule):
    """relu(conv(x) + bias + residual) in one chunked pass; a BasisConv's two stages in the same pass.

    Built from a ``Conv2d`` or a ``BasisConv2d`` whose following BatchNorm
    is already folded in (:func:`minibasis.fuse_batch_norm`). Attributes as the source layer's
    (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``groups``, ``num_basis`` (None for a plain conv), ``energy``), so the measurement
    (:func:`minibasis.measure.profile`) reads it as it reads the source layer.

    Buffers: ``weight`` (M, C/g, kh, kw) for a conv, ``basis`` (Q, C, kh, kw) and ``coeffs`` (M, Q)
    for a BasisConv (its basis bias and intermediate BatchNorm folded into ``coeffs`` and ``bias``:
    :meth:`BasisConv2d.folded_coefficients`), ``bias`` (M,) when there is one.
    """

    def __init__(self, layer: Module, relu: bool = False):
        super().__init__()
        if not isinstance(layer, (Conv2d, BasisConv2d)):
            raise TypeError(f"FusedConv2d needs a Conv2d or BasisConv2d, got {type(layer).__name__}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, getattr(layer, "groups", 1)
        self.relu = bool(relu)
        self.geometry = ConvGeometry(tuple(layer.stride), resolve_padding(layer.padding, layer.kernel_size,
                                                                          layer.stride, layer.dilation),
                                     tuple(layer.dilation), self.groups)
        xp = backend.get_array_module(next(iter(layer.state_dict().values())))
        if isinstance(layer, BasisConv2d):
            self.num_basis, self.energy = layer.num_basis, layer.energy
            coeffs, bias = layer.folded_coefficients()
            self.register_buffer("basis", xp.ascontiguousarray(layer.basis_filters()).copy())
            self.register_buffer("coeffs", xp.ascontiguousarray(coeffs))
        else:
            self.num_basis, self.energy = None, None
            bias = None if layer.bias is None else layer.bias.data
            self.register_buffer("weight", xp.ascontiguousarray(layer.weight.data).copy())
        if bias is not None:
            self.register_buffer("bias", xp.ascontiguousarray(bias).copy())

    def forward(self, x, residual: Residual | None = None, out=None):
        """x (N, C, H, W) → (N, M, Ho, Wo), written into ``out`` when given."""
        bias = self._buffers.get("bias")
        if self.num_basis is None:
            return fused_conv2d(x, self._buffers["weight"], bias, self.geometry, residual=residual, relu=self.relu,
                                out=out)
        return fused_conv2d(x, self._buffers["basis"], bias, self.geometry, coeffs=self._buffers["coeffs"],
                            residual=residual, relu=self.relu, out=out)

    def extra_repr(self) -> str:
        kind = "conv" if self.num_basis is None else f"basisconv Q={self.num_basis}"
        return (f"{self.in_channels}, {self.out_channels}, {kind}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, bias={'bias' in self._buffers}, relu={self.relu}")


class InferenceLinear(InferenceModule):
    """relu(x Wᵀ + b) (ReLU optional) on the engine threads; buffers ``weight`` (out, in), ``bias``."""

    def __init__(self, layer: Linear, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.relu = layer.in_features, layer.out_features, bool(relu)
        self.register_buffer("weight", layer.weight.data.copy())
        if layer.bias is not None:
            self.register_buffer("bias", layer.bias.data.copy())

    def forward(self, x):
        return linear_inference(x, self._buffers["weight"], self._buffers.get("bias"), relu=self.relu)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, relu={self.relu}"


class GlobalAvgPool(InferenceModule):
    """(N, C, H, W) → (N, C): the mean of each map (global pooling and flattening in one)."""

    def forward(self, x):
        return global_avg_pool(x)


class AvgPool(InferenceModule):
    """k×k average pooling with stride k and no padding: chunked on the engine threads where the maps split
    into k×k tiles, else the engine's ``avg_pool2d`` (which drops the incomplete last row and column)."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = int(kernel)

    def forward(self, x):
        if x.shape[2] % self.kernel or x.shape[3] % self.kernel:
            with no_grad():
                return F.avg_pool2d(Tensor(x), self.kernel).data
        return avg_pool(x, self.kernel)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class Flatten(InferenceModule):
    """(N, ...) → (N, rest): a view of a contiguous array."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class ReLUStep(InferenceModule):
    """max(x, 0) into a new array (the input may be read elsewhere)."""

    def forward(self, x):
        return relu(x)


class ReLUAfter(InferenceModule):
    """A kept module (run without a graph) followed by a ReLU applied in place on the array it just returned.

    Only for modules that return a new array (a BatchNorm, a pool): nothing else can read it yet.
    """

    def __init__(self, module: Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        y = run_array(self.module, x)
        if y is x:
            raise InferenceError(f"{type(self.module).__name__} returned its input: an in-place ReLU would "
                                 "change an array that others read")
        return relu(y, inplace=True)


class InferenceSequence(InferenceModule):
    """Named steps run in order (children keep the source model's names, so counts keep its layer paths).

    A step that is not an :class:`InferenceModule` is a module kept as it is: it runs through its own
    forward under ``no_grad`` (:func:`run_array`).
    """

    def __init__(self, steps):
        super().__init__()
        for name, step in steps:
            self.add_module(name, step)

    def forward(self, x):
        for step in self._modules.values():
            x = run_array(step, x)
        return x
