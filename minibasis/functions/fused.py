"""Inference-only kernels on raw arrays: a convolution with its epilogue fused, chunk by chunk.

A deployed network (:func:`minibasis.deploy`) runs "conv (BatchNorm folded) →
+ bias → + residual → ReLU" as ONE pass over each chunk of the batch: the
chunk's conv is computed into its slice of the output buffer, and while that
slice is still in cache the bias, the residual and the ReLU are applied to it in
place. The unfused network makes a separate single-threaded pass over the whole
activation for each of them (a BatchNorm, a ReLU, an add: each reads and writes
N·M·Ho·Wo values from memory). A BasisConv runs both of its stages on the chunk:
the basis stage into a chunk-sized (n, Q, Ho, Wo) intermediate, at once the 1×1
stage from it into the output slice, so the intermediate never leaves cache.

Nothing here builds an autograd graph or keeps anything for a backward pass: the
functions take and return arrays, not Tensors. In-place work touches only the
output buffer this module allocated itself (or an ``out`` the caller hands over
for that purpose); inputs and residuals are only read.

The chunk's conv takes the same path as :class:`minibasis.functions.conv.Conv2dFunction`'s
forward (pointwise batched GEMM, kn2row, depthwise shifts or im2col + GEMM), with the
same helpers, so it multiplies exactly as often: every product is recorded under op
``conv2d`` (a convolution), the linear head's under ``linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

from minibasis import backend, counting, parallel
# chunk settings are read from their modules at call time (minibasis.chunk_sizes changes them)
from minibasis.functions import basic as basic_module, conv as conv_module
from minibasis.functions.conv import (_channels_first, _chunk_size, _depthwise_same, _four, _group_matmul,
                                      _kn2row_forward, conv_output_shape, conv_path, im2col)

__all__ = ["ConvGeometry", "Residual", "fused_conv2d", "avg_pool", "global_avg_pool", "linear_inference", "relu", "relu_inplace"]


@dataclass(frozen=True)
class ConvGeometry:
    """Stride (sh, sw), explicit padding (top, bottom, left, right), dilation (dh, dw) and groups of a conv."""

    stride: tuple
    padding: tuple
    dilation: tuple = (1, 1)
    groups: int = 1

    def output_hw(self, h: int, w: int, kernel: tuple) -> tuple[int, int]:
        return conv_output_shape(h, w, kernel, self.stride, self.padding, self.dilation)


@dataclass(frozen=True)
class Residual:
    """What a fused conv adds to its output before the ReLU: ``source[:, :, ::stride, ::stride]`` added to
    output channels ``channel_offset … channel_offset + C_source`` (the rest get nothing).

    An identity shortcut is (x, 0, 1); a ResNet's option-A shortcut (subsample, zero-pad the new channels)
    is (x, pad_before, 2) with no padded copy ever built; a conv shortcut is its output with (0, 1).
    """

    source: object
    channel_offset: int = 0
    stride: int = 1


def _written_view(out, shape):
    """``out`` reshaped to ``shape`` as a view that writes through to ``out``, or None where a reshape would copy
    (``out`` may be a channel slice of a larger buffer)."""
    view = out.reshape(shape)
    return view if backend.get_array_module(out).may_share_memory(view, out) else None


def _matmul_into(a, b, out, shape) -> None:
    """``out`` ← a @ b, the product having ``shape`` (a reshape of ``out``): written in place where it can be."""
    view = _written_view(out, shape)
    if view is not None:
        _group_matmul(a, b, out=view)
    else:
        out[...] = _group_matmul(a, b).reshape(out.shape)


def _conv_chunk_into(x, weight, geometry: ConvGeometry, out) -> None:
    """out (n, M, Ho, Wo) ← conv of x (n, C, H, W) with ``weight`` (M, C/g, kh, kw), no bias.

    The path of Conv2dFunction.forward's chunk for the same shapes (:func:`~minibasis.functions.conv.conv_path`).
    """
    n, c, h, w = x.shape
    m, _, kh, kw = weight.shape
    g, kernel = geometry.groups, (kh, kw)
    args = (kernel, geometry.stride, geometry.padding, geometry.dilation)
    ho, wo = out.shape[2:]
    wg = weight.reshape(g, m // g, -1)
    path = conv_path(m, c, *args, g)
    if path == "pointwise":
        _matmul_into(wg, x.reshape(n, g, c // g, h * w), out, (n, g, m // g, ho * wo))
    elif path == "kn2row":
        _kn2row_forward(x, weight, out)
    elif path == "depthwise-same":
        total = _depthwise_same(out.shape, weight.reshape(c, kh, kw), _channels_first(x), adjoint=False)
        out[...] = total.reshape(m, n, ho, wo).transpose(1, 0, 2, 3)
    else:
        col = im2col(x, *args)
        product = _group_matmul(wg, col.reshape(g, -1, col.shape[1]))  # (g, M/g, n·P)
        out[...] = product.reshape(m, n, ho, wo).transpose(1, 0, 2, 3)


def _per_image_bytes(c: int, h: int, w: int, weight, geometry: ConvGeometry, ho: int, wo: int) -> int:
    """Working bytes of one image of a conv's chunk (the quantity Conv2dFunction sizes its chunks by)."""
    m, _, kh, kw = weight.shape
    itemsize = weight.dtype.itemsize
    path = conv_path(m, c, (kh, kw), geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
    if path == "pointwise":
        return (c + m) * h * w * itemsize
    if path == "kn2row":
        return kh * kw * m * ho * wo * itemsize
    return c * kh * kw * ho * wo * itemsize


def relu_inplace(a) -> None:
    """a ← max(a, 0), in place (the caller owns ``a``)."""
    backend.get_array_module(a).maximum(a, 0, out=a)


def relu(x, inplace: bool = False):
    """max(x, 0) as an op of its own (timed as an activation): into ``x`` when ``inplace``, else a new array."""
    with counting.op_scope("relu", False, "forward"):
        if inplace:
            relu_inplace(x)
            return x
        return backend.get_array_module(x).maximum(x, 0)


def fused_conv2d(x, weight, bias=None, geometry: ConvGeometry | None = None, *, coeffs=None,
                 residual: Residual | None = None, relu: bool = False, out=None):
    """relu(conv(x, weight) [→ 1×1 coeffs] + bias + residual), chunk by chunk on the engine threads.

    Args:
        x: (N, C, H, W) input array (only read).
        weight: (M, C/g, kh, kw) filters; for a BasisConv the basis (Q, C, kh, kw).
        bias: (M,) or None (BatchNorm folded in already).
        geometry: stride, explicit padding, dilation, groups (default: stride 1, no padding).
        coeffs: (M, Q) for a BasisConv: the 1×1 stage applied to each chunk's basis maps while
            they are in cache; None for a plain conv.
        residual: added before the ReLU (see :class:`Residual`); only read.
        relu: apply max(·, 0).
        out: (N, M, Ho, Wo) array (a view, e.g. a channel slice of a concatenation buffer, is fine)
            to write into; None allocates one.

    Returns ``out``. Records the conv's products (and the 1×1 stage's) under op ``conv2d``.
    """
    geometry = geometry or ConvGeometry((1, 1), (0, 0, 0, 0))
    geometry = ConvGeometry(tuple(geometry.stride), _four(geometry.padding), tuple(geometry.dilation), geometry.groups)
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    kernel = tuple(weight.shape[2:])
    ho, wo = geometry.output_hw(h, w, kernel)
    q = weight.shape[0]
    m = q if coeffs is None else coeffs.shape[0]
    if out is None:
        out = xp.empty((n, m, ho, wo), dtype=x.dtype)
    per_image = _per_image_bytes(c, h, w, weight, geometry, ho, wo)
    if coeffs is not None:
        per_image += (q + m) * ho * wo * x.dtype.itemsize  # the chunk's intermediate and output
    pointwise_only = coeffs is None and conv_path(q, c, kernel, geometry.stride, geometry.padding) == "pointwise"
    if pointwise_only:
        workers = parallel.workers_for(x, weight) if n * per_image >= conv_module.PARALLEL_MIN_BYTES else 1
        step = parallel.chunk_step(n, per_image, conv_module.POINTWISE_CHUNK_BYTES)
    else:
        step = _chunk_size(n, per_image)
        workers = conv_module._workers(x, weight, n, per_image, step)
    bias4 = None if bias is None else bias.reshape(1, m, 1, 1)

    def chunk(start: int, stop: int) -> None:
        target = out[start:stop]
        if coeffs is None:
            _conv_chunk_into(x[start:stop], weight, geometry, target)
        else:
            maps = xp.empty((stop - start, q, ho, wo), dtype=x.dtype)
            _conv_chunk_into(x[start:stop], weight, geometry, maps)
            _matmul_into(coeffs, maps.reshape(stop - start, q, ho * wo), target, (stop - start, m, ho * wo))
        if bias4 is not None:
            target += bias4
        if residual is not None:
            s, first = residual.stride, residual.channel_offset
            source = residual.source[start:stop, :, ::s, ::s]
            target[:, first:first + source.shape[1]] += source
        if relu:
            relu_inplace(target)

    with counting.op_scope("conv2d", True, "forward"):
        parallel.run_chunks(chunk, parallel.chunk_ranges(n, step), workers)
    return out


def global_avg_pool(x):
    """(N, C, H, W) → (N, C), the mean over each map, in blocks of images on the engine threads (as many
    images per block as a linear layer's rows, ``functions.basic.LINEAR_BLOCK_ROWS``)."""
    n, c = x.shape[:2]
    out = backend.get_array_module(x).empty((n, c), dtype=x.dtype)

    def chunk(start: int, stop: int) -> None:
        x[start:stop].mean(axis=(2, 3), out=out[start:stop])

    with counting.op_scope("globalavgpool2d", False, "forward"):
        parallel.run_chunks(chunk, parallel.chunk_ranges(n, basic_module.LINEAR_BLOCK_ROWS), parallel.workers_for(x))
    return out


def avg_pool(x, kernel: int):
    """(N, C, H, W) → (N, C, H/k, W/k): the mean of each k×k tile (stride k, no padding; H and W multiples of k),
    in blocks of images on the engine threads (as :func:`global_avg_pool`)."""
    n, c, h, w = x.shape
    if h % kernel or w % kernel:
        raise ValueError(f"avg_pool: the {h}x{w} maps do not split into {kernel}x{kernel} tiles")
    out = backend.get_array_module(x).empty((n, c, h // kernel, w // kernel), dtype=x.dtype)

    def chunk(start: int, stop: int) -> None:
        tiles = x[start:stop].reshape(stop - start, c, h // kernel, kernel, w // kernel, kernel)
        tiles.mean(axis=(3, 5), out=out[start:stop])

    with counting.op_scope("avgpool2d", False, "forward"):
        parallel.run_chunks(chunk, parallel.chunk_ranges(n, basic_module.LINEAR_BLOCK_ROWS), parallel.workers_for(x))
    return out


def linear_inference(x, weight, bias=None, relu: bool = False):
    """relu(x Wᵀ + b) for x (N, in), weight (out, in), in blocks of ``LINEAR_BLOCK_ROWS`` rows on the engine
    threads (as ``functions.linear``).

    Records N·in·out products under op ``linear``.
    """
    n = x.shape[0]
    out = backend.get_array_module(x).empty((n, weight.shape[0]), dtype=x.dtype)

    def chunk(start: int, stop: int) -> None:
        target = out[start:stop]
        backend.matmul(x[start:stop], weight.T, out=target)
        if bias is not None:
            target += bias
        if relu:
            relu_inplace(target)

    with counting.op_scope("linear", False, "forward"):
        parallel.run_chunks(chunk, parallel.chunk_ranges(n, basic_module.LINEAR_BLOCK_ROWS), parallel.workers_for(x, weight))
    return out
