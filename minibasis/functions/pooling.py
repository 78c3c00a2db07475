"""Max and average pooling over k×k windows, and global average pooling.

Both window pools loop over the kh·kw offsets of the window with strided slices
(one pass per offset over the output), like :func:`minibasis.functions.conv.im2col`,
so overlapping windows (the paper's 3×3 stride-2 pool) need no scatter. No
multiplications: max pooling compares, average pooling adds and divides.
"""
from __future__ import annotations

from minibasis import backend, parallel
from minibasis.autograd import Function, Tensor
from minibasis.checks import non_negative_pair, positive_pair
from minibasis.functions.basic import keep_where

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "global_avg_pool2d", "pool_output_size", "check_flag",
           "MAX_POOL_CHUNK_BYTES"]

#: Preferred padded-input bytes of one chunk of a max pool on the host (images at a time), small enough
#: that its ~10 passes (maxima, winning offsets, the gradient's selections) run in cache. Measured
#: (bench/README.md): the 3×3/2 pool of a (128, 32, 32, 32) float32 batch, forward + backward, 63 ms in
#: one piece, 30 ms in chunks of 8 images (1 MiB). Device arrays go through in one piece.
MAX_POOL_CHUNK_BYTES = 2 ** 20


def _window_args(name, x, kernel_size, stride, padding):
    kernel = positive_pair("kernel_size", kernel_size)
    stride = kernel if stride is None else positive_pair("stride", stride)
    padding = non_negative_pair("padding", padding)
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"{name} expects input of shape (N, C, H, W), got shape {shape}")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{name}: kernel and stride must be ≥ 1, padding ≥ 0; got "
                         f"kernel={kernel}, stride={stride}, padding={padding}")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{name}: padding {padding} must be at most half the kernel {kernel}")
    if kernel[0] > shape[2] + 2 * padding[0] or kernel[1] > shape[3] + 2 * padding[1]:
        raise ValueError(f"{name}: kernel {kernel} is larger than the padded input "
                         f"{(shape[2] + 2 * padding[0], shape[3] + 2 * padding[1])}")
    return kernel, stride, padding


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool = False) -> int:
    """Output length along one axis, PyTorch's rule.

    floor((size + 2·padding − kernel) / stride) + 1, or with ``ceil_mode`` the
    ceiling, less one when the last window would start in the right padding
    (every window must start inside the input or the left padding).
    """
    span = size + 2 * padding - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


class _Pool2d(Function):
    """Shared geometry of the window pools: output size, padded input, window slices."""

    def __init__(self, kernel, stride, padding, ceil_mode):
        self.kernel, self.stride, self.padding, self.ceil_mode = kernel, stride, padding, ceil_mode

    def _setup(self, shape):
        n, c, h, w = self.x_shape = shape
        self.out_hw = tuple(pool_output_size(size, k, s, p, self.ceil_mode)
                            for size, k, s, p in zip((h, w), self.kernel, self.stride, self.padding))
        # Windows of ceil mode may run past the padding on the bottom/right: pad up to their end.
        self.extra = tuple(max(0, (o - 1) * s + k - (size + 2 * p))
                           for o, s, k, size, p in zip(self.out_hw, self.stride, self.kernel, (h, w), self.padding))

    def _padded(self, x, value):
        (ph, pw), (eh, ew) = self.padding, self.extra
        if not (ph or pw or eh or ew):
            return x
        xp = backend.get_array_module(x)
        n, c, h, w = x.shape
        out = xp.full((n, c, h + 2 * ph + eh, w + 2 * pw + ew), value, dtype=x.dtype)
        out[:, :, ph:ph + h, pw:pw + w] = x
        return out

    def _windows(self):
        """(offset index, slice into the padded input) for every kernel offset."""
        (kh, kw), (sh, sw), (ho, wo) = self.kernel, self.stride, self.out_hw
        for i in range(kh):
            for j in range(kw):
                yield i * kw + j, (slice(None), slice(None), slice(i, i + sh * ho, sh), slice(j, j + sw * wo, sw))

    def _gradient(self, dtype, xp):
        n, c, h, w = self.x_shape
        (ph, pw), (eh, ew) = self.padding, self.extra
        return xp.zeros((n, c, h + 2 * ph + eh, w + 2 * pw + ew), dtype=dtype)

    def _unpad(self, g):
        n, c, h, w = self.x_shape
        ph, pw = self.padding
        return g[:, :, ph:ph + h, pw:pw + w] if g.shape[2:] != (h, w) else g


def _index_dtype(xp, size: int):
    """The smallest signed integer dtype holding window offsets 0 … size − 1."""
    for dtype in (xp.int8, xp.int16, xp.int32):
        if size - 1 <= xp.iinfo(dtype).max:
            return dtype
    return xp.int64


class MaxPool2d(_Pool2d):
    """Max over each window; a NaN wins its window (PyTorch: ``val > max || isnan(val)``, the last NaN).

    Separable: a max over a kh×kw window is the max over kh rows of the row maxima
    over kw columns, so forward runs a 1-D max along W (kw strided views of the
    padded input) and then along H (kh views of that), kh + kw − 2 ``maximum``
    passes instead of kh·kw − 1 full window passes, and a 182×182 window costs
    364 views, not 33,124. Each stage keeps the winning offset of its 1-D windows
    (an integer array the size of its output, not of the input) for backward,
    which routes the gradient back through the two stages by bit-mask selections
    and strided additions (no scatter).

    The two stages pick PyTorch's winner of the whole window: the first maximum in
    row-major order is in the first row whose row maximum equals the window's, at
    that row's first maximum; a NaN window's winner (the last NaN in row-major
    order) is in the last row holding a NaN, at its last NaN.

    On the host the batch goes through in chunks of about ``MAX_POOL_CHUNK_BYTES``
    of padded input, so each chunk's passes run in cache, on the engine's worker
    threads (:mod:`minibasis.parallel`) when it is large enough. Every window is
    computed the same way whatever the chunks: the results are bitwise those of
    one piece.
    """

    def forward(self, x):
        xp = backend.get_array_module(x)
        self._setup(x.shape)
        n, c, h, w = x.shape
        (ph, pw), (eh, ew) = self.padding, self.extra
        (kh, kw), (sh, sw), (ho, wo) = self.kernel, self.stride, self.out_hw
        self.padded_hw = hp, wp = h + 2 * ph + eh, w + 2 * pw + ew
        out = xp.empty((n, c, ho, wo), dtype=x.dtype)
        self.column_winner = xp.empty((n, c, hp, wo), _index_dtype(xp, kw)) if kw > 1 else None
        self.row_winner = xp.empty((n, c, ho, wo), _index_dtype(xp, kh)) if kh > 1 else None

        def chunk_forward(start, stop):
            padded = self._padded(x[start:stop], -xp.inf)
            # (n, C, Hp, Wo) row maxima, then their maxima over the rows
            rows = _max_along(padded, 3, kw, sw, wo, pw, winner=_part(self.column_winner, start, stop))
            _max_along(rows, 2, kh, sh, ho, ph, out=out[start:stop], winner=_part(self.row_winner, start, stop))

        self.chunks, self.workers = _pool_chunks(x, c * hp * wp * x.dtype.itemsize)
        parallel.run_chunks(chunk_forward, self.chunks, self.workers)
        return out

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        (kh, kw), (sh, sw) = self.kernel, self.stride
        n, c = self.x_shape[:2]
        hp, wp = self.padded_hw
        grad = xp.empty((n, c, hp, wp), dtype=gy.dtype)

        def chunk_backward(start, stop):
            g_rows = _max_along_backward(gy[start:stop], _part(self.row_winner, start, stop), 2, kh, sh, hp)
            _max_along_backward(g_rows, _part(self.column_winner, start, stop), 3, kw, sw, wp, out=grad[start:stop])

        parallel.run_chunks(chunk_backward, self.chunks, self.workers)
        return self._unpad(grad)


def _part(a, start: int, stop: int):
    """Images [start, stop) of ``a`` (None stays None)."""
    return None if a is None else a[start:stop]


def _pool_chunks(x, per_image_bytes: int):
    """(chunks, workers) of a max pool over ``x``: host arrays in chunks of about MAX_POOL_CHUNK_BYTES."""
    n = x.shape[0]
    if not backend.is_host_array(x):
        return [(0, n)], 1
    # threads only where each of two workers gets at least a full chunk: a handoff costs more than a small pool
    workers = parallel.workers_for(x) if n * per_image_bytes >= 2 * MAX_POOL_CHUNK_BYTES else 1
    step = parallel.chunk_step(n, per_image_bytes, MAX_POOL_CHUNK_BYTES)
    return parallel.chunk_ranges(n, step), workers


def _axis_view(a, axis: int, start: int, stride: int, count: int):
    """``a[..., start : start + stride·count : stride, ...]`` along ``axis``."""
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, start + stride * count, stride)
    return a[tuple(index)]


def _max_along(a, axis: int, kernel: int, stride: int, count: int, lead: int, out=None, winner=None):
    """1-D max pool of ``a`` along ``axis``, whose first ``lead`` entries are padding: the maxima (into
    ``out`` if given, else a new array or, for kernel 1 without ``out``, a view of ``a``), the winning
    offsets written into ``winner`` (kernel > 1).

    Ties go to the first offset; where the maximum is NaN, to the last NaN; where it is
    −inf (every entry inside the input is −inf, and ties with the padding), to the first
    entry inside the input, not to the padding before it (PyTorch).
    """
    if kernel == 1:
        view = _axis_view(a, axis, 0, stride, count)
        if out is None:
            return view
        out[...] = view
        return out
    xp = backend.get_array_module(a)
    views = [_axis_view(a, axis, i, stride, count) for i in range(kernel)]
    out = xp.maximum(views[0], views[1], out=out)  # maximum propagates NaN
    for view in views[2:]:
        xp.maximum(out, view, out=out)
    # winner = the number of offsets before the first maximum = Σ_i [no maximum among 0 … i],
    # branch-free integer passes (a boolean-mask assignment per offset took 10x longer).
    searching, flag = xp.ones(out.shape, winner.dtype), xp.empty(out.shape, winner.dtype)
    winner[...] = 0
    for view in views[:-1]:
        xp.not_equal(view, out, out=flag)
        xp.bitwise_and(searching, flag, out=searching)
        winner += searching
    # The windows that start in the leading padding (the first ⌈lead / stride⌉): where their maximum
    # is −inf, the first offset inside the input, lead − o·stride for window o.
    for o in range(min(count, -(-lead // stride))):
        at = _axis_view(out, axis, o, 1, 1)
        _axis_view(winner, axis, o, 1, 1)[at == -xp.inf] = lead - o * stride
    # A NaN window ends with winner = kernel − 1 (NaN ≠ NaN everywhere): give it its last NaN.
    # Host arrays skip this when there is no NaN; on a device, asking would synchronize it
    # once per pool (a host read), so the masked writes always run there.
    is_nan = out != out
    if not backend.is_host_array(out) or bool(is_nan.any()):
        for i, view in enumerate(views):  # ascending: the last NaN is written last
            winner[is_nan & (view != view)] = i
    return out


def _max_along_backward(g_out, winner, axis: int, kernel: int, stride: int, size: int, out=None):
    """Gradient of :func:`_max_along` with respect to its input (``size`` long along ``axis``), into ``out``
    if given (else a new array, or ``g_out`` itself where the stage is the identity)."""
    count = g_out.shape[axis]
    xp = backend.get_array_module(g_out)
    if kernel == 1 and stride == 1 and size == count:
        if out is None:
            return g_out
        out[...] = g_out
        return out
    if out is None:
        shape = list(g_out.shape)
        shape[axis] = size
        out = xp.zeros(shape, dtype=g_out.dtype)
    else:
        out[...] = 0
    if kernel == 1:
        _axis_view(out, axis, 0, stride, count)[...] = g_out
        return out
    for i in range(kernel):
        _axis_view(out, axis, i, stride, count)[...] += keep_where(g_out, xp.equal, winner, i)
    return out


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False) -> Tensor:
    """Max over k×k windows (padding counts as −inf, a NaN propagates); stride defaults to the kernel size.

    ``ceil_mode``: round the output size up, as PyTorch does (see :func:`pool_output_size`).
    """
    kernel, stride, padding = _window_args("max_pool2d", x, kernel_size, stride, padding)
    return MaxPool2d(kernel, stride, padding, check_flag("ceil_mode", ceil_mode))(x)


class AvgPool2d(_Pool2d):
    """Mean over each window.

    The divisor, as PyTorch's: with ``count_include_pad`` the window's size within the
    zero-padded input (a ceil-mode window that runs past the padding counts only
    the part inside it), without it the number of real input pixels in the window.
    """

    def __init__(self, kernel, stride, padding, ceil_mode, count_include_pad):
        super().__init__(kernel, stride, padding, ceil_mode)
        self.count_include_pad = count_include_pad

    def _divisor(self, xp, dtype):
        """(Ho, Wo) number of counted pixels per window (a window sum of a 0/1 mask: only H×W-sized work)."""
        n, c, h, w = self.x_shape
        (ph, pw), (eh, ew) = self.padding, self.extra
        mask = xp.zeros((1, 1, h + 2 * ph + eh, w + 2 * pw + ew), dtype=dtype)
        if self.count_include_pad:
            mask[:, :, :h + 2 * ph, :w + 2 * pw] = 1
        else:
            mask[:, :, ph:ph + h, pw:pw + w] = 1
        total = None
        for _, window in self._windows():
            total = mask[window].copy() if total is None else total + mask[window]
        return total

    def forward(self, x):
        xp = backend.get_array_module(x)
        self._setup(x.shape)
        padded = self._padded(x, 0)
        out = None
        for _, window in self._windows():
            out = padded[window].copy() if out is None else out + padded[window]
        if self.padding == (0, 0) and self.extra == (0, 0):
            self.divisor = self.kernel[0] * self.kernel[1]
        else:
            self.divisor = self._divisor(xp, x.dtype)
        return out / self.divisor

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        share = gy / self.divisor
        grad = self._gradient(gy.dtype, xp)
        for _, window in self._windows():
            grad[window] += share
        return self._unpad(grad)


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> Tensor:
    """Average over k×k windows; stride defaults to the kernel size.

    ``count_include_pad`` (PyTorch's default True): zero padding counts in the
    divisor; False divides by the real pixels only. ``ceil_mode`` as for max_pool2d.
    """
    kernel, stride, padding = _window_args("avg_pool2d", x, kernel_size, stride, padding)
    return AvgPool2d(kernel, stride, padding, check_flag("ceil_mode", ceil_mode),
                     check_flag("count_include_pad", count_include_pad))(x)


def check_flag(name: str, value) -> bool:
    """``value`` if it is a bool (ceil_mode, count_include_pad), else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


class GlobalAvgPool2d(Function):
    def forward(self, x):
        self.x_shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, gy):
        n, c, h, w = self.x_shape
        return backend.get_array_module(gy).broadcast_to(gy / (h * w), self.x_shape)


def global_avg_pool2d(x: Tensor) -> Tensor:
    """(N, C, H, W) → (N, C, 1, 1), the mean over each channel map."""
    if len(tuple(x.shape)) != 4:
        raise ValueError(f"global_avg_pool2d expects (N, C, H, W), got shape {tuple(x.shape)}")
    return GlobalAvgPool2d()(x)


def adaptive_avg_pool2d(x: Tensor, output_size=1) -> Tensor:
    """PyTorch's adaptive average pooling; only the global case (output 1×1) is supported."""
    if positive_pair("output_size", output_size) != (1, 1):
        raise ValueError(f"adaptive_avg_pool2d supports output_size=1 (global pooling) only, got {output_size}")
    return global_avg_pool2d(x)
