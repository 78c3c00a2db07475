"""Pointwise activations beyond ReLU: sigmoid, clip (ReLU6), leaky ReLU, hard sigmoid, hard swish.

They are what mobile and squeeze-and-excitation networks use (and what their ONNX
files contain). Products go through ``backend.mul`` so they are counted; selects,
comparisons, exponentials and divisions are not multiplications. Counts for an
input of n elements (backward: for the input's gradient):

=============  ==================  ==========================================
op             forward mults       backward mults
=============  ==================  ==========================================
sigmoid        0                   2n   (gy·y·(1 − y))
clip           0                   0    (a select)
leaky_relu     n  (α·x)            n    (gy·α)
hard_sigmoid   n  (α·x)            n    (gy·α)
hard_swish     2n (α·x, x·h(x))    n    (gy·d, d = h(x) + α·x on the ramp, h(x) off it)
=============  ==================  ==========================================
"""
from __future__ import annotations

import numbers

from minibasis import backend
from minibasis.autograd import Function, Tensor

__all__ = ["sigmoid", "clip", "leaky_relu", "hard_sigmoid", "hard_swish"]


def _xp(a):
    return backend.get_array_module(a)


def _scalar(x, value: float):
    return x.dtype.type(value)


class Sigmoid(Function):
    def forward(self, x):
        xp = _xp(x)
        # 1/(1 + e^(−x)) overflows e^(−x) for very negative x: use e^x/(1 + e^x) there.
        e = xp.exp(-xp.abs(x))
        self.y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        return self.y

    def backward(self, gy):
        return backend.mul(backend.mul(gy, self.y), 1 - self.y)


class Clip(Function):
    def __init__(self, low, high):
        self.low, self.high = low, high

    def forward(self, x):
        self.x = x
        return _xp(x).clip(x, self.low, self.high).astype(x.dtype, copy=False)

    def backward(self, gy):
        xp = _xp(gy)
        inside = xp.ones(gy.shape, dtype=bool)
        if self.low is not None:
            inside &= self.x >= self.low
        if self.high is not None:
            inside &= self.x <= self.high
        return xp.where(inside, gy, 0).astype(gy.dtype, copy=False)


class LeakyReLU(Function):
    def __init__(self, alpha: float):
        self.alpha = alpha

    def forward(self, x):
        self.x = x
        scaled = backend.mul(x, _scalar(x, self.alpha))
        return _xp(x).where(x > 0, x, scaled)

    def backward(self, gy):
        scaled = backend.mul(gy, _scalar(gy, self.alpha))
        return _xp(gy).where(self.x > 0, gy, scaled)


class HardSigmoid(Function):
    """max(0, min(1, α·x + β))."""

    def __init__(self, alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        self.z = backend.mul(x, _scalar(x, self.alpha)) + _scalar(x, self.beta)
        return _xp(x).clip(self.z, 0, 1).astype(x.dtype, copy=False)

    def backward(self, gy):
        xp = _xp(gy)
        scaled = backend.mul(gy, _scalar(gy, self.alpha))
        return xp.where((self.z > 0) & (self.z < 1), scaled, 0).astype(gy.dtype, copy=False)


class HardSwish(Function):
    """x · max(0, min(1, α·x + β)) (ONNX: α = 1/6, β = 1/2)."""

    def __init__(self, alpha: float = 1 / 6, beta: float = 0.5):
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        xp = _xp(x)
        self.ax = backend.mul(x, _scalar(x, self.alpha))
        self.z = self.ax + _scalar(x, self.beta)
        self.h = xp.clip(self.z, 0, 1).astype(x.dtype, copy=False)
        return backend.mul(x, self.h)

    def backward(self, gy):
        xp = _xp(gy)
        # d/dx x·h(x) = h(x) + α·x on the ramp (0 < z < 1), h(x) (0 or 1) off it.
        ramp = (self.z > 0) & (self.z < 1)
        return backend.mul(gy, xp.where(ramp, self.h + self.ax, self.h).astype(gy.dtype, copy=False))


def _number(who: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    return float(value)


def sigmoid(x: Tensor) -> Tensor:
    """1/(1 + e^(−x)), elementwise."""
    return Sigmoid()(x)


def clip(x: Tensor, low: float | None = None, high: float | None = None) -> Tensor:
    """Elementwise min(max(x, low), high); ``None`` leaves that side open (ReLU6 is clip(x, 0, 6))."""
    low = None if low is None else _number("clip", "low", low)
    high = None if high is None else _number("clip", "high", high)
    if low is not None and high is not None and low > high:
        raise ValueError(f"clip: low {low} is above high {high}")
    return Clip(low, high)(x)


def leaky_relu(x: Tensor, alpha: float = 0.01) -> Tensor:
    """x where x > 0, α·x elsewhere."""
    return LeakyReLU(_number("leaky_relu", "alpha", alpha))(x)


def hard_sigmoid(x: Tensor, alpha: float = 0.2, beta: float = 0.5) -> Tensor:
    """max(0, min(1, α·x + β)) (ONNX's defaults; PyTorch's hardsigmoid is α = 1/6)."""
    return HardSigmoid(_number("hard_sigmoid", "alpha", alpha), _number("hard_sigmoid", "beta", beta))(x)


def hard_swish(x: Tensor) -> Tensor:
    """x · hard_sigmoid(x; α = 1/6, β = 1/2) (PyTorch's and ONNX's hardswish)."""
    return HardSwish()(x)
