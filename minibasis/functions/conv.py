"""2-D convolution by im2col + GEMM, backward by GEMM + col2im.

Layouts (NCHW, PyTorch's): x (N, C, H, W), weight (M, C, kh, kw), bias (M,),
output (N, M, Ho, Wo) with Ho = (H + 2·ph − kh) // sh + 1.

The column buffer is (N, D, P) with D = C·kh·kw in (C, kh, kw) order (the order
of ``weight.reshape(M, D)`` rows, which ``minibasis.basis`` relies on) and
P = Ho·Wo, so one batched GEMM ``W (M, D) @ col (N, D, P)`` writes the output
directly in NCHW with no transpose. A 1×1 stride-1 unpadded conv needs no
column buffer at all: ``x.reshape(N, C, H·W)`` already is one.

Multiplications recorded (all under op ``conv2d``, which counts as convolution):

* forward: N·M·D·P (the GEMM);
* backward: N·M·P·D for the weight gradient when the weight requires grad, plus
  N·D·M·P for the input gradient when the input requires grad. So a backward
  that needs both costs exactly twice the forward; the bias gradient is a sum.

Memory: when the column buffer of the whole batch would exceed
``IM2COL_BUDGET_BYTES``, the batch is processed in chunks (the same result);
backward then rebuilds each chunk's columns instead of keeping them.
"""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Function, Tensor

__all__ = ["conv2d", "Conv2dFunction", "im2col", "col2im", "conv_output_shape", "set_im2col_budget",
           "IM2COL_BUDGET_BYTES"]

#: Largest column buffer built at once (bytes); larger batches are processed in chunks.
IM2COL_BUDGET_BYTES = 256 * 2 ** 20


def set_im2col_budget(num_bytes: int) -> int:
    """Set the column-buffer budget in bytes; returns the previous value."""
    global IM2COL_BUDGET_BYTES
    if int(num_bytes) <= 0:
        raise ValueError(f"im2col budget must be a positive number of bytes, got {num_bytes}")
    previous, IM2COL_BUDGET_BYTES = IM2COL_BUDGET_BYTES, int(num_bytes)
    return previous


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


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


def im2col(x, kernel: tuple, stride: tuple, padding: tuple):
    """Columns (N, C·kh·kw, Ho·Wo) of ``x`` (N, C, H, W); a view when the conv is pointwise."""
    n, c, h, w = x.shape
    if _is_pointwise(kernel, stride, padding):
        return x.reshape(n, c, h * w)
    kh, kw = kernel
    sh, sw = stride
    ho, wo = conv_output_shape(h, w, kernel, stride, padding)
    xp = backend.get_array_module(x)
    padded = _pad_spatial(x, padding)
    col = xp.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    # k² strided copies (Chainer's im2col_cpu): no fancy indexing, same code on any backend.
    for i in range(kh):
        for j in range(kw):
            col[:, :, i, j] = padded[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw]
    return col.reshape(n, c * kh * kw, ho * wo)


def col2im(col, x_shape: tuple, kernel: tuple, stride: tuple, padding: tuple):
    """Adjoint of :func:`im2col`: sum column entries back into an (N, C, H, W) array.

    Accumulates over the kh·kw kernel offsets with strided slice additions, so no
    scatter (``add.at``) is needed even where windows overlap.
    """
    n, c, h, w = x_shape
    if _is_pointwise(kernel, stride, padding):
        return col.reshape(n, c, h, w)
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    ho, wo = conv_output_shape(h, w, kernel, stride, padding)
    xp = backend.get_array_module(col)
    col = col.reshape(n, c, kh, kw, ho, wo)
    out = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += col[:, :, i, j]
    return out[:, :, ph:ph + h, pw:pw + w] if (ph or pw) else out


def _chunk_size(n: int, per_sample_bytes: int) -> int:
    return max(1, min(n, IM2COL_BUDGET_BYTES // max(per_sample_bytes, 1)))


class Conv2dFunction(Function):
    """conv2d(x, weight[, bias]); see the module docstring for layouts and counts."""

    name = "conv2d"
    is_conv = True

    def __init__(self, stride: tuple, padding: tuple):
        self.stride, self.padding = stride, padding

    def forward(self, x, weight, bias=None):
        n, c, h, w = x.shape
        m, _, kh, kw = weight.shape
        self.kernel = (kh, kw)
        ho, wo = conv_output_shape(h, w, self.kernel, self.stride, self.padding)
        w2 = weight.reshape(m, -1)
        self.x_shape, self.w2 = x.shape, w2
        per_sample = c * kh * kw * ho * wo * x.dtype.itemsize
        step = _chunk_size(n, per_sample)
        keep_col = self.needs_input_grad[1] and step == n
        xp = backend.get_array_module(x)
        if step == n:
            col = im2col(x, self.kernel, self.stride, self.padding)
            y = backend.matmul(w2, col)
        else:
            col = None
            y = xp.empty((n, m, ho * wo), dtype=x.dtype)
            for start in range(0, n, step):
                part = im2col(x[start:start + step], self.kernel, self.stride, self.padding)
                backend.matmul(w2, part, out=y[start:start + step])
        # Keep the columns when they fit; otherwise backward rebuilds them chunk by chunk from x.
        self.col = col if keep_col else None
        self.x = x if (self.needs_input_grad[1] and not keep_col) else None
        self.step = step
        y = y.reshape(n, m, ho, wo)
        if bias is not None:
            y += bias.reshape(1, m, 1, 1)
        return y

    def backward(self, gy):
        n, m = gy.shape[:2]
        gy3 = gy.reshape(n, m, -1)
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        need_b = len(self.needs_input_grad) > 2 and self.needs_input_grad[2]
        gx = gw = gb = None
        if need_w:
            gw = self._weight_grad(gy3).reshape(m, *self.x_shape[1:2], *self.kernel)
        if need_x and self.step == n:
            gcol = backend.matmul(self.w2.T, gy3)
            gx = col2im(gcol, self.x_shape, self.kernel, self.stride, self.padding)
        elif need_x:
            # Chunked like forward, so the column gradient never exceeds the im2col budget.
            gx = backend.get_array_module(gy).empty(self.x_shape, dtype=gy.dtype)
            for start in range(0, n, self.step):
                gcol = backend.matmul(self.w2.T, gy3[start:start + self.step])
                gx[start:start + self.step] = col2im(gcol, (gcol.shape[0],) + tuple(self.x_shape[1:]),
                                                     self.kernel, self.stride, self.padding)
        if need_b:
            gb = gy.sum(axis=(0, 2, 3))
        return (gx, gw, gb) if len(self.needs_input_grad) > 2 else (gx, gw)

    def _weight_grad(self, gy3):
        """Σ_n gy[n] (M, P) @ col[n]ᵀ (P, D) → (M, D)."""
        if self.col is not None:
            return backend.matmul(gy3, self.col.transpose(0, 2, 1)).sum(axis=0)
        total = None
        for start in range(0, gy3.shape[0], self.step):
            part = im2col(self.x[start:start + self.step], self.kernel, self.stride, self.padding)
            g = backend.matmul(gy3[start:start + self.step], part.transpose(0, 2, 1)).sum(axis=0)
            total = g if total is None else total + g
        return total


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation (PyTorch's conv2d): x (N, C, H, W), weight (M, C, kh, kw) → (N, M, Ho, Wo)."""
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
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
