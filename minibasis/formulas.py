"""Closed-form counts from the BasisConv paper: multiplications and learnable parameters.

Symbols (as in the paper): a convolution layer has M = ``out_channels`` filters of
size kh×kw×C (C = ``in_channels``), each a vector of dimension D = C·kh·kw; its
BasisConv replacement uses Q = ``num_basis`` fixed basis filters followed by a
1×1 convolution with M×Q learnable coefficients. The output map is Ho×Wo.

* A convolution costs M·D·Ho·Wo multiplications per image; a grouped one
  (g groups, each filter seeing C/g channels) M·(C/g)·kh·kw·Ho·Wo.
* BasisConv costs Q·D·Ho·Wo (basis stage) + M·Q·Ho·Wo (1×1 stage).
* Their ratio is Q/M + Q/D, independent of the output size; a layer with
  Q/M + Q/D ≥ 1 saves nothing.
* Learnable parameters: M·D for the convolution, M·Q for BasisConv (the basis
  is fixed), so the reduction factor is D/Q (biases aside).

Ratios are returned as :class:`fractions.Fraction` so that comparisons such as
``mult_ratio(...) < 1`` are exact; ``float(ratio)`` gives the decimal value.
These are the *formulas*; the measured counts come from ``minibasis.counting``
and are checked against these.
"""
from __future__ import annotations

from fractions import Fraction

from minibasis.checks import non_negative_int, positive_int

__all__ = [
    "kernel_hw", "filter_dim", "conv_output_size", "conv_mults", "basisconv_mults",
    "mult_ratio", "is_profitable", "learnable_params", "learnable_reduction",
    "conv_backward_mults", "basisconv_backward_mults", "stored_values_formula",
]


def kernel_hw(kernel_size) -> tuple[int, int]:
    """``kernel_size`` (an int k or a pair (kh, kw)) as the pair (kh, kw)."""
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2:
            raise ValueError(f"kernel_size must be an int or a pair (kh, kw), got {kernel_size!r}")
        return (positive_int("kernel_size[0]", kernel_size[0]),
                positive_int("kernel_size[1]", kernel_size[1]))
    k = positive_int("kernel_size", kernel_size)
    return k, k


def filter_dim(in_channels, kernel_size) -> int:
    """D = C·kh·kw, the length of one vectorized filter."""
    kh, kw = kernel_hw(kernel_size)
    return positive_int("in_channels", in_channels) * kh * kw


def conv_output_size(size, kernel_size, stride=1, padding=0, dilation=1) -> int:
    """Output length along one axis: floor((size + 2·padding − dilation·(kernel_size − 1) − 1) / stride) + 1.

    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are ints for that axis
    (a dilated kernel spans dilation·(kernel_size − 1) + 1 inputs). A ValueError
    is raised when the padded input is shorter than that span.
    """
    size = positive_int("size", size)
    kernel_size = positive_int("kernel_size", kernel_size)
    stride = positive_int("stride", stride)
    padding = non_negative_int("padding", padding)
    span = positive_int("dilation", dilation) * (kernel_size - 1) + 1
    padded = size + 2 * padding
    if padded < span:
        spans = f" (spanning {span} with dilation {dilation})" if span != kernel_size else ""
        raise ValueError(f"kernel_size {kernel_size}{spans} exceeds the padded input size {padded} "
                         f"(size {size}, padding {padding})")
    return (padded - span) // stride + 1


def conv_mults(out_channels, in_channels, kernel_size, out_h, out_w, groups=1) -> int:
    """Multiplications of one convolution per image: M·(C/g)·kh·kw·Ho·Wo (g = ``groups``; g = 1: M·D·Ho·Wo)."""
    m = positive_int("out_channels", out_channels)
    c = positive_int("in_channels", in_channels)
    g = positive_int("groups", groups)
    if c % g or m % g:
        raise ValueError(f"groups={g} must divide in_channels ({c}) and out_channels ({m})")
    d = filter_dim(c // g, kernel_size)
    return m * d * positive_int("out_h", out_h) * positive_int("out_w", out_w)


def basisconv_mults(out_channels, num_basis, in_channels, kernel_size, out_h, out_w) -> int:
    """Multiplications of one BasisConv per image: Q·D·Ho·Wo (basis) + M·Q·Ho·Wo (1×1)."""
    m = positive_int("out_channels", out_channels)
    q = positive_int("num_basis", num_basis)
    d = filter_dim(in_channels, kernel_size)
    positions = positive_int("out_h", out_h) * positive_int("out_w", out_w)
    return q * d * positions + m * q * positions


def mult_ratio(out_channels, num_basis, in_channels, kernel_size) -> Fraction:
    """BasisConv / convolution multiplications = Q/M + Q/D, exact (``float()`` it for a decimal)."""
    m = positive_int("out_channels", out_channels)
    q = positive_int("num_basis", num_basis)
    d = filter_dim(in_channels, kernel_size)
    return Fraction(q, m) + Fraction(q, d)


def is_profitable(out_channels, num_basis, filter_dim) -> bool:
    """True when BasisConv needs fewer multiplications than the convolution: Q/M + Q/D < 1.

    Arguments are M, Q and D (= C·kh·kw, see :func:`filter_dim`). The comparison is exact.
    """
    m = positive_int("out_channels", out_channels)
    q = positive_int("num_basis", num_basis)
    d = positive_int("filter_dim", filter_dim)
    return Fraction(q, m) + Fraction(q, d) < 1


def learnable_params(out_channels, in_channels, kernel_size, num_basis=None,
                     bias=False, basis_bias=False) -> int:
    """Learnable parameters of a convolution (``num_basis`` None) or of its BasisConv.

    Convolution: M·D, plus M with ``bias``. BasisConv: M·Q coefficients (the basis
    is fixed), plus M with ``bias``, plus Q with ``basis_bias`` (a bias on the basis
    stage, as in the paper's Table 3 network). A BatchNorm on the intermediate
    tensor is a separate layer and is not counted here.
    """
    m = positive_int("out_channels", out_channels)
    d = filter_dim(in_channels, kernel_size)
    bias_params = m if bias else 0
    if num_basis is None:
        if basis_bias:
            raise ValueError("basis_bias=True needs num_basis (a plain convolution has no basis stage)")
        return m * d + bias_params
    q = positive_int("num_basis", num_basis)
    return m * q + bias_params + (q if basis_bias else 0)


def learnable_reduction(in_channels, kernel_size, num_basis) -> Fraction:
    """Reduction factor of learnable weights, M·D / M·Q = D/Q, exact (biases not included)."""
    return Fraction(filter_dim(in_channels, kernel_size), positive_int("num_basis", num_basis))


# -- backward conventions and stored values (what minibasis executes; verify checks them) --
def conv_backward_mults(forward_mults: int, input_grad: bool, weight_grad: bool) -> int:
    """Backward products of a conv: one forward-sized GEMM per gradient needed (weight, input)."""
    return forward_mults * (int(input_grad) + int(weight_grad))


def basisconv_backward_mults(out_channels: int, num_basis: int, filter_dim: int, positions: int,
                             input_grad: bool, coeffs_grad: bool, intermediate_grad: bool | None = None) -> int:
    """Backward products of a BasisConv, per image (P = Ho·Wo; the fixed basis gets no gradient).

    Coefficient gradient M·Q·P when the coefficients are learned; gradient of the Q-channel
    intermediate M·Q·P when it needs one (``intermediate_grad``: the input needs a gradient, or
    a learned basis bias or BatchNorm sits before the 1×1 stage; default ``input_grad``); input
    gradient Q·D·P through the basis stage when the input needs one.
    """
    if intermediate_grad is None:
        intermediate_grad = input_grad
    stage = out_channels * num_basis * positions
    return (stage * (int(coeffs_grad) + int(intermediate_grad))
            + (num_basis * filter_dim * positions if input_grad else 0))


def stored_values_formula(out_channels: int, in_channels: int, kernel_size, num_basis: int | None = None,
                          bias: bool = False, basis_bias: bool = False) -> int:
    """Values a layer stores (parameters and buffers): M·D (+M) for a conv, Q·D + M·Q (+M, +Q) for BasisConv."""
    dim = filter_dim(in_channels, kernel_size)
    bias_values = out_channels if bias else 0
    if num_basis is None:
        return out_channels * dim + bias_values
    return num_basis * dim + out_channels * num_basis + bias_values + (num_basis if basis_bias else 0)
