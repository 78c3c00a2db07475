"""Fold eval-mode BatchNorm into the convolution before it, for inference.

In eval mode ``BatchNorm2d`` is a fixed per-channel affine map y ↦ a·y + c
(a = γ/√(running_var + ε), c = β − a·running_mean, see
:meth:`minibasis.nn.BatchNorm2d.inference_affine`). When it normalizes the output
of a ``Conv2d`` and nothing else reads that output, the map folds into the conv:
W'ₘ = aₘ·Wₘ, b'ₘ = aₘ·bₘ + cₘ. For a ``BasisConv2d`` it folds into the learnable
1×1 coefficient stage (coeffs'ₘ = aₘ·coeffsₘ), leaving the fixed basis as it is,
so the layer keeps its basis structure and multiplication count. The BatchNorm
becomes an ``Identity``: the fused model computes the same function with the BN
products (one per output element) gone.

Which BatchNorm follows which conv is read from one traced forward pass, not from
module order: the BN's input must be the very tensor the conv returned, and the
autograd graph must show that tensor consumed by the BN alone (a residual that
also reads the raw conv output keeps its BN).
"""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Tensor, enable_grad
from minibasis.compress import copy_module
from minibasis.nn import BasisConv2d, BatchNorm2d, Conv2d, Identity, Module, Parameter

__all__ = ["fuse_batch_norm"]


def _consumer_counts(outputs) -> dict[int, int]:
    """id(tensor) → number of graph ops that read it, over the graph behind ``outputs``."""
    counts: dict[int, int] = {}
    seen, stack = set(), [t.creator for t in outputs if getattr(t, "creator", None) is not None]
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for t in fn.inputs or ():
            counts[id(t)] = counts.get(id(t), 0) + 1
            if t.creator is not None:
                stack.append(t.creator)
    return counts


def _trace_pairs(model: Module, input_shape) -> list[tuple[str, str]]:
    """(conv path, BN path) pairs where the BN reads the conv's output and nothing else does."""
    conv_outputs: dict[int, str] = {}
    bn_inputs: list[tuple[str, Tensor]] = []
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, (Conv2d, BasisConv2d)):
            handles.append(module.register_forward_hook(
                lambda m, args, out, _path=path: conv_outputs.__setitem__(id(out), _path)))
        elif isinstance(module, BatchNorm2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, _path=path: bn_inputs.append((_path, args[0]))))
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None else backend.default_dtype
    xp = backend.get_array_module(first.data) if first is not None else backend.xp
    try:
        # An input that requires grad makes the forward build the graph the consumer check reads.
        with enable_grad():
            out = model(Tensor(xp.zeros(tuple(input_shape), dtype=dtype), requires_grad=True))
    finally:
        for handle in handles:
            handle.remove()
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    consumers = _consumer_counts(outputs)
    pairs = []
    for bn_path, x in bn_inputs:
        conv_path = conv_outputs.get(id(x))
        if conv_path is not None and consumers.get(id(x), 0) == 1:
            pairs.append((conv_path, bn_path))
    return pairs


def _fold(layer: Module, bn: BatchNorm2d) -> None:
    """Fold ``bn``'s eval-mode affine map into ``layer``'s output channels, in place."""
    scale, shift = bn.inference_affine()
    # a BasisConv's output channels are its coefficient rows; a conv's are its filters
    weight = layer.coeffs if isinstance(layer, BasisConv2d) else layer.weight
    dtype = weight.dtype
    weight.data = backend.mul(weight.data, scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(dtype)
    bias = shift if layer.bias is None else backend.mul(scale, layer.bias.data) + shift
    if layer.bias is None:
        layer.bias = Parameter(bias.astype(dtype))
    else:
        layer.bias.data = bias.astype(dtype)


def fuse_batch_norm(model: Module, input_shape=(1, 3, 32, 32), inplace: bool = False) -> Module:
    """``model`` with every foldable eval-mode BatchNorm2d folded into the conv before it.

    Args:
        model: in eval mode (the fold uses running statistics; a model in training mode
            normalizes by batch statistics and raises ValueError).
        input_shape: (N, C, H, W) of the one traced forward pass that finds conv → BN pairs
            (zeros; the zoo's CIFAR shape by default).
        inplace: fold into ``model`` itself instead of a copy.

    Returns the fused model (a copy unless ``inplace``), in eval mode. BatchNorms that do
    not directly follow a conv whose output only they read are left as they are.
    """
    if not isinstance(model, Module):
        raise TypeError(f"fuse_batch_norm needs a minibasis.nn.Module, got {type(model).__name__}")
    if any(m.training for m in model.modules()):
        raise ValueError("fuse_batch_norm folds BatchNorm running statistics: call model.eval() first")
    if not isinstance(inplace, bool):
        raise TypeError(f"fuse_batch_norm: inplace must be a bool, got {inplace!r}")
    fused = model if inplace else copy_module(model)
    for conv_path, bn_path in _trace_pairs(fused, input_shape):
        bn = fused.get_submodule(bn_path)
        if not bn.track_running_stats:
            continue  # normalizes by batch statistics even in eval mode: nothing fixed to fold
        _fold(fused.get_submodule(conv_path), bn)
        fused.set_submodule(bn_path, Identity())
    fused.zero_grad()
    return fused.eval()
