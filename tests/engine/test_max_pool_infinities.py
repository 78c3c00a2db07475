"""max_pool2d with −inf (and NaN, +inf) inputs: the gradient goes where PyTorch sends it.

The padding counts as −inf, so a window whose values inside the input are all −inf
ties with the padding; PyTorch's kernel never looks at the padding and gives such a
window's gradient to its first element inside the input (row-major order). The
separable pool must do the same on every path: one piece, chunks of one image on one
or two engine threads, and the device code (``--backend strict``).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import functions as F
from minibasis.functions.pooling import pool_output_size
from test_pooling_fast_paths import loop_max_pool, ours, pool_cases, pool_chunks

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py): the device code path too

INF = np.inf


def torch_max_pool(x, gy, **kwargs):
    """(output, input gradient) of PyTorch's max_pool2d, float64."""
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, **kwargs)
    yt.backward(torch.tensor(gy))
    return yt.detach().numpy(), xt.grad.numpy()


def test_an_all_minus_inf_window_in_the_left_padding_gives_its_gradient_to_the_input():
    # windows: [pad, −inf] → −inf, whose gradient belongs to x[0]; [−inf, 1] → 1; [1, pad] → 1
    x = np.array([[[[-INF, 1.0]]]])
    xt = mb.tensor(x, requires_grad=True)
    y = F.max_pool2d(xt, (1, 2), stride=1, padding=(0, 1))
    np.testing.assert_array_equal(y.numpy(), [[[[-INF, 1.0, 1.0]]]])
    y.sum().backward()
    np.testing.assert_array_equal(xt.grad.numpy(), [[[[1.0, 2.0]]]])
    np.testing.assert_array_equal(xt.grad.numpy(), torch_max_pool(x, np.ones((1, 1, 1, 3)), kernel_size=(1, 2),
                                                                  stride=1, padding=(0, 1))[1])


@pytest.mark.parametrize("kernel, stride, padding", [((3, 3), 1, 1), ((3, 3), 2, 1), ((2, 4), (1, 3), (1, 2)),
                                                     ((4, 4), 1, 2)])
def test_an_all_minus_inf_input_gives_each_window_to_its_first_input_element(kernel, stride, padding):
    """Every window ties everywhere: top-left padding windows, two-axis padding, strides that skip rows."""
    x = np.full((1, 2, 5, 6), -INF)
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding)
    ho, wo = (pool_output_size(s, k, st_, p) for s, k, st_, p in
              zip((5, 6), kernel, np.broadcast_to(stride, 2), np.broadcast_to(padding, 2)))
    gy = np.random.default_rng(0).standard_normal((1, 2, ho, wo))
    got, got_gx = ours(x, gy, **kwargs)
    want, want_gx = loop_max_pool(x, gy, kernel, tuple(np.broadcast_to(stride, 2)), tuple(np.broadcast_to(padding, 2)),
                                  False)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_gx, want_gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_gx, torch_max_pool(x, gy, **kwargs)[1], rtol=1e-12, atol=1e-12)


def infinite_input(rng, shape, minus_inf_fraction):
    """Values in {−inf, 0, 1, +inf, NaN}: ties with the padding wherever a window's inside is −inf."""
    x = rng.integers(0, 2, size=shape).astype(np.float64)
    draw = rng.random(shape)
    x[draw < minus_inf_fraction] = -INF
    x[(draw >= 0.94) & (draw < 0.97)] = INF
    x[draw >= 0.97] = np.nan
    return x


@settings(max_examples=30, deadline=None)
@given(case=pool_cases(), minus_inf_fraction=st.sampled_from([0.5, 0.8, 0.94]),
       threads=st.sampled_from([1, 2]))
def test_infinite_and_nan_inputs_match_the_loop_and_pytorch_whole_and_in_chunks(case, minus_inf_fraction, threads):
    shape, kwargs, _, seed = case
    rng = np.random.default_rng(seed)
    x = infinite_input(rng, shape, minus_inf_fraction)
    args = (kwargs["kernel_size"], kwargs["stride"], kwargs["padding"], kwargs["ceil_mode"])
    out_hw = tuple(pool_output_size(s, k, st_, p, kwargs["ceil_mode"]) for s, k, st_, p in zip(shape[2:], *args[:3]))
    gy = rng.standard_normal(shape[:2] + out_hw)
    want, want_gx = loop_max_pool(x, gy, *args)
    theirs, theirs_gx = torch_max_pool(x, gy, **kwargs)
    np.testing.assert_array_equal(want, theirs)  # the loop is PyTorch's rule
    np.testing.assert_allclose(want_gx, theirs_gx, rtol=1e-12, atol=1e-12)
    with pool_chunks(2 ** 40, 1):
        whole = ours(x, gy, **kwargs)
    with pool_chunks(1, threads):  # one image per chunk, on one or two engine threads
        chunked = ours(x, gy, **kwargs)
    for got, got_gx in (whole, chunked):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got_gx, want_gx, rtol=1e-12, atol=1e-12)
