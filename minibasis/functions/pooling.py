"""Max and average pooling over k×k windows, and global average pooling.

Both window pools loop over the kh·kw offsets of the window with strided slices
(one pass per offset over the output), like :func:`minibasis.functions.conv.im2col`,
so overlapping windows (the paper's 3×3 stride-2 pool) need no scatter. No
multiplications: max pooling compares, average pooling adds and divides.
"""
from __future__ import annotations

from minibasis import backend
from minibasis.autograd import Function, Tensor
from minibasis.checks import non_negative_pair, positive_pair
from minibasis.functions.conv import conv_output_shape

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "global_avg_pool2d"]


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


def _padded(x, padding, value):
    ph, pw = padding
    if not (ph or pw):
        return x
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * ph, w + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def _windows(kernel, stride, out_hw):
    """(offset index, slice into the padded input) for every kernel offset."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, (slice(None), slice(None), slice(i, i + sh * ho, sh), slice(j, j + sw * wo, sw))


def _unpad(g, padding, h, w):
    ph, pw = padding
    return g[:, :, ph:ph + h, pw:pw + w] if (ph or pw) else g


class MaxPool2d(Function):
    def __init__(self, kernel, stride, padding):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        xp = backend.get_array_module(x)
        n, c, h, w = x.shape
        self.x_shape = x.shape
        out_hw = conv_output_shape(h, w, self.kernel, self.stride, self.padding)
        padded = _padded(x, self.padding, -xp.inf)
        out = argmax = None
        for index, window in _windows(self.kernel, self.stride, out_hw):
            values = padded[window]
            if out is None:
                out = values.copy()
                argmax = xp.zeros(out.shape, dtype=xp.int16)
            else:
                better = values > out  # strict: the first maximum wins, as in PyTorch
                out = xp.where(better, values, out)
                argmax[better] = index
        self.argmax, self.out_hw = argmax, out_hw
        return out

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        n, c, h, w = self.x_shape
        ph, pw = self.padding
        grad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=gy.dtype)
        for index, window in _windows(self.kernel, self.stride, self.out_hw):
            grad[window] += xp.where(self.argmax == index, gy, 0)
        return _unpad(grad, self.padding, h, w)


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """Max over k×k windows (padding counts as −inf); stride defaults to the kernel size."""
    kernel, stride, padding = _window_args("max_pool2d", x, kernel_size, stride, padding)
    return MaxPool2d(kernel, stride, padding)(x)


class AvgPool2d(Function):
    """Mean over each window, zero padding included in the divisor (PyTorch's default)."""

    def __init__(self, kernel, stride, padding):
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        n, c, h, w = x.shape
        self.x_shape = x.shape
        self.out_hw = conv_output_shape(h, w, self.kernel, self.stride, self.padding)
        padded = _padded(x, self.padding, 0)
        out = None
        for _, window in _windows(self.kernel, self.stride, self.out_hw):
            out = padded[window].copy() if out is None else out + padded[window]
        return out / (self.kernel[0] * self.kernel[1])

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        n, c, h, w = self.x_shape
        ph, pw = self.padding
        share = gy / (self.kernel[0] * self.kernel[1])
        grad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=gy.dtype)
        for _, window in _windows(self.kernel, self.stride, self.out_hw):
            grad[window] += share
        return _unpad(grad, self.padding, h, w)


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    """Average over k×k windows; stride defaults to the kernel size."""
    kernel, stride, padding = _window_args("avg_pool2d", x, kernel_size, stride, padding)
    return AvgPool2d(kernel, stride, padding)(x)


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
