"""conv2d: forward and backward against a direct-loop reference, gradcheck, chunked processing.

The reference (tests/reference.py) computes every output position as an explicit
window-times-filter sum, with no im2col and no GEMM.
"""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings

import minibasis as mb
from minibasis import functions as F
from minibasis.functions import conv as conv_module
from reference import conv2d_direct, conv2d_direct_grads, output_positions, window_geometry

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)


def conv_case(g, with_bias=True):
    rng = np.random.default_rng(g["seed"])
    x = rng.standard_normal((g["batch"], g["channels"], g["height"], g["width"]))
    w = rng.standard_normal((g["out_channels"], g["channels"], g["kernel"], g["kernel"]))
    b = rng.standard_normal(g["out_channels"]) if with_bias else None
    return x, w, b


def run_conv(x, w, b, stride, padding, grad_out=None):
    """Forward (and backward with ``grad_out``) through minibasis; returns y and (gx, gw, gb)."""
    xt, wt = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
    bt = mb.tensor(b, requires_grad=True) if b is not None else None
    y = F.conv2d(xt, wt, bt, stride=stride, padding=padding)
    if grad_out is None:
        return y.numpy(), None
    y.backward(mb.tensor(grad_out))
    return y.numpy(), (xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy() if bt is not None else None)


@pytest.fixture
def restore_budget():
    previous = conv_module.IM2COL_BUDGET_BYTES
    yield
    conv_module.set_im2col_budget(previous)


@settings(max_examples=40, deadline=None)
@given(window_geometry(max_batch=3, max_channels=3, max_out_channels=3))
def test_forward_matches_direct_loops(g):
    x, w, b = conv_case(g)
    y, _ = run_conv(x, w, b, g["stride"], g["padding"])
    expected = conv2d_direct(x, w, b, g["stride"], g["padding"])
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(window_geometry(max_batch=3, max_channels=3, max_out_channels=3))
def test_backward_matches_direct_loops(g):
    x, w, b = conv_case(g)
    ho = output_positions(g["height"], g["kernel"], g["stride"], g["padding"])
    wo = output_positions(g["width"], g["kernel"], g["stride"], g["padding"])
    grad_out = np.random.default_rng(g["seed"] + 1).standard_normal((g["batch"], g["out_channels"], ho, wo))
    _, (gx, gw, gb) = run_conv(x, w, b, g["stride"], g["padding"], grad_out)
    ex, ew, eb = conv2d_direct_grads(x, w, grad_out, g["stride"], g["padding"])
    np.testing.assert_allclose(gx, ex, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gw, ew, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gb, eb, rtol=0, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(window_geometry())
def test_gradcheck(g):
    x, w, b = conv_case(g)
    stride, padding = g["stride"], g["padding"]
    assert mb.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=stride, padding=padding), [x, w, b])


def test_gradcheck_without_bias_rectangular_kernel_and_pair_arguments():
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 2, 7, 6)), rng.standard_normal((3, 2, 3, 2))
    fn = lambda x, w: F.conv2d(x, w, stride=(2, 1), padding=(1, 0))  # noqa: E731
    assert mb.gradcheck(fn, [x, w])
    expected = np.zeros((2, 3, 4, 5))  # rows (7 + 2 − 3) // 2 + 1 = 4, cols (6 − 2) // 1 + 1 = 5
    for i in range(4):
        for j in range(5):
            window = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))[:, :, 2 * i:2 * i + 3, j:j + 2]
            expected[:, :, i, j] = np.einsum("nckl,mckl->nm", window, w)
    np.testing.assert_allclose(fn(mb.tensor(x), mb.tensor(w)).numpy(), expected, atol=1e-12)


def test_pointwise_fast_path_matches_reference():
    """1×1 stride-1 unpadded convs skip im2col; they must still equal the definition."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((3, 4, 5, 6)), rng.standard_normal((2, 4, 1, 1)), rng.standard_normal(2)
    grad_out = rng.standard_normal((3, 2, 5, 6))
    y, (gx, gw, gb) = run_conv(x, w, b, 1, 0, grad_out)
    np.testing.assert_allclose(y, conv2d_direct(x, w, b), atol=1e-12)
    for got, want in zip((gx, gw, gb), conv2d_direct_grads(x, w, grad_out)):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_float32_stays_float32_and_close_to_reference():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = F.conv2d(mb.tensor(x), mb.tensor(w), padding=1)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.numpy(), conv2d_direct(x.astype(np.float64), w.astype(np.float64), padding=1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget_samples", [1, 2, 3])
@pytest.mark.parametrize("geometry", [(3, 1, 1), (1, 1, 0), (5, 2, 2), (2, 3, 0)])
def test_chunked_processing_gives_the_same_result(restore_budget, budget_samples, geometry):
    """A tiny im2col budget forces the batch through in chunks (also uneven ones): same forward, same grads."""
    kernel, stride, padding = geometry
    rng = np.random.default_rng(7)
    n, c, m, h = 7, 2, 3, 9
    x, w, b = rng.standard_normal((n, c, h, h)), rng.standard_normal((m, c, kernel, kernel)), rng.standard_normal(m)
    ho = output_positions(h, kernel, stride, padding)
    grad_out = rng.standard_normal((n, m, ho, ho))
    whole_y, whole_grads = run_conv(x, w, b, stride, padding, grad_out)
    per_sample_bytes = c * kernel * kernel * ho * ho * 8
    conv_module.set_im2col_budget(budget_samples * per_sample_bytes)
    chunk_y, chunk_grads = run_conv(x, w, b, stride, padding, grad_out)
    np.testing.assert_allclose(chunk_y, whole_y, rtol=0, atol=1e-12)
    for got, want in zip(chunk_grads, whole_grads):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunk_y, conv2d_direct(x, w, b, stride, padding), rtol=0, atol=1e-10)
    for got, want in zip(chunk_grads, conv2d_direct_grads(x, w, grad_out, stride, padding)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_set_im2col_budget_returns_previous_and_rejects_nonpositive(restore_budget):
    previous = conv_module.IM2COL_BUDGET_BYTES
    assert conv_module.set_im2col_budget(1234) == previous
    assert conv_module.IM2COL_BUDGET_BYTES == 1234
    with pytest.raises(ValueError, match="positive"):
        conv_module.set_im2col_budget(0)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_chunked_processing_stays_within_the_budget(restore_budget, phase, on_backend):
    """Under a small budget neither forward nor backward builds a whole-batch column buffer."""
    on_backend.require_host_memory("tracemalloc")
    rng = np.random.default_rng(0)
    n, c, m, h, k = 16, 8, 4, 16, 3
    x = mb.tensor(rng.standard_normal((n, c, h, h)), requires_grad=True)
    w = mb.tensor(rng.standard_normal((m, c, k, k)), requires_grad=True)
    whole_columns = n * c * k * k * h * h * 8  # (N, D, P) float64 with padding 1: 2.4 MB
    conv_module.set_im2col_budget(whole_columns // 8)
    tracemalloc.start()
    try:
        y = F.conv2d(x, w, padding=1)
        grad = np.ones(y.shape)
        if phase == "backward":
            tracemalloc.reset_peak()
            y.backward(mb.tensor(grad))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole_columns / 2, f"{phase} peak {peak} bytes; the whole column buffer is {whole_columns}"
