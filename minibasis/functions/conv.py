"""2-D convolution by im2col + GEMM, backward by GEMM + col2im.

Layouts (NCHW, PyTorch's): x (N, C, H, W), weight (M, C/g, kh, kw), bias (M,),
output (N, M, Ho, Wo) with Ho = (H + top + bottom − dh·(kh − 1) − 1) // sh + 1
(padding may be asymmetric: PyTorch's "same" with an even d·(k − 1) total).

Groups and dilation. The columns of a grouped conv (g groups) are exactly those
of the ungrouped conv on the same input: rows in (C, kh, kw) order run over the
groups first, so ``col.reshape(g, D/g, n·P)`` is a free view with D/g =
(C/g)·kh·kw, and the chunk's conv is one batched GEMM ``(g, M/g, D/g) @
(g, D/g, n·P)`` (no loop over groups, no per-group copy; a depthwise conv is
g = C = M with M/g = 1). Dilation only spaces the kernel offsets of the strided
view (and of col2im's window additions). The "same" plane-shift path therefore
serves grouped convs too; kn2row stays for groups = 1. A "same" depthwise conv
(g = C = M) builds no column buffer at all: per kernel offset one counted product
of the tap with the whole channel-first input, added shifted into the output (the
input gradient the same way back; the weight gradient from one im2col row at a
time), the same C·n·H·W products per offset as its batched GEMM.

The column buffer of a chunk of n images is (D, n·P) with D = C·kh·kw rows in
(C, kh, kw) order (the order of ``weight.reshape(M, D)`` columns, which
``minibasis.basis`` relies on) and n·P columns in (image, Ho, Wo) order,
P = Ho·Wo. It is built by copies only: for a "same" conv (below) by kh·kw
shifted runs of the channel-first chunk, one per channel and offset, with the
entries that fall on the padding zeroed; otherwise by copying a 6-D strided view
of the padded chunk once. The chunk's convolution is one large GEMM
``W (M, D) @ col (D, n·P)`` (one big GEMM runs several times faster than n
small ones), whose (M, n, P) result is transposed into the NCHW output. A 1×1 stride-1 unpadded conv needs no column
buffer: ``x.reshape(N, C, H·W)`` already holds one (C, P) matrix per image.

A stride-1 "same" conv (odd kernel, padding (k−1)/2, so Ho·Wo = H·W) with fewer
output than input channels (M < ``KN2ROW_CHANNEL_RATIO``·C, e.g. the basis stage
of a BasisConv) runs forward as kn2row instead: one GEMM
``W' (kh·kw·M, C) @ x' (C, n·H·W)`` over the channel-first input (no column
buffer), then the kh·kw shifted (M, n, H, W) slices of the product are summed
into the output. Its traffic grows with M where im2col's grows with C·kh·kw, so
a conv with few output channels costs proportionally less, as its
multiplications do. It multiplies kh·kw·M·C·n·H·W = n·M·D·P times, exactly
im2col's count (H·W = P); the products of zero padding are skipped and those
that land outside the output are discarded instead.

Backward, chunk by chunk: gyᵀ (M, n·P) (one copy of the gradient), the weight
gradient gyᵀ @ colᵀ accumulated over chunks, and the input gradient
col2im(Wᵀ @ gyᵀ), col2im summing over the kh·kw kernel offsets with shifted-run
or strided-window slice additions (no scatter, no ``add.at``). A conv that ran
forward by kn2row gets its input gradient the mirrored way: as the "same" conv of
gy with the kernel transposed and flipped, whose columns (kh·kw·M, n·P) shrink
with M where col2im's (kh·kw·C, n·P) do not; the products are the same n·D·M·P.

Chunks: the batch always goes through in chunks of about ``CHUNK_TARGET_BYTES``
of columns (a few MiB), so each chunk's columns are still in cache when the
GEMM reads them; backward rebuilds a chunk's columns from x rather than keeping
the whole batch's (rebuilding from cache is cheaper than a round trip through
memory, and training memory stays small). ``IM2COL_BUDGET_BYTES`` caps the
chunk (a hard memory bound); both settings change speed and memory, never
results beyond float rounding of the order of summation. With
``minibasis.set_num_threads(n)`` (default 2 on a 2-core machine) the chunks of a
conv with at least ``PARALLEL_MIN_BYTES`` of columns run on n threads
(:mod:`minibasis.parallel`; fewer where n chunks' columns would exceed the budget),
the weight-gradient parts summed in chunk order; a smaller conv stays serial. The
chunks are sized from the shapes alone and every GEMM runs on a single-threaded
BLAS, so the results are the same bits on any number of threads.

Multiplications recorded (all under op ``conv2d``, which counts as convolution):

* forward: N·M·D·P (the GEMMs, over all chunks), D = (C/g)·kh·kw the filter length;
* backward: N·M·P·D for the weight gradient when the weight requires grad, plus
  N·D·M·P for the input gradient when the input requires grad. So a backward
  that needs both costs exactly twice the forward; the bias gradient is a sum.

Without a graph (``no_grad``) nothing is kept for backward.

Paths. :func:`conv_path` names the way a conv goes (``CONV_PATHS``): "pointwise"
(1×1, stride 1, unpadded: GEMMs on a view of x), "kn2row", "depthwise-same" (the
shifted products above), "same-runs" (im2col by shifted runs), "strided" and
"im2col" (im2col by the strided view; "strided": a stride above 1); a grouped conv
takes the same paths as an ungrouped one. Inside ``with trace_paths() as paths:``
every conv2d forward appends its path to ``paths``, so a check can say which paths it ran.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple

from minibasis import backend, parallel
from minibasis.autograd import Function, Tensor
from minibasis.checks import ArgumentTypeError, non_negative_pair, positive_int, positive_pair

__all__ = ["conv2d", "Conv2dFunction", "im2col", "col2im", "conv_output_shape", "check_padding", "resolve_padding",
           "set_im2col_budget", "conv_path", "trace_paths", "CONV_PATHS",
           "IM2COL_BUDGET_BYTES", "CHUNK_TARGET_BYTES", "KN2ROW_CHANNEL_RATIO", "PARALLEL_MIN_BYTES",
           "POINTWISE_CHUNK_BYTES"]

#: Largest column buffer built at once (bytes): a hard cap on im2col memory.
IM2COL_BUDGET_BYTES = 256 * 2 ** 20
#: Preferred column-buffer size of one chunk (bytes), small enough to stay in cache with one chunk per
#: worker alive (a ResNet-20 training step at batch 128 measured 7-17 % faster than with 8 MiB, on 1 and
#: 2 engine threads, alternating in one process on a busy 2-core machine).
CHUNK_TARGET_BYTES = 4 * 2 ** 20
#: Convs with fewer column bytes over the whole batch run their chunks serially (minibasis.parallel).
PARALLEL_MIN_BYTES = 2 ** 20
#: A pointwise (1×1) conv's chunk: about this many bytes of input and output.
POINTWISE_CHUNK_BYTES = 4 * 2 ** 20
#: Forward by kn2row when a "same" conv has M < KN2ROW_CHANNEL_RATIO · C (measured crossover).
KN2ROW_CHANNEL_RATIO = 0.75


#: The forward paths of a conv (see the module docstring), in the order :func:`conv_path` tries them.
CONV_PATHS = ("pointwise", "kn2row", "depthwise-same", "same-runs", "strided", "im2col")

_path_traces: list[list[str]] = []  # the lists of the open trace_paths() blocks


@contextlib.contextmanager
def trace_paths() -> Iterator[list[str]]:
    """Yields a list that receives the path (``CONV_PATHS``) of every conv2d forward run inside the block."""
    paths: list[str] = []
    _path_traces.append(paths)
    try:
        yield paths
    finally:
        _path_traces.remove(paths)


def set_im2col_budget(num_bytes: int) -> int:
    """Set the column-buffer budget in bytes; returns the previous value."""
    global IM2COL_BUDGET_BYTES
    if int(num_bytes) <= 0:
        raise ValueError(f"im2col budget must be a positive number of bytes, got {num_bytes}")
    previous, IM2COL_BUDGET_BYTES = IM2COL_BUDGET_BYTES, int(num_bytes)
    return previous


def _four(padding) -> tuple[int, int, int, int]:
    """(ph, pw) → (top, bottom, left, right); a 4-tuple is returned as it is."""
    return (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else tuple(padding)


def check_padding(padding):
    """``padding`` as PyTorch's conv takes it: "same", "valid", an int or a pair (returned as a pair)."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ArgumentTypeError(f"padding must be 'same', 'valid', a non-negative integer or a pair of them, "
                                    f"got {padding!r}")
        return padding
    return non_negative_pair("padding", padding)


def resolve_padding(padding, kernel: tuple, stride: tuple, dilation: tuple = (1, 1)) -> tuple[int, int, int, int]:
    """Explicit (top, bottom, left, right) zero padding for ``padding`` (checked by :func:`check_padding`).

    "valid" is no padding. "same" (stride 1 only, as in PyTorch) pads d·(k − 1) in
    total along each axis, half of it (rounded down) before and the rest after,
    so an odd total puts the extra row (column) at the bottom (right), as PyTorch does.
    """
    padding = check_padding(padding)
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        if tuple(stride) != (1, 1):
            raise ValueError(f"padding='same' needs stride 1 (as in PyTorch), got stride {tuple(stride)}")
        (kh, kw), (dh, dw) = kernel, dilation
        total_h, total_w = dh * (kh - 1), dw * (kw - 1)
        return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2
    return _four(padding)


def conv_output_shape(h: int, w: int, kernel: tuple, stride: tuple, padding: tuple,
                      dilation: tuple = (1, 1)) -> tuple[int, int]:
    """(Ho, Wo) for padding (ph, pw) or (top, bottom, left, right); a kernel spans d·(k − 1) + 1 pixels."""
    top, bottom, left, right = _four(padding)
    extent_h, extent_w = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
    return (h + top + bottom - extent_h) // stride[0] + 1, (w + left + right - extent_w) // stride[1] + 1


def _is_pointwise(kernel, stride, padding) -> bool:
    return kernel == (1, 1) and stride == (1, 1) and not any(padding)


def _pad_spatial(x, padding):
    top, bottom, left, right = _four(padding)
    if not (top or bottom or left or right):
        return x
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + top + bottom, w + left + right), dtype=x.dtype)
    out[:, :, top:top + h, left:left + w] = x
    return out


def _is_same(kernel, stride, padding, dilation=(1, 1)) -> bool:
    """Stride 1, no dilation, odd kernel, padding (k − 1)/2 on every side: Ho·Wo = H·W."""
    (kh, kw) = kernel
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    return (stride == (1, 1) and tuple(dilation) == (1, 1) and kh % 2 == 1 and kw % 2 == 1
            and _four(padding) == (ph, ph, pw, pw))


class SameOffset(NamedTuple):
    """How one kernel offset (i, j) of a "same" conv maps output pixels to input pixels (see :func:`same_plan`)."""

    i: int
    j: int
    out_run: slice
    in_run: slice
    out_bad: tuple  # (rows, columns) of the output pixels whose entries must be zero; None: none
    in_bad: tuple  # (rows, columns) of the input pixels that feed only those outputs


@functools.lru_cache(maxsize=256)
def same_plan(kernel: tuple, n: int, h: int, w: int) -> tuple[SameOffset, ...]:
    """The shifted runs and border slices of a "same" conv on n images of H×W, one per kernel offset.

    A "same" conv (stride 1, no dilation, odd kernel, padding (k − 1)/2) is fixed by
    its kernel and its chunk's (n, H, W), so the plan is computed once per geometry and
    shared by every forward, backward and kn2row call on it (a ResNet-20 step made
    2,636 border zeroings, each rebuilding its slices). Pixels are flattened over
    (image, row, column), n·H·W positions; output pixel d reads input pixel
    d + shift, shift = di·W + dj with (di, dj) = (i − ph, j − pw). ``out_run`` and
    ``in_run`` are the matching slices of output and input positions that stay
    inside the array. Where a window reaches into the padding, the flat shift lands
    in the neighbouring row or image instead: ``out_bad`` = (rows, columns) of the
    output pixels concerned, whose entries must be zero, and ``in_bad`` =
    (rows, columns) of the input pixels that feed only those outputs.
    """
    kh, kw = kernel
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    size = n * h * w

    def bad(delta: int, extent: int):
        # (output index range, input index range) of the rows (or columns) crossing the border
        if delta > 0:
            return slice(max(0, extent - delta), extent), slice(0, min(extent, delta))
        if delta < 0:
            return slice(0, min(extent, -delta)), slice(max(0, extent + delta), extent)
        return None, None

    plan = []
    for i in range(kh):
        for j in range(kw):
            di, dj = i - ph, j - pw
            shift = di * w + dj
            first, last = max(0, -shift), max(max(0, -shift), min(size, size - shift))
            (out_rows, in_rows), (out_cols, in_cols) = bad(di, h), bad(dj, w)
            plan.append(SameOffset(i, j, slice(first, last), slice(first + shift, last + shift),
                                   (out_rows, out_cols), (in_rows, in_cols)))
    return tuple(plan)


def _zero_border(block, rows, cols) -> None:
    """Zero rows ``rows`` and columns ``cols`` (None: none) of ``block`` (..., H, W)."""
    if rows is not None:
        block[..., rows, :] = 0
    if cols is not None:
        block[..., cols] = 0


def _im2col_same(x, kernel):
    """im2col of a "same" conv: one channel-first copy of x, then one shifted run per (channel, offset).

    The run of offset (i, j) with column shift dj ≠ 0 reads, for the output pixels
    whose window crosses the left/right border, input pixels of the neighbouring row:
    exactly the input columns ``in_bad`` that this offset never reads legitimately
    (dj > 0: the first dj columns; dj < 0: the last −dj). Zeroing those columns of
    the source before the copies, instead of the output's border columns after them,
    makes the runs write the zeros themselves: the offsets are visited by column
    shift (0, then 1, 2, … zeroing the source's left columns cumulatively, then −1,
    −2, … with those restored from x, zeroing its right columns), so each border column
    is zeroed once on the source (1/(kh·kw) of the buffer) rather than on every
    offset's plane of the buffer (strided writes that touch every cache line).
    Border rows stay zeroed on the output (contiguous).
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = backend.get_array_module(x)
    source = xp.empty((c, n, h, w), dtype=x.dtype)  # always a copy (for n = 1 the transpose is a view of x)
    source[...] = x.transpose(1, 0, 2, 3)
    source = source.reshape(c, n * h * w)
    col = xp.empty((c, kh, kw, n * h * w), dtype=x.dtype)
    grid = col.reshape(c, kh, kw, n, h, w)
    plan = same_plan(tuple(kernel), n, h, w)
    pw = (kw - 1) // 2
    planes = source.reshape(c, n, h, w)
    for dj in [0] + list(range(1, kw - pw)) + list(range(-1, -pw - 1, -1)):
        if dj == -1:  # the negative shifts read the left columns: restore them (no second source copy)
            left = plan[kw - 1].in_bad[1]
            planes[..., left] = x.transpose(1, 0, 2, 3)[..., left]
        if dj:
            planes[..., plan[pw + dj].in_bad[1]] = 0
        for i in range(kh):
            _, _, out_run, in_run, (out_rows, _), _ = plan[i * kw + pw + dj]
            col[:, i, pw + dj, out_run] = source[:, in_run]
            col[:, i, pw + dj, :out_run.start] = 0
            col[:, i, pw + dj, out_run.stop:] = 0
            _zero_border(grid[:, i, pw + dj], out_rows, None)
    return col.reshape(c * kh * kw, n * h * w)


def _fill_column(row, grid, source, out_run, in_run, out_bad) -> None:
    """One kernel offset's im2col rows ``row`` (C, n·H·W) (``grid``: its (C, n, H, W) view) from ``source``."""
    row[:, out_run] = source[:, in_run]
    row[:, :out_run.start] = 0
    row[:, out_run.stop:] = 0
    _zero_border(grid, *out_bad)


def _col2im_same(col, x_shape, kernel):
    """Adjoint of :func:`_im2col_same` (overwrites ``col``); returns a (n, C, H, W) transposed view."""
    n, c, h, w = x_shape
    kh, kw = kernel
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    flat = col.reshape(c, kh, kw, n * h * w)
    grid = col.reshape(c, kh, kw, n, h, w)
    total = flat[:, ph, pw]  # the centre offset maps every pixel to itself: accumulate into it
    for i, j, out_run, in_run, out_bad, _ in same_plan(tuple(kernel), n, h, w):
        if (i, j) == (ph, pw):
            continue
        _zero_border(grid[:, i, j], *out_bad)  # gradients of padding pixels: dropped
        total[:, in_run] += flat[:, i, j, out_run]
    return total.reshape(c, n, h, w).transpose(1, 0, 2, 3)


def im2col(x, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple = (1, 1)):
    """Columns (C·kh·kw, N·Ho·Wo) of ``x`` (N, C, H, W): rows in (C, kh, kw), columns in (N, Ho, Wo) order.

    ``padding`` is (ph, pw) or (top, bottom, left, right). A "same" conv copies whole
    shifted planes (long runs); any other conv copies a 6-D strided view
    (C, kh, kw, N, Ho, Wo) of the padded input once (kernel offsets ``dilation``
    apart). A pointwise conv (1×1, stride 1, no padding) needs neither: it gets the
    view (N, C, H·W) of x, one (C, P) column matrix per image.
    """
    n, c, h, w = x.shape
    pads = _four(padding)
    if _is_pointwise(kernel, stride, pads):
        return x.reshape(n, c, h * w)
    if _is_same(kernel, stride, pads, dilation):
        return _im2col_same(x, kernel)
    kh, kw = kernel
    (sh, sw), (dh, dw) = stride, dilation
    ho, wo = conv_output_shape(h, w, kernel, stride, pads, dilation)
    xp = backend.get_array_module(x)
    padded = xp.ascontiguousarray(_pad_spatial(x, pads))
    s_n, s_c, s_h, s_w = padded.strides
    windows = backend.as_strided(padded, (c, kh, kw, n, ho, wo),
                                 (s_c, s_h * dh, s_w * dw, s_n, s_h * sh, s_w * sw))
    return xp.ascontiguousarray(windows).reshape(c * kh * kw, n * ho * wo)


def col2im(col, x_shape: tuple, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple = (1, 1)):
    """Adjoint of :func:`im2col`: sum (C·kh·kw, N·Ho·Wo) columns back into an (N, C, H, W) array.

    Accumulates over the kh·kw kernel offsets with slice additions (whole shifted
    planes for a "same" conv, strided windows otherwise), so no scatter
    (``add.at``) is needed even where windows overlap. ``col`` may be overwritten.
    With padding the generic result is a view into the padded accumulator.
    """
    n, c, h, w = x_shape
    pads = _four(padding)
    if _is_pointwise(kernel, stride, pads):
        return col.reshape(n, c, h, w)
    if _is_same(kernel, stride, pads, dilation):
        return _col2im_same(col, x_shape, kernel)
    kh, kw = kernel
    (sh, sw), (dh, dw) = stride, dilation
    top, bottom, left, right = pads
    ho, wo = conv_output_shape(h, w, kernel, stride, pads, dilation)
    xp = backend.get_array_module(col)
    col = col.reshape(c, kh, kw, n, ho, wo)
    out = xp.zeros((n, c, h + top + bottom, w + left + right), dtype=col.dtype)
    target = out.transpose(1, 0, 2, 3)  # a (C, N, Hp, Wp) view, in the columns' order
    for i in range(kh):
        for j in range(kw):
            target[:, :, i * dh:i * dh + sh * ho:sh, j * dw:j * dw + sw * wo:sw] += col[:, i, j]
    return out[:, :, top:top + h, left:left + w] if any(pads) else out


def _chunk_size(n: int, per_sample_bytes: int) -> int:
    """Images per chunk: about CHUNK_TARGET_BYTES of columns, never over IM2COL_BUDGET_BYTES (but ≥ 1).

    From the shapes alone (:func:`minibasis.parallel.chunk_step`): the same chunks on
    any number of threads, so the weight gradient is the same sum of the same parts.
    """
    return parallel.chunk_step(n, per_sample_bytes, min(CHUNK_TARGET_BYTES, IM2COL_BUDGET_BYTES))


def _workers(x, weight, n: int, per_sample_bytes: int, step: int) -> int:
    """Threads for a conv's chunks: 1 under PARALLEL_MIN_BYTES of columns (a thread handoff per chunk
    would cost more than it saves), else the engine's, but no more than the chunks that fit
    IM2COL_BUDGET_BYTES at once (each worker has one chunk's columns alive)."""
    if n * per_sample_bytes < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(parallel.workers_for(x, weight), IM2COL_BUDGET_BYTES // max(1, step * per_sample_bytes)))


def _uses_kn2row(m: int, c: int, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple, groups: int) -> bool:
    return (groups == 1 and _is_same(kernel, stride, padding, dilation) and kernel != (1, 1)
            and m < KN2ROW_CHANNEL_RATIO * c)


def _kn2row_forward(x, weight, out):
    """out (n, M, H, W) ← "same" stride-1 conv of x (n, C, H, W), by kn2row.

    ``products[i, j]`` = W[:, :, i, j] @ x at every input pixel (one GEMM for all
    offsets); output pixel d then sums offset (i, j)'s product at input pixel
    d + shift (see :func:`same_plan`), except where that is padding.
    """
    n, c, h, w = x.shape
    m, _, kh, kw = weight.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = backend.get_array_module(x)
    stacked = xp.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(kh * kw * m, c)
    products = backend.matmul(stacked, _channels_first(x)).reshape(kh, kw, m, n * h * w)
    grid = products.reshape(kh, kw, m, n, h, w)
    total = products[ph, pw]  # the centre offset covers every output pixel: accumulate into it
    for i, j, out_run, in_run, _, in_bad in same_plan((kh, kw), n, h, w):
        if (i, j) == (ph, pw):
            continue
        _zero_border(grid[i, j], *in_bad)  # products that would only reach padding outputs
        total[:, out_run] += products[i, j, :, in_run]
    out[...] = total.reshape(m, n, h, w).transpose(1, 0, 2, 3)
    return out


def _same_input_grad(gy, weight):
    """Input gradient (n, C, H, W) of a "same" stride-1 conv with few output channels, from gy (n, M, H, W).

    The adjoint of a "same" conv is the "same" conv of gy with the kernel transposed
    (C, M, kh, kw) and flipped in both spatial axes. As such it builds gy's columns,
    (kh·kw·M, n·H·W), and makes one GEMM ``W'' (C, kh·kw·M) @ col`` straight into the input
    gradient, where the generic backward makes ``Wᵀ @ gyᵀ`` into (kh·kw·C, n·H·W) columns
    and sums them back with col2im: for M < C (a BasisConv's basis stage) its traffic shrinks
    with M, as kn2row's does in forward. The products are the same C·kh·kw·M·n·H·W
    (= n·D·M·P, the count of the generic input gradient).
    """
    n, m, h, w = gy.shape
    c, kernel = weight.shape[1], weight.shape[2:]
    xp = backend.get_array_module(gy)
    flipped = xp.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]).reshape(c, -1)
    product = backend.matmul(flipped, _im2col_same(gy, kernel))  # (C, n·H·W)
    return product.reshape(c, n, h, w).transpose(1, 0, 2, 3)


def conv_path(m: int, c: int, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple = (1, 1),
              groups: int = 1) -> str:
    """The path (one of ``CONV_PATHS``) a conv of C → M channels with this geometry takes; ``padding``
    is (top, bottom, left, right) or (ph, pw)."""
    kernel, stride, dilation, padding = tuple(kernel), tuple(stride), tuple(dilation), _four(padding)
    if _is_pointwise(kernel, stride, padding):
        return "pointwise"
    if _uses_kn2row(m, c, kernel, stride, padding, dilation, groups):
        return "kn2row"
    if _uses_depthwise_shifts(m, c, kernel, stride, padding, dilation, groups):
        return "depthwise-same"
    if _is_same(kernel, stride, padding, dilation):
        return "same-runs"
    return "strided" if stride != (1, 1) else "im2col"


def _uses_depthwise_shifts(m: int, c: int, kernel, stride, padding, dilation, groups: int) -> bool:
    return groups == c == m and kernel != (1, 1) and _is_same(kernel, stride, padding, dilation)


def _depthwise_same(x_shape, taps, source, adjoint: bool):
    """A "same" depthwise conv (g = C = M) of channel-first ``source`` (C, n·H·W), or its adjoint.

    ``taps`` (C, kh, kw). For each kernel offset one counted product of the tap with
    every pixel (C·n·H·W products, the cost of that offset's im2col rows in the
    batched GEMM, so the count is unchanged), the products whose flat shift wraps
    into a neighbouring row or image zeroed (as kn2row does), and the rest added,
    shifted, into the result. ``adjoint`` runs the input gradient (gy → gx), which
    shifts the other way. No (C·kh·kw, n·P) column buffer: one (C, n·H·W) product.
    """
    n, c, h, w = x_shape
    kh, kw = taps.shape[1:]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    total = backend.mul(taps[:, ph, pw].reshape(c, 1), source)  # the centre offset covers every pixel
    product = backend.get_array_module(source).empty_like(source)
    grid = product.reshape(c, n, h, w)
    for i, j, out_run, in_run, out_bad, in_bad in same_plan((kh, kw), n, h, w):
        if (i, j) == (ph, pw):
            continue
        backend.mul(taps[:, i, j].reshape(c, 1), source, out=product)
        if adjoint:
            _zero_border(grid, *out_bad)
            total[:, in_run] += product[:, out_run]
        else:
            _zero_border(grid, *in_bad)
            total[:, out_run] += product[:, in_run]
    return total


def _depthwise_same_weight_grad(x_shape, gy_t, source, kernel):
    """(C, kh, kw) weight gradient of a "same" depthwise conv: per offset, Σ over pixels of gy · that offset's im2col row."""
    n, c, h, w = x_shape
    xp = backend.get_array_module(source)
    grad = xp.empty((c,) + tuple(kernel), dtype=source.dtype)
    row = xp.empty_like(source)
    grid = row.reshape(c, n, h, w)
    for i, j, out_run, in_run, out_bad, _ in same_plan(tuple(kernel), n, h, w):
        _fill_column(row, grid, source, out_run, in_run, out_bad)
        grad[:, i, j] = backend.einsum("cp,cp->c", gy_t, row)
    return grad


def _group_matmul(a, b, out=None):
    """``a @ b`` over stacked groups (into ``out`` when given); an inner dimension of 1 (a depthwise conv's M/g)
    as a broadcast product.

    NumPy's matmul takes a slow non-BLAS loop for a (…, m, 1) @ (…, 1, n) outer
    product (~25x slower here); the broadcast product multiplies the same m·n pairs
    per group and is counted the same.
    """
    if a.shape[-1] == 1:
        return backend.mul(a, b, out=out)
    return backend.matmul(a, b, out=out)


def _channels_first(a):
    """(n, M, Ho, Wo) → contiguous (M, n·Ho·Wo) (one copy)."""
    m = a.shape[1]
    return backend.get_array_module(a).ascontiguousarray(a.transpose(1, 0, 2, 3)).reshape(m, -1)


class Conv2dFunction(Function):
    """conv2d(x, weight[, bias]); see the module docstring for layouts and counts.

    ``padding`` is (top, bottom, left, right). With ``groups`` g the weight is
    viewed as (g, M/g, D/g) and the columns as (g, D/g, n·P), a free reshape since
    their rows run over channels first, so each chunk is ONE batched GEMM over
    the groups, on the very columns a groups=1 conv would build.
    """

    name = "conv2d"
    is_conv = True

    def __init__(self, stride: tuple, padding: tuple, dilation: tuple = (1, 1), groups: int = 1):
        self.stride, self.padding, self.dilation, self.groups = stride, _four(padding), dilation, groups

    def _geometry(self):
        return self.kernel, self.stride, self.padding, self.dilation

    def _chunk_backward(self, gy, gx, start: int, stop: int):
        """Images [start, stop) of an im2col conv's backward: writes gx's slice, returns the weight-gradient part."""
        g, m, c = self.groups, gy.shape[1], self.x_shape[1]
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        gy_g = _channels_first(gy[start:stop]).reshape(g, m // g, -1)  # (g, M/g, n·P)
        part = None
        if need_w:
            col = im2col(self.x[start:stop], *self._geometry())
            part = backend.matmul(gy_g, col.reshape(g, -1, col.shape[1]).transpose(0, 2, 1))
            del col  # free before the column gradient is built: one chunk buffer at a time
        if need_x and self.path == "kn2row":
            gx[start:stop] = _same_input_grad(gy[start:stop], self.wg.reshape(m, c, *self.kernel))
        elif need_x:
            col_grad = _group_matmul(self.wg.transpose(0, 2, 1), gy_g).reshape(c * self.kernel[0] * self.kernel[1], -1)
            gx[start:stop] = col2im(col_grad, (stop - start,) + tuple(self.x_shape[1:]), *self._geometry())
        return part

    def _pointwise_chunks(self, x, weight) -> tuple[int, int]:
        """(workers, images per chunk) of a pointwise conv: chunks of about POINTWISE_CHUNK_BYTES of input and
        output whatever the thread count (so the weight gradient's sum, and every result, is the same on any
        number of threads); serial under PARALLEL_MIN_BYTES."""
        n, c, h, w = x.shape
        per_image = (c + weight.shape[0]) * h * w * x.dtype.itemsize  # input and output: no columns
        workers = parallel.workers_for(x, weight) if n * per_image >= PARALLEL_MIN_BYTES else 1
        return workers, parallel.chunk_step(n, per_image, POINTWISE_CHUNK_BYTES)

    def _pointwise_chunk_backward(self, gy, gx, start: int, stop: int):
        """Images [start, stop) of a pointwise conv's backward (see :meth:`_chunk_backward`)."""
        g, m, c = self.groups, gy.shape[1], self.x_shape[1]
        p = gy.shape[2] * gy.shape[3]
        gy4 = gy[start:stop].reshape(stop - start, g, m // g, p)
        part = None
        if self.needs_input_grad[1]:
            x4 = self.x[start:stop].reshape(stop - start, g, c // g, p)
            part = backend.matmul(gy4, x4.transpose(0, 1, 3, 2)).sum(axis=0)  # inner dimension P
        if self.needs_input_grad[0]:
            _group_matmul(self.wg.transpose(0, 2, 1), gy4, out=gx[start:stop].reshape(stop - start, g, c // g, p))
        return part

    def _depthwise_chunk_backward(self, gy, gx, start: int, stop: int):
        """Images [start, stop) of a "same" depthwise conv's backward (see :meth:`_chunk_backward`)."""
        c = self.x_shape[1]
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        chunk_shape = (stop - start,) + tuple(self.x_shape[1:])
        gy_t = _channels_first(gy[start:stop])
        part = None
        if need_w:
            part = _depthwise_same_weight_grad(chunk_shape, gy_t, _channels_first(self.x[start:stop]), self.kernel)
        if need_x:
            total = _depthwise_same(chunk_shape, self.wg.reshape(c, *self.kernel), gy_t, adjoint=True)
            gx[start:stop] = total.reshape(c, stop - start, *self.x_shape[2:]).transpose(1, 0, 2, 3)
        return part

    def forward(self, x, weight, bias=None):
        n, c, h, w = x.shape
        m, _, kh, kw = weight.shape
        g = self.groups
        self.kernel = kernel = (kh, kw)
        ho, wo = conv_output_shape(h, w, kernel, self.stride, self.padding, self.dilation)
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        wg = weight.reshape(g, m // g, -1)  # (g, M/g, D/g)
        self.x_shape = x.shape
        self.wg = wg if need_x else None
        self.x = x if need_w else None  # backward rebuilds the columns from x
        self.path = path = conv_path(m, c, kernel, self.stride, self.padding, self.dilation, g)
        for trace in _path_traces:
            trace.append(path)
        if path == "pointwise":
            # A batched GEMM on the view: (g, M/g, C/g) @ (n, g, C/g, P) → (n, g, M/g, P), already NCHW,
            # written into y, chunk by chunk on the engine threads: the per-image GEMMs then run
            # single-threaded inside the pooled section instead of waking the BLAS's own threads, which
            # would spin beside the engine's (bench/README.md, issue 13).
            self.workers, self.step = self._pointwise_chunks(x, weight)
            y = backend.get_array_module(x).empty((n, m, ho, wo), dtype=x.dtype)
            x4, y4 = im2col(x, *self._geometry()).reshape(n, g, c // g, h * w), y.reshape(n, g, m // g, h * w)

            def chunk_forward(start, stop):
                _group_matmul(wg, x4[start:stop], out=y4[start:stop])
            parallel.run_chunks(chunk_forward, parallel.chunk_ranges(n, self.step), self.workers)
        else:
            # Backward always works on columns (chunks sized for them), whichever forward ran.
            per_image = c * kh * kw * ho * wo * x.dtype.itemsize
            self.step = step = _chunk_size(n, per_image)
            self.workers = workers = _workers(x, weight, n, per_image, step)
            y = backend.get_array_module(x).empty((n, m, ho, wo), dtype=x.dtype)
            if path == "kn2row":
                step = _chunk_size(n, kh * kw * m * ho * wo * x.dtype.itemsize)

                def chunk_forward(start, stop):
                    _kn2row_forward(x[start:stop], weight, y[start:stop])
            elif path == "depthwise-same":
                taps = weight.reshape(c, kh, kw)

                def chunk_forward(start, stop):
                    out = _depthwise_same(y[start:stop].shape, taps, _channels_first(x[start:stop]), adjoint=False)
                    y[start:stop] = out.reshape(m, -1, ho, wo).transpose(1, 0, 2, 3)
            else:
                def chunk_forward(start, stop):
                    col = im2col(x[start:stop], *self._geometry())
                    product = _group_matmul(wg, col.reshape(g, -1, col.shape[1]))  # (g, M/g, n·P)
                    y[start:stop] = product.reshape(m, -1, ho, wo).transpose(1, 0, 2, 3)
            parallel.run_chunks(chunk_forward, parallel.chunk_ranges(n, step), workers)
        if bias is not None:
            y += bias.reshape(1, m, 1, 1)
        return y

    def backward(self, gy):
        n, m, ho, wo = gy.shape
        g = self.groups
        need_x = self.needs_input_grad[0]
        need_b = len(self.needs_input_grad) > 2 and self.needs_input_grad[2]
        c = self.x_shape[1]
        gw = gb = None
        xp = backend.get_array_module(gy)
        gx = xp.empty(self.x_shape, dtype=gy.dtype) if need_x else None
        if self.path == "pointwise":
            chunk_backward = self._pointwise_chunk_backward
        elif self.path == "depthwise-same":
            chunk_backward = self._depthwise_chunk_backward
        else:
            chunk_backward = self._chunk_backward
        chunks = parallel.chunk_ranges(n, self.step)
        for part in parallel.map_chunks(functools.partial(chunk_backward, gy, gx), chunks, self.workers):
            if part is None:
                continue
            if gw is None:  # summed in chunk order: the same result on every run, whatever the threads
                gw = part
            else:
                gw += part
        if gw is None and self.needs_input_grad[1]:  # an empty batch
            gw = xp.zeros((m, c // g) + tuple(self.kernel), dtype=gy.dtype)
        if gw is not None:
            gw = gw.reshape(m, c // g, *self.kernel)
        if need_b:
            gb = gy.sum(axis=(0, 2, 3))
        return (gx, gw, gb) if len(self.needs_input_grad) > 2 else (gx, gw)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups=1) -> Tensor:
    """2-D cross-correlation (PyTorch's conv2d): x (N, C, H, W), weight (M, C/groups, kh, kw) → (N, M, Ho, Wo).

    ``padding``: an int, a pair, "valid" (none) or "same" (stride 1; see
    :func:`resolve_padding`). ``dilation`` spaces the kernel taps; ``groups`` g splits
    input and output channels into g groups convolved separately (g = C = M: depthwise).
    """
    stride, dilation = positive_pair("stride", stride), positive_pair("dilation", dilation)
    padding, groups = check_padding(padding), positive_int("groups", groups)
    x_shape, w_shape = tuple(getattr(x, "shape", ())), tuple(getattr(weight, "shape", ()))
    if len(x_shape) != 4:
        raise ValueError(f"conv2d expects input of shape (N, C, H, W), got shape {x_shape}")
    if len(w_shape) != 4:
        raise ValueError(f"conv2d expects weight of shape (M, C, kh, kw) (C/groups per filter), got shape {w_shape}")
    if x_shape[1] % groups or w_shape[0] % groups:
        raise ValueError(f"conv2d: groups={groups} must divide the input channels ({x_shape[1]}) and the "
                         f"output channels ({w_shape[0]})")
    if x_shape[1] != w_shape[1] * groups:
        raise ValueError(f"conv2d: input has {x_shape[1]} channels but weight expects {w_shape[1] * groups} "
                         f"(input {x_shape}, weight {w_shape}, groups={groups})")
    kernel = w_shape[2:]
    pads = resolve_padding(padding, kernel, stride, dilation)
    padded = (x_shape[2] + pads[0] + pads[1], x_shape[3] + pads[2] + pads[3])
    extent = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
    if extent[0] > padded[0] or extent[1] > padded[1]:
        spans = "" if dilation == (1, 1) else f" with dilation {dilation} spans {extent} and"
        raise ValueError(f"conv2d: kernel {kernel}{spans} is larger than the padded input {padded}")
    x_dtype, w_dtype = getattr(x, "dtype", None), getattr(weight, "dtype", None)
    if getattr(w_dtype, "kind", "f") != "f" or getattr(x_dtype, "kind", "f") != "f":
        raise TypeError(f"conv2d needs floating input and weight, got {x_dtype} and {w_dtype}")
    if x_dtype != w_dtype:
        raise TypeError(f"conv2d: input dtype {x_dtype} differs from weight dtype {w_dtype}")
    if bias is not None and tuple(bias.shape) != (w_shape[0],):
        raise ValueError(f"conv2d: bias must have shape ({w_shape[0]},), got {tuple(bias.shape)}")
    fn = Conv2dFunction(stride, pads, dilation, groups)
    return fn(x, weight) if bias is None else fn(x, weight, bias)
