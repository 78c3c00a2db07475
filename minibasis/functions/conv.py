"""2-D convolution by im2col + GEMM, backward by GEMM + col2im.

Layouts (NCHW, PyTorch's): x (N, C, H, W), weight (M, C, kh, kw), bias (M,),
output (N, M, Ho, Wo) with Ho = (H + 2·ph − kh) // sh + 1.

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
or strided-window slice additions (no scatter, no ``add.at``).

Chunks: the batch always goes through in chunks of about ``CHUNK_TARGET_BYTES``
of columns (a few MiB), so each chunk's columns are still in cache when the
GEMM reads them; backward rebuilds a chunk's columns from x rather than keeping
the whole batch's (rebuilding from cache is cheaper than a round trip through
memory, and training memory stays small). ``IM2COL_BUDGET_BYTES`` caps the
chunk (a hard memory bound); both settings change speed and memory, never
results beyond float rounding of the order of summation.

Multiplications recorded (all under op ``conv2d``, which counts as convolution):

* forward: N·M·D·P (the GEMMs, over all chunks);
* backward: N·M·P·D for the weight gradient when the weight requires grad, plus
  N·D·M·P for the input gradient when the input requires grad. So a backward
  that needs both costs exactly twice the forward; the bias gradient is a sum.

Without a graph (``no_grad``) nothing is kept for backward.
"""
from __future__ import annotations

from minibasis import backend
from minibasis.checks import non_negative_pair, positive_pair
from minibasis.autograd import Function, Tensor

__all__ = ["conv2d", "Conv2dFunction", "im2col", "col2im", "conv_output_shape", "set_im2col_budget",
           "IM2COL_BUDGET_BYTES", "CHUNK_TARGET_BYTES", "KN2ROW_CHANNEL_RATIO"]

#: Largest column buffer built at once (bytes): a hard cap on im2col memory.
IM2COL_BUDGET_BYTES = 256 * 2 ** 20
#: Preferred column-buffer size of one chunk (bytes), small enough to stay in cache.
CHUNK_TARGET_BYTES = 8 * 2 ** 20
#: Forward by kn2row when a "same" conv has M < KN2ROW_CHANNEL_RATIO · C (measured crossover).
KN2ROW_CHANNEL_RATIO = 0.75


def set_im2col_budget(num_bytes: int) -> int:
    """Set the column-buffer budget in bytes; returns the previous value."""
    global IM2COL_BUDGET_BYTES
    if int(num_bytes) <= 0:
        raise ValueError(f"im2col budget must be a positive number of bytes, got {num_bytes}")
    previous, IM2COL_BUDGET_BYTES = IM2COL_BUDGET_BYTES, int(num_bytes)
    return previous


def conv_output_shape(h: int, w: int, kernel: tuple, stride: tuple, padding: tuple) -> tuple[int, int]:
    return (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[1] + 1


def _is_pointwise(kernel, stride, padding) -> bool:
    return kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)


def _pad_spatial(x, padding):
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def _is_same(kernel, stride, padding) -> bool:
    """Stride 1, odd kernel, padding (k − 1)/2: the output is as large as the input (Ho·Wo = H·W)."""
    (kh, kw), (ph, pw) = kernel, padding
    return stride == (1, 1) and kh % 2 == 1 and kw % 2 == 1 and (ph, pw) == ((kh - 1) // 2, (kw - 1) // 2)


def _same_offsets(kernel, n: int, h: int, w: int):
    """How each kernel offset (i, j) of a "same" conv maps output pixels to input pixels.

    Pixels are flattened over (image, row, column), n·H·W positions; output pixel d
    reads input pixel d + shift, shift = di·W + dj with (di, dj) = (i − ph, j − pw).
    Yields ``(i, j, out_run, in_run, out_bad, in_bad)``: ``out_run`` and ``in_run``
    are the matching slices of output and input positions that stay inside the
    array. Where a window reaches into the padding, the flat shift lands in the
    neighbouring row or image instead: ``out_bad`` = (rows, columns) of the output
    pixels concerned, whose entries must be zero, and ``in_bad`` = (rows, columns)
    of the input pixels that feed only those outputs. None where there are none.
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

    for i in range(kh):
        for j in range(kw):
            di, dj = i - ph, j - pw
            shift = di * w + dj
            first, last = max(0, -shift), max(max(0, -shift), min(size, size - shift))
            (out_rows, in_rows), (out_cols, in_cols) = bad(di, h), bad(dj, w)
            yield (i, j, slice(first, last), slice(first + shift, last + shift),
                   (out_rows, out_cols), (in_rows, in_cols))


def _zero_border(block, rows, cols) -> None:
    """Zero rows ``rows`` and columns ``cols`` (None: none) of ``block`` (..., H, W)."""
    if rows is not None:
        block[..., rows, :] = 0
    if cols is not None:
        block[..., cols] = 0


def _im2col_same(x, kernel):
    """im2col of a "same" conv: one channel-first copy of x, then one shifted run per (channel, offset)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    xp = backend.get_array_module(x)
    source = _channels_first(x)  # (C, n·H·W)
    col = xp.empty((c, kh, kw, n * h * w), dtype=x.dtype)
    grid = col.reshape(c, kh, kw, n, h, w)
    for i, j, out_run, in_run, out_bad, _ in _same_offsets(kernel, n, h, w):
        col[:, i, j, out_run] = source[:, in_run]
        col[:, i, j, :out_run.start] = 0
        col[:, i, j, out_run.stop:] = 0
        _zero_border(grid[:, i, j], *out_bad)
    return col.reshape(c * kh * kw, n * h * w)


def _col2im_same(col, x_shape, kernel):
    """Adjoint of :func:`_im2col_same` (overwrites ``col``); returns a (n, C, H, W) transposed view."""
    n, c, h, w = x_shape
    kh, kw = kernel
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    flat = col.reshape(c, kh, kw, n * h * w)
    grid = col.reshape(c, kh, kw, n, h, w)
    total = flat[:, ph, pw]  # the centre offset maps every pixel to itself: accumulate into it
    for i, j, out_run, in_run, out_bad, _ in _same_offsets(kernel, n, h, w):
        if (i, j) == (ph, pw):
            continue
        _zero_border(grid[:, i, j], *out_bad)  # gradients of padding pixels: dropped
        total[:, in_run] += flat[:, i, j, out_run]
    return total.reshape(c, n, h, w).transpose(1, 0, 2, 3)


def im2col(x, kernel: tuple, stride: tuple, padding: tuple):
    """Columns (C·kh·kw, N·Ho·Wo) of ``x`` (N, C, H, W): rows in (C, kh, kw), columns in (N, Ho, Wo) order.

    A "same" conv copies whole shifted planes (long runs); any other conv copies a
    6-D strided view (C, kh, kw, N, Ho, Wo) of the padded input once. A pointwise
    conv (1×1, stride 1, no padding) needs neither: it gets the view (N, C, H·W)
    of x, one (C, P) column matrix per image.
    """
    n, c, h, w = x.shape
    if _is_pointwise(kernel, stride, padding):
        return x.reshape(n, c, h * w)
    if _is_same(kernel, stride, padding):
        return _im2col_same(x, kernel)
    kh, kw = kernel
    sh, sw = stride
    ho, wo = conv_output_shape(h, w, kernel, stride, padding)
    xp = backend.get_array_module(x)
    padded = xp.ascontiguousarray(_pad_spatial(x, padding))
    s_n, s_c, s_h, s_w = padded.strides
    windows = backend.as_strided(padded, (c, kh, kw, n, ho, wo), (s_c, s_h, s_w, s_n, s_h * sh, s_w * sw))
    return xp.ascontiguousarray(windows).reshape(c * kh * kw, n * ho * wo)


def col2im(col, x_shape: tuple, kernel: tuple, stride: tuple, padding: tuple):
    """Adjoint of :func:`im2col`: sum (C·kh·kw, N·Ho·Wo) columns back into an (N, C, H, W) array.

    Accumulates over the kh·kw kernel offsets with slice additions (whole shifted
    planes for a "same" conv, strided windows otherwise), so no scatter
    (``add.at``) is needed even where windows overlap. ``col`` may be overwritten.
    With padding the generic result is a view into the padded accumulator.
    """
    n, c, h, w = x_shape
    if _is_pointwise(kernel, stride, padding):
        return col.reshape(n, c, h, w)
    if _is_same(kernel, stride, padding):
        return _col2im_same(col, x_shape, kernel)
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    ho, wo = conv_output_shape(h, w, kernel, stride, padding)
    xp = backend.get_array_module(col)
    col = col.reshape(c, kh, kw, n, ho, wo)
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    target = out.transpose(1, 0, 2, 3)  # a (C, N, Hp, Wp) view, in the columns' order
    for i in range(kh):
        for j in range(kw):
            target[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += col[:, i, j]
    return out[:, :, ph:ph + h, pw:pw + w] if (ph or pw) else out


def _chunk_size(n: int, per_sample_bytes: int) -> int:
    """Images per chunk: about CHUNK_TARGET_BYTES of columns, never over IM2COL_BUDGET_BYTES (but ≥ 1)."""
    target = min(CHUNK_TARGET_BYTES, IM2COL_BUDGET_BYTES)
    return max(1, min(n, target // max(per_sample_bytes, 1)))


def _uses_kn2row(m: int, c: int, kernel: tuple, stride: tuple, padding: tuple) -> bool:
    return _is_same(kernel, stride, padding) and kernel != (1, 1) and m < KN2ROW_CHANNEL_RATIO * c


def _kn2row_forward(x, weight, out):
    """out (n, M, H, W) ← "same" stride-1 conv of x (n, C, H, W), by kn2row.

    ``products[i, j]`` = W[:, :, i, j] @ x at every input pixel (one GEMM for all
    offsets); output pixel d then sums offset (i, j)'s product at input pixel
    d + shift (see :func:`_same_offsets`), except where that is padding.
    """
    n, c, h, w = x.shape
    m, _, kh, kw = weight.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = backend.get_array_module(x)
    stacked = xp.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(kh * kw * m, c)
    products = backend.matmul(stacked, _channels_first(x)).reshape(kh, kw, m, n * h * w)
    grid = products.reshape(kh, kw, m, n, h, w)
    total = products[ph, pw]  # the centre offset covers every output pixel: accumulate into it
    for i, j, out_run, in_run, _, in_bad in _same_offsets((kh, kw), n, h, w):
        if (i, j) == (ph, pw):
            continue
        _zero_border(grid[i, j], *in_bad)  # products that would only reach padding outputs
        total[:, out_run] += products[i, j, :, in_run]
    out[...] = total.reshape(m, n, h, w).transpose(1, 0, 2, 3)
    return out


def _channels_first(a):
    """(n, M, Ho, Wo) → contiguous (M, n·Ho·Wo) (one copy)."""
    m = a.shape[1]
    return backend.get_array_module(a).ascontiguousarray(a.transpose(1, 0, 2, 3)).reshape(m, -1)


class Conv2dFunction(Function):
    """conv2d(x, weight[, bias]); see the module docstring for layouts and counts."""

    name = "conv2d"
    is_conv = True

    def __init__(self, stride: tuple, padding: tuple):
        self.stride, self.padding = stride, padding

    def forward(self, x, weight, bias=None):
        n, c, h, w = x.shape
        m, _, kh, kw = weight.shape
        self.kernel = kernel = (kh, kw)
        ho, wo = conv_output_shape(h, w, kernel, self.stride, self.padding)
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        w2 = weight.reshape(m, -1)
        self.x_shape = x.shape
        self.w2 = w2 if need_x else None
        self.x = x if need_w else None  # backward rebuilds the columns from x
        if _is_pointwise(kernel, self.stride, self.padding):
            # A batched GEMM on the view: (M, C) @ (N, C, P) → (N, M, P), already NCHW.
            y = backend.matmul(w2, im2col(x, kernel, self.stride, self.padding)).reshape(n, m, ho, wo)
        else:
            # Backward always works on columns (chunks sized for them), whichever forward ran.
            self.step = _chunk_size(n, c * kh * kw * ho * wo * x.dtype.itemsize)
            y = backend.get_array_module(x).empty((n, m, ho, wo), dtype=x.dtype)
            if _uses_kn2row(m, c, kernel, self.stride, self.padding):
                step = _chunk_size(n, kh * kw * m * ho * wo * x.dtype.itemsize)
                for start in range(0, n, step):
                    _kn2row_forward(x[start:start + step], weight, y[start:start + step])
            else:
                for start in range(0, n, self.step):
                    col = im2col(x[start:start + self.step], kernel, self.stride, self.padding)
                    y[start:start + self.step] = backend.matmul(w2, col).reshape(m, -1, ho, wo).transpose(1, 0, 2, 3)
        if bias is not None:
            y += bias.reshape(1, m, 1, 1)
        return y

    def backward(self, gy):
        n, m, ho, wo = gy.shape
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        need_b = len(self.needs_input_grad) > 2 and self.needs_input_grad[2]
        c = self.x_shape[1]
        gx = gw = gb = None
        if _is_pointwise(self.kernel, self.stride, self.padding):
            gy3 = gy.reshape(n, m, ho * wo)
            if need_w:
                x3 = self.x.reshape(n, c, ho * wo)
                gw = backend.matmul(gy3, x3.transpose(0, 2, 1)).sum(axis=0)
            if need_x:
                gx = backend.matmul(self.w2.T, gy3).reshape(self.x_shape)
        else:
            xp = backend.get_array_module(gy)
            gx = xp.empty(self.x_shape, dtype=gy.dtype) if need_x else None
            for start in range(0, n, self.step):
                stop = min(n, start + self.step)
                gy_t = _channels_first(gy[start:stop])
                if need_w:
                    col = im2col(self.x[start:stop], self.kernel, self.stride, self.padding)
                    part = backend.matmul(gy_t, col.T)
                    if gw is None:
                        gw = part
                    else:
                        gw += part
                    del col  # free before the column gradient is built: one chunk buffer at a time
                if need_x:
                    gx[start:stop] = col2im(backend.matmul(self.w2.T, gy_t), (stop - start,) + tuple(self.x_shape[1:]),
                                            self.kernel, self.stride, self.padding)
        if gw is not None:
            gw = gw.reshape(m, c, *self.kernel)
        if need_b:
            gb = gy.sum(axis=(0, 2, 3))
        return (gx, gw, gb) if len(self.needs_input_grad) > 2 else (gx, gw)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation (PyTorch's conv2d): x (N, C, H, W), weight (M, C, kh, kw) → (N, M, Ho, Wo)."""
    stride, padding = positive_pair("stride", stride), non_negative_pair("padding", padding)
    x_shape, w_shape = tuple(getattr(x, "shape", ())), tuple(getattr(weight, "shape", ()))
    if len(x_shape) != 4:
        raise ValueError(f"conv2d expects input of shape (N, C, H, W), got shape {x_shape}")
    if len(w_shape) != 4:
        raise ValueError(f"conv2d expects weight of shape (M, C, kh, kw), got shape {w_shape}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"conv2d: input has {x_shape[1]} channels but weight expects {w_shape[1]} "
                         f"(input {x_shape}, weight {w_shape})")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: stride must be ≥ 1 and padding ≥ 0, got stride={stride}, padding={padding}")
    padded = (x_shape[2] + 2 * padding[0], x_shape[3] + 2 * padding[1])
    if w_shape[2] > padded[0] or w_shape[3] > padded[1]:
        raise ValueError(f"conv2d: kernel {w_shape[2:]} is larger than the padded input {padded}")
    x_dtype, w_dtype = getattr(x, "dtype", None), getattr(weight, "dtype", None)
    if getattr(w_dtype, "kind", "f") != "f" or getattr(x_dtype, "kind", "f") != "f":
        raise TypeError(f"conv2d needs floating input and weight, got {x_dtype} and {w_dtype}")
    if x_dtype != w_dtype:
        raise TypeError(f"conv2d: input dtype {x_dtype} differs from weight dtype {w_dtype}")
    if bias is not None and tuple(bias.shape) != (w_shape[0],):
        raise ValueError(f"conv2d: bias must have shape ({w_shape[0]},), got {tuple(bias.shape)}")
    fn = Conv2dFunction(stride, padding)
    return fn(x, weight) if bias is None else fn(x, weight, bias)
