"""Pooling: ceil_mode, count_include_pad=False, NaN propagation and large windows, against PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import nn
from minibasis import functions as F
from minibasis.functions.pooling import pool_output_size


def torch_pool(kind, x, gy, **kwargs):
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    pool = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    y = pool(xt, **kwargs)
    if gy is not None:
        y.backward(torch.tensor(gy))
    return y.detach().numpy(), (None if gy is None else xt.grad.numpy())


def ours(kind, x, gy, **kwargs):
    xt = mb.tensor(x, requires_grad=True)
    y = (F.max_pool2d if kind == "max" else F.avg_pool2d)(xt, **kwargs)
    if gy is not None:
        y.backward(gy)
    return y.data, (None if gy is None else xt.grad.data)


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    h = draw(st.integers(max(1, kh - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, kw - 2 * padding[1]), 9))
    kind = draw(st.sampled_from(["max", "avg"]))
    kwargs = dict(kernel_size=(kh, kw), stride=stride, padding=padding, ceil_mode=draw(st.booleans()))
    if kind == "avg":
        kwargs["count_include_pad"] = draw(st.booleans())
    return kind, (draw(st.integers(1, 2)), draw(st.integers(1, 3)), h, w), kwargs, draw(st.integers(0, 2 ** 16))


@settings(max_examples=120, deadline=None)
@given(pool_cases())
def test_pooling_matches_pytorch_forward_and_backward(case):
    kind, shape, kwargs, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)  # distinct values: no ties in max windows
    want, _ = torch_pool(kind, x, None, **kwargs)
    gy = rng.standard_normal(want.shape)
    want, want_gx = torch_pool(kind, x, gy, **kwargs)
    got, got_gx = ours(kind, x, gy, **kwargs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_gx, want_gx, rtol=1e-12, atol=1e-12)


def test_ceil_mode_adds_the_partial_window_and_drops_one_starting_in_padding():
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    assert F.max_pool2d(mb.tensor(x), 2, ceil_mode=False).shape == (1, 1, 2, 2)
    y = F.max_pool2d(mb.tensor(x), 2, ceil_mode=True)
    # by hand: windows start at 0, 2, 4; the last one holds row/column 4 only
    np.testing.assert_array_equal(y.data[0, 0], [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    # size 6, kernel 3, stride 2, padding 1: ceil(5/2) + 1 = 4 windows, the last starts at 6 < 6 + 1: kept
    assert pool_output_size(6, 3, 2, 1, ceil_mode=True) == 4
    # size 4, kernel 2, stride 2, padding 1: ceil(4/2) + 1 = 3, the last would start at 4 ≥ 4 + 1? no: kept
    assert pool_output_size(4, 2, 2, 1, ceil_mode=True) == 3
    # size 3, kernel 2, stride 2, padding 1: ceil(3/2) + 1 = 3, the last would start at 4 ≥ 3 + 1: dropped
    assert pool_output_size(3, 2, 2, 1, ceil_mode=True) == 2
    assert pool_output_size(3, 2, 2, 1, ceil_mode=False) == 2


def test_avg_without_padding_in_the_divisor():
    x = np.ones((1, 1, 3, 3))
    with_pad = F.avg_pool2d(mb.tensor(x), 3, stride=1, padding=1).data[0, 0]
    without = F.avg_pool2d(mb.tensor(x), 3, stride=1, padding=1, count_include_pad=False).data[0, 0]
    np.testing.assert_allclose(with_pad, [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9], [4 / 9, 6 / 9, 4 / 9]])
    np.testing.assert_allclose(without, np.ones((3, 3)))


def test_max_pool_window_larger_than_int16_indices():
    """Defect: argmax was int16, so a 182×182 window (33,124 offsets) raised OverflowError."""
    x = np.zeros((1, 1, 182, 182))
    x[0, 0, 181, 100] = 1.0
    xt = mb.tensor(x, requires_grad=True)
    y = F.max_pool2d(xt, 182)
    assert y.shape == (1, 1, 1, 1) and float(y.data.item()) == 1.0
    y.backward(np.ones((1, 1, 1, 1)))
    assert xt.grad.data[0, 0, 181, 100] == 1.0 and xt.grad.data.sum() == 1.0


def test_max_pool_propagates_nan_and_routes_its_gradient_like_pytorch():
    """Defect: a NaN that was not first in its window was dropped ([4, 7, 13, 15] instead of [nan, 7, 13, 15])."""
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 1, 1] = np.nan
    xt = mb.tensor(x, requires_grad=True)
    y = F.max_pool2d(xt, 2)
    np.testing.assert_array_equal(y.data.reshape(-1), [np.nan, 7, 13, 15])
    y.backward(np.ones(y.shape))
    grad = xt.grad.data[0, 0]
    assert grad[1, 1] == 1.0 and grad[0, 1] == 0 and grad[1, 0] == 0 and grad.sum() == 4.0


@pytest.mark.parametrize("nan_at", [[(0, 0)], [(1, 1)], [(0, 1), (1, 0)], [(0, 0), (1, 1)], [(2, 2), (3, 3), (2, 3)]])
def test_nan_windows_match_pytorch_exactly(nan_at):
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    for i, j in nan_at:
        x[:, :, i, j] = np.nan
    gy = np.arange(1.0, 1.0 + 2 * 2 * 2).reshape(1, 2, 2, 2)
    want, want_gx = torch_pool("max", x, gy, kernel_size=2)
    got, got_gx = ours("max", x, gy, kernel_size=2)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_gx, want_gx)
    # overlapping windows and padding too
    want, want_gx = torch_pool("max", x, np.ones((1, 2, 3, 3)), kernel_size=3, stride=2, padding=1, ceil_mode=True)
    got, got_gx = ours("max", x, np.ones((1, 2, 3, 3)), kernel_size=3, stride=2, padding=1, ceil_mode=True)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_gx, want_gx)


def test_nn_layers_take_the_modes():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 6)).astype(np.float32)
    pairs = [(nn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
             (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
              torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False))]
    for ours_layer, theirs in pairs:
        np.testing.assert_allclose(ours_layer(mb.tensor(x)).data, theirs(torch.tensor(x)).numpy(), rtol=1e-6, atol=1e-6)
    assert "ceil_mode=True" in repr(pairs[1][0]) and "count_include_pad=False" in repr(pairs[1][0])
    with pytest.raises(TypeError, match="ceil_mode"):
        nn.MaxPool2d(2, ceil_mode="yes")
    with pytest.raises(TypeError, match="count_include_pad"):
        F.avg_pool2d(mb.tensor(x), 2, count_include_pad=None)
