"""Per-geometry plans of "same" convs: computed once, reused, and never mixed between geometries.

The plan (shifted runs and border slices per kernel offset) is cached by kernel and
chunk shape; im2col zeroes the border columns on its private channel-first copy of the
input. Checked against an independent window reference (sliding windows + einsum).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import minibasis as mb
from minibasis import functions as F
from minibasis.functions import conv as conv_module


def reference_columns(x, kernel):
    """(C·kh·kw, N·H·W) columns of a "same" conv by explicit zero padding and windows."""
    kh, kw = kernel
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), ((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2))
    windows = sliding_window_view(padded, kernel, axis=(2, 3))  # (n, c, h, w, kh, kw)
    return windows.transpose(1, 4, 5, 0, 2, 3).reshape(c * kh * kw, n * h * w)


def test_columns_equal_the_reference_for_geometries_in_any_order():
    rng = np.random.default_rng(0)
    geometries = [((1, 3, 1, 1), (1, 3)), ((2, 2, 5, 4), (3, 3)), ((3, 1, 7, 2), (5, 3)), ((1, 2, 4, 6), (3, 5)),
                  ((2, 2, 5, 4), (5, 5)), ((2, 2, 5, 4), (3, 3)), ((1, 3, 1, 1), (1, 3))]
    for shape, kernel in geometries + geometries[::-1]:  # revisits come from the cache
        x = rng.standard_normal(shape)
        kept = x.copy()
        np.testing.assert_array_equal(conv_module.im2col(x, kernel, (1, 1), ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)),
                                      reference_columns(x, kernel))
        np.testing.assert_array_equal(x, kept)  # the input is never written (a batch of 1 is a view case)


def test_the_plan_is_built_once_per_geometry_and_reused():
    conv_module.same_plan.cache_clear()
    rng = np.random.default_rng(1)
    x = mb.tensor(rng.standard_normal((4, 3, 8, 8)), requires_grad=True)
    w = mb.tensor(rng.standard_normal((5, 3, 3, 3)), requires_grad=True)
    for _ in range(3):
        F.conv2d(x, w, padding=1).backward(np.ones((4, 5, 8, 8)))
    info = conv_module.same_plan.cache_info()
    assert info.misses == 1 and info.hits >= 5  # one geometry; forward and backward of 3 steps share it
    first = conv_module.same_plan((3, 3), 4, 8, 8)
    assert conv_module.same_plan((3, 3), 4, 8, 8) is first
    assert conv_module.same_plan((3, 3), 4, 8, 9) is not first


def test_results_do_not_depend_on_the_cache():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 6, 5))
    w = rng.standard_normal((2, 4, 3, 3))
    gy = rng.standard_normal((3, 2, 6, 5))

    def run():
        xt, wt = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
        y = F.conv2d(xt, wt, padding="same")
        y.backward(gy)
        return y.data, xt.grad.data, wt.grad.data

    conv_module.same_plan.cache_clear()
    cold = run()
    warm = run()
    for a, b in zip(cold, warm):
        np.testing.assert_array_equal(a, b)
