"""The separable max pool (1-D max along W, then along H) against a window-by-window loop and PyTorch.

Inputs with many ties (small integers) and NaNs: the winner of each window must be
PyTorch's (``val > max || isnan(val)`` in row-major order: the first maximum, or the
last NaN), for the common windows (2×2/2, 3×3/2 overlapping, global) and odd ones
(padding, ceil mode, kernel 1 along an axis, stride > kernel).
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import backend
from minibasis import functions as F
from minibasis.functions.pooling import pool_output_size

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py): the device code path too


def loop_max_pool(x, gy, kernel, stride, padding, ceil_mode):
    """PyTorch's CPU kernel, one window at a time: (output, input gradient for output gradient gy)."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (pool_output_size(s, k, st_, p, ceil_mode) for s, k, st_, p in zip((h, w), kernel, stride, padding))
    out = np.empty((n, c, ho, wo))
    grad = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    best, where = -np.inf, None
                    for di in range(kh):
                        for dj in range(kw):
                            r, s = i * sh - ph + di, j * sw - pw + dj
                            if not (0 <= r < h and 0 <= s < w):
                                continue
                            value = x[b, ch, r, s]
                            if where is None:
                                where = (r, s)
                            if value > best or np.isnan(value):
                                best, where = value, (r, s)
                    out[b, ch, i, j] = best
                    grad[b, ch][where] += gy[b, ch, i, j]
    return out, grad


def ours(x, gy, **kwargs):
    """(output, input gradient) as host arrays; x and gy are host arrays copied to the backend under test."""
    xt = mb.tensor(x, requires_grad=True)
    y = F.max_pool2d(xt, **kwargs)
    y.backward(mb.tensor(gy))
    return y.numpy(), xt.grad.numpy()


def tied_input(rng, shape, nan_fraction):
    x = rng.integers(0, 3, size=shape).astype(np.float64)  # three values: ties in almost every window
    x[rng.random(shape) < nan_fraction] = np.nan
    return x


@pytest.mark.parametrize("kernel, stride, size", [(2, 2, 8), (3, 2, 9), (3, 2, 8), (6, 6, 6), (7, 7, 7)])
@pytest.mark.parametrize("nan_fraction", [0.0, 0.15])
def test_common_windows_match_the_loop_with_ties_and_nans(kernel, stride, size, nan_fraction):
    rng = np.random.default_rng(kernel * 100 + size)
    x = tied_input(rng, (2, 3, size, size), nan_fraction)
    out_shape = (2, 3) + (pool_output_size(size, kernel, stride, 0),) * 2
    gy = rng.standard_normal(out_shape)
    want, want_gx = loop_max_pool(x, gy, (kernel, kernel), (stride, stride), (0, 0), False)
    got, got_gx = ours(x, gy, kernel_size=kernel, stride=stride)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_gx, want_gx, rtol=1e-12, atol=1e-12)


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))  # stride > kernel too: gaps between windows
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    h = draw(st.integers(max(1, kh - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, kw - 2 * padding[1]), 9))
    kwargs = dict(kernel_size=(kh, kw), stride=stride, padding=padding, ceil_mode=draw(st.booleans()))
    return (draw(st.integers(1, 2)), 2, h, w), kwargs, draw(st.sampled_from([0.0, 0.1, 0.3])), draw(st.integers(0, 2 ** 16))


@settings(max_examples=50, deadline=None)
@given(pool_cases())
def test_any_window_matches_the_loop_and_pytorch(case):
    shape, kwargs, nan_fraction, seed = case
    rng = np.random.default_rng(seed)
    x = tied_input(rng, shape, nan_fraction)
    args = (kwargs["kernel_size"], kwargs["stride"], kwargs["padding"], kwargs["ceil_mode"])
    out_hw = tuple(pool_output_size(s, k, st_, p, kwargs["ceil_mode"])
                   for s, k, st_, p in zip(shape[2:], *args[:3]))
    gy = rng.standard_normal(shape[:2] + out_hw)
    want, want_gx = loop_max_pool(x, gy, *args)
    got, got_gx = ours(x, gy, **kwargs)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_gx, want_gx, rtol=1e-12, atol=1e-12)
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, **kwargs)
    yt.backward(torch.tensor(gy))
    np.testing.assert_array_equal(got, yt.detach().numpy())
    np.testing.assert_allclose(got_gx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_kernel_one_output_does_not_alias_the_input():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    xt = mb.tensor(x, requires_grad=True)
    y = F.max_pool2d(xt, 1)
    y.data[...] = -1.0
    np.testing.assert_array_equal(xt.numpy(), x)
    y2 = F.max_pool2d(xt, 1)
    y2.backward(mb.tensor(np.ones((1, 1, 4, 4))))
    np.testing.assert_array_equal(xt.grad.numpy(), np.ones((1, 1, 4, 4)))


def test_float32_network_shapes_match_pytorch():
    """The Table 3 pool (3×3/2 on 32×32, 15×15, 7×7) and a VGG pool (2×2/2), float32, tied ReLU zeros."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for shape, k, s in [((4, 8, 32, 32), 3, 2), ((4, 8, 15, 15), 3, 2), ((4, 8, 7, 7), 3, 2), ((4, 8, 16, 16), 2, 2)]:
        x = np.maximum(rng.standard_normal(shape, dtype=np.float32), 0)  # many exact zeros
        xt = torch.tensor(x, requires_grad=True)
        yt = torch.nn.functional.max_pool2d(xt, k, s)
        gy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
        yt.backward(torch.tensor(gy))
        got, got_gx = ours(x, gy, kernel_size=k, stride=s)
        np.testing.assert_array_equal(got, yt.detach().numpy())
        np.testing.assert_allclose(got_gx, xt.grad.numpy(), rtol=1e-6, atol=1e-6)


@contextlib.contextmanager
def pool_chunks(num_bytes, threads):
    """MAX_POOL_CHUNK_BYTES and the engine threads set for the block; the stage calls counted in the list yielded."""
    from minibasis.functions import pooling
    calls, original = [], pooling._max_along
    saved_bytes, pooling.MAX_POOL_CHUNK_BYTES = pooling.MAX_POOL_CHUNK_BYTES, num_bytes
    pooling._max_along = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    previous = mb.set_num_threads(threads)
    try:
        yield calls
    finally:
        mb.set_num_threads(previous)
        pooling._max_along, pooling.MAX_POOL_CHUNK_BYTES = original, saved_bytes


@settings(max_examples=30, deadline=None)
@given(case=pool_cases(), batch=st.integers(1, 5), threads=st.sampled_from([1, 2]))
def test_chunks_and_threads_change_no_bit(case, batch, threads):
    """One image per chunk, on one or two engine threads: output and gradient bitwise those of one piece."""
    shape, kwargs, nan_fraction, seed = case
    shape = (batch,) + shape[1:]
    rng = np.random.default_rng(seed)
    x = tied_input(rng, shape, nan_fraction)
    args = (kwargs["kernel_size"], kwargs["stride"], kwargs["padding"], kwargs["ceil_mode"])
    out_hw = tuple(pool_output_size(s, k, st_, p, kwargs["ceil_mode"]) for s, k, st_, p in zip(shape[2:], *args[:3]))
    gy = rng.standard_normal(shape[:2] + out_hw)
    with pool_chunks(2 ** 40, 1) as calls:
        whole = ours(x, gy, **kwargs)
    assert len(calls) == 2  # one piece: two stages
    with pool_chunks(1, threads) as calls:
        chunked = ours(x, gy, **kwargs)
    on_host = backend.is_host_array(mb.tensor(x).data)
    assert len(calls) == 2 * (batch if on_host else 1)  # two stages per image; a device array in one piece
    for got, want in zip(chunked, whole):
        np.testing.assert_array_equal(got, want)
    want, want_gx = loop_max_pool(x, gy, *args)
    np.testing.assert_array_equal(chunked[0], want)
    np.testing.assert_allclose(chunked[1], want_gx, rtol=1e-12, atol=1e-12)
