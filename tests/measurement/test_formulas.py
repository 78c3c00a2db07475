"""minibasis.formulas against counts made by enumeration and against the paper's numbers."""
from fractions import Fraction
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minibasis import formulas


class Counter:
    def __init__(self):
        self.mults = 0


class CountingNumber:
    """A float that counts every multiplication it takes part in."""

    def __init__(self, value, counter):
        self.value, self.counter = float(value), counter

    def __mul__(self, other):
        self.counter.mults += 1
        return CountingNumber(self.value * other.value, self.counter)

    def __add__(self, other):
        other_value = other.value if isinstance(other, CountingNumber) else other
        return CountingNumber(self.value + other_value, self.counter)

    __radd__ = __add__


def naive_conv(x, w, stride, counter):
    """Unpadded cross-correlation by explicit loops over nested lists (C, H, W); counts multiplications."""
    c_in, h, wd = len(x), len(x[0]), len(x[0][0])
    m, kh, kw = len(w), len(w[0][0]), len(w[0][0][0])
    out = [[[None] * ((wd - kw) // stride + 1) for _ in range((h - kh) // stride + 1)] for _ in range(m)]
    for f in range(m):
        for oy, top in enumerate(range(0, h - kh + 1, stride)):
            for ox, left in enumerate(range(0, wd - kw + 1, stride)):
                acc = 0.0
                for c, i, j in itertools.product(range(c_in), range(kh), range(kw)):
                    acc = acc + CountingNumber(x[c][top + i][left + j], counter) * CountingNumber(w[f][c][i][j], counter)
                out[f][oy][ox] = acc.value
    return np.array(out)


small = st.integers(1, 3)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 12), k=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 2))
def test_conv_output_size_counts_window_positions(size, k, stride, padding):
    starts = [s for s in range(0, size + 2 * padding) if s % stride == 0 and s + k <= size + 2 * padding]
    if not starts:
        with pytest.raises(ValueError, match="exceeds the padded input size"):
            formulas.conv_output_size(size, k, stride, padding)
    else:
        assert formulas.conv_output_size(size, k, stride, padding) == len(starts)


def test_conv_output_size_matches_torch():
    torch = pytest.importorskip("torch")
    for size, k, stride, padding in [(32, 3, 1, 1), (32, 5, 1, 2), (15, 3, 2, 0), (7, 3, 2, 1), (31, 3, 2, 0)]:
        out = torch.nn.functional.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k),
                                         stride=stride, padding=padding)
        assert formulas.conv_output_size(size, k, stride, padding) == out.shape[-1]


@settings(max_examples=30, deadline=None)
@given(m=small, q=small, c=small, kh=small, kw=small, h=st.integers(3, 6), w=st.integers(3, 6),
       stride=st.integers(1, 2), seed=st.integers(0, 2**31))
def test_mult_counts_equal_counted_naive_convolutions(m, q, c, kh, kw, h, w, stride, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c, h, w))
    basis = rng.standard_normal((q, c, kh, kw))
    coeffs = rng.standard_normal((m, q, 1, 1))
    weight = np.einsum("mq,qcij->mcij", coeffs[:, :, 0, 0], basis)
    ho = formulas.conv_output_size(h, kh, stride)
    wo = formulas.conv_output_size(w, kw, stride)

    direct = Counter()
    y_direct = naive_conv(x.tolist(), weight.tolist(), stride, direct)
    staged = Counter()
    g = naive_conv(x.tolist(), basis.tolist(), stride, staged)
    y_basis = naive_conv(g.tolist(), coeffs.tolist(), 1, staged)

    # The two-stage construct computes the same map (linearity), so the counts compare like with like.
    np.testing.assert_allclose(y_basis, y_direct, rtol=1e-10, atol=1e-10)
    assert y_direct.shape == (m, ho, wo)
    assert formulas.conv_mults(m, c, (kh, kw), ho, wo) == direct.mults
    assert formulas.basisconv_mults(m, q, c, (kh, kw), ho, wo) == staged.mults
    assert formulas.mult_ratio(m, q, c, (kh, kw)) == Fraction(staged.mults, direct.mults)


def test_square_kernel_int_equals_pair():
    assert formulas.conv_mults(8, 3, 3, 5, 7) == formulas.conv_mults(8, 3, (3, 3), 5, 7) == 8 * 27 * 35
    assert formulas.filter_dim(4, (2, 5)) == 40


def test_mult_ratio_exact_fraction():
    # Worked by hand: 32/64 + 32/(64*9) = 1/2 + 1/18 = 5/9.
    ratio = formulas.mult_ratio(64, 32, 64, 3)
    assert isinstance(ratio, Fraction)
    assert ratio == Fraction(5, 9)
    assert float(ratio) == pytest.approx(0.5555555555555556)
    # 3 -> 16 with a 3x3 kernel: Q = 16 gives 16/16 + 16/27 > 1, unprofitable.
    assert formulas.mult_ratio(16, 16, 3, 3) == Fraction(43, 27)


@settings(max_examples=50, deadline=None)
@given(m=st.integers(1, 100), q=st.integers(1, 100), d=st.integers(1, 100))
def test_is_profitable_is_exact_comparison(m, q, d):
    # Integer cross-multiplication, no floats: q/m + q/d < 1  <=>  q*d + q*m < m*d.
    assert formulas.is_profitable(m, q, d) == (q * d + q * m < m * d)


def test_is_profitable_boundary():
    # Q/M + Q/D == 1 exactly (2/4 + 2/4) saves nothing.
    assert not formulas.is_profitable(4, 2, 4)
    assert formulas.is_profitable(4, 1, 4)


def test_learnable_params_table3_network():
    # The paper's Table 3 CNN: conv 5x5 3->32, 32->32, 32->64 with biases hold 79,328
    # parameters; the BasisConv twin (Q = M, biases on both stages) holds 6,400.
    layers = [(32, 3), (32, 32), (64, 32)]
    assert sum(formulas.learnable_params(m, c, 5, bias=True) for m, c in layers) == 79_328
    assert sum(formulas.learnable_params(m, c, 5, num_basis=m, bias=True, basis_bias=True)
               for m, c in layers) == 6_400


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 20), c=st.integers(1, 8), kh=small, kw=small, q=st.integers(1, 20),
       bias=st.booleans(), basis_bias=st.booleans())
def test_learnable_params_count_array_sizes(m, c, kh, kw, q, bias, basis_bias):
    conv_arrays = [np.empty((m, c, kh, kw))] + ([np.empty(m)] if bias else [])
    assert formulas.learnable_params(m, c, (kh, kw), bias=bias) == sum(a.size for a in conv_arrays)
    basis_arrays = ([np.empty((m, q, 1, 1))] + ([np.empty(m)] if bias else [])
                    + ([np.empty(q)] if basis_bias else []))
    assert (formulas.learnable_params(m, c, (kh, kw), num_basis=q, bias=bias, basis_bias=basis_bias)
            == sum(a.size for a in basis_arrays))
    reduction = formulas.learnable_reduction(c, (kh, kw), q)
    assert isinstance(reduction, Fraction)
    assert reduction == Fraction(formulas.learnable_params(m, c, (kh, kw)),
                                 formulas.learnable_params(m, c, (kh, kw), num_basis=q))


def test_learnable_params_matches_torch_conv():
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(16, 24, (3, 5), bias=True)
    assert formulas.learnable_params(24, 16, (3, 5), bias=True) == sum(p.numel() for p in conv.parameters())


@pytest.mark.parametrize("call, message", [
    (lambda: formulas.conv_mults(0, 3, 3, 4, 4), "out_channels must be a positive integer, got 0"),
    (lambda: formulas.conv_mults(4, -1, 3, 4, 4), "in_channels must be a positive integer, got -1"),
    (lambda: formulas.conv_mults(4, 3, 2.5, 4, 4), "kernel_size must be a positive integer, got 2.5"),
    (lambda: formulas.conv_mults(4, 3, (3, 3, 3), 4, 4), r"kernel_size must be an int or a pair"),
    (lambda: formulas.conv_mults(4, 3, True, 4, 4), "kernel_size must be a positive integer, got True"),
    (lambda: formulas.basisconv_mults(4, 0, 3, 3, 4, 4), "num_basis must be a positive integer, got 0"),
    (lambda: formulas.mult_ratio(4, 2, 3, (3, 0)), r"kernel_size\[1\] must be a positive integer, got 0"),
    (lambda: formulas.conv_output_size(4, 3, stride=0), "stride must be a positive integer, got 0"),
    (lambda: formulas.conv_output_size(4, 3, padding=-1), "padding must be a non-negative integer, got -1"),
    (lambda: formulas.conv_output_size(2, 5), "kernel_size 5 exceeds the padded input size 2"),
    (lambda: formulas.learnable_params(4, 3, 3, basis_bias=True), "basis_bias=True needs num_basis"),
    (lambda: formulas.learnable_reduction(3, 3, "8"), "num_basis must be a positive integer, got '8'"),
    (lambda: formulas.is_profitable(4, 2, 0), "filter_dim must be a positive integer, got 0"),
])
def test_bad_arguments_raise_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_integers_are_accepted():
    assert formulas.conv_mults(np.int64(2), np.int32(3), np.int64(3), 4, 4) == 2 * 27 * 16
