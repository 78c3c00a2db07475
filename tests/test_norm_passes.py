"""Batch norm's chunked passes: the same results as the whole-array composition, on any thread count.

The training forward and backward go over the batch in chunks of about
``normalization.NORM_CHUNK_BYTES`` (``minibasis.chunk_sizes(norm_bytes=...)``). Checked here with
one image per chunk: against a plain NumPy composition of the formulas (float64), bitwise across
1 and 2 engine threads (chunks depend on shapes only, partial sums are added in chunk order),
float64 gradchecks, and multiplication counts equal to the closed forms at several batch sizes.
"""
import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F
from minibasis.functions import normalization
from minibasis.functions.chunking import smallest_chunks


def _data(shape, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    c = shape[1]
    return (rng.standard_normal(shape).astype(dtype) * 2 + 0.5, rng.uniform(0.5, 2, c).astype(dtype),
            rng.standard_normal(c).astype(dtype), rng.standard_normal(shape).astype(dtype))


def _reference(x, gamma, beta, gy):
    """y, dx, dγ, dβ of training batch norm: the textbook formulas in NumPy, float64."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) if x.ndim == 2 else (1, -1, 1, 1)
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
    x_hat = (x - mean) / np.sqrt(var + 1e-5)
    y = x_hat * gamma.reshape(shape) + beta.reshape(shape)
    g_gamma, g_beta = (gy * x_hat).sum(axes), gy.sum(axes)
    dx = gamma.reshape(shape) / np.sqrt(var + 1e-5) * (gy - gy.mean(axes, keepdims=True)
                                                       - x_hat * (gy * x_hat).mean(axes, keepdims=True))
    return y, dx, g_gamma, g_beta


def _run(x, gamma, beta, gy, training=True, running=None):
    xs, ws, bs = (mb.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    running_mean, running_var = running if running is not None else (None, None)
    y = F.batch_norm(xs, running_mean, running_var, ws, bs, training=training)
    y.backward(mb.tensor(gy))
    return [mb.to_numpy(a) for a in (y.data, xs.grad.data, ws.grad.data, bs.grad.data)]


@pytest.fixture
def threads():
    previous = mb.set_num_threads(1)
    yield
    mb.set_num_threads(previous)


@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (9, 4), (1, 2, 3, 3)])
def test_chunked_passes_equal_the_formulas(threads, shape):
    x, gamma, beta, gy = _data(shape)
    with smallest_chunks():
        chunked = _run(x, gamma, beta, gy)
    whole = _run(x, gamma, beta, gy)
    for got, one_chunk, want in zip(chunked, whole, _reference(x, gamma, beta, gy)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)
        np.testing.assert_allclose(got, one_chunk, rtol=1e-12, atol=1e-13)


def test_evaluation_mode_chunked_equals_the_formula(threads):
    x, gamma, beta, gy = _data((4, 3, 5, 5), seed=1)
    mean, var = np.array([0.1, -0.2, 0.3]), np.array([0.5, 1.5, 2.0])
    with smallest_chunks():
        y, dx, *_ = _run(x, gamma, beta, gy, training=False, running=(mean.copy(), var.copy()))
    shape = (1, -1, 1, 1)
    scale = (gamma / np.sqrt(var + 1e-5)).reshape(shape)
    np.testing.assert_allclose(y, (x - mean.reshape(shape)) * scale + beta.reshape(shape), rtol=1e-12)
    np.testing.assert_allclose(dx, gy * scale, rtol=1e-12)


@pytest.mark.parametrize("shape", [(7, 5, 6, 6), (33, 8)])
def test_bitwise_equal_on_one_and_two_engine_threads(shape):
    x, gamma, beta, gy = _data(shape, seed=2, dtype=np.float32)
    results = []
    for n in (1, 2):
        previous = mb.set_num_threads(n)
        try:
            with mb.chunk_sizes(norm_bytes=3 * x[0].nbytes):  # 3 images a chunk: a ragged last chunk
                results.append(_run(x, gamma, beta, gy, running=(np.zeros(shape[1], np.float32),
                                                                 np.ones(shape[1], np.float32))))
        finally:
            mb.set_num_threads(previous)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_in_chunks(threads, training):
    x, gamma, beta, _ = _data((3, 2, 3, 2), seed=3)
    running_mean, running_var = np.array([0.2, -0.1]), np.array([0.7, 1.3])

    def fn(x, gamma, beta):
        return F.batch_norm(x, running_mean.copy(), running_var.copy(), gamma, beta, training=training)

    with smallest_chunks():
        assert mb.gradcheck(fn, [x, gamma, beta], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_counts_are_the_closed_form_in_chunks(threads, batch, affine):
    c, h, w = 3, 4, 5
    rng = np.random.default_rng(4)
    x = mb.tensor(rng.standard_normal((batch, c, h, w)).astype(np.float32), requires_grad=True)
    weight, bias = (mb.tensor(np.ones(c, np.float32), requires_grad=True) for _ in range(2)) if affine else (None, None)
    with smallest_chunks(), mb.count_mults() as counter:
        y = F.batch_norm(x, np.zeros(c, np.float32), np.ones(c, np.float32), weight, bias, training=True)
        y.backward(np.ones(x.shape, np.float32))
    elements = batch * c * h * w
    # forward: Σ(x − μ)², x̂ = (x − μ)·σ⁻¹, γ·x̂ (with a weight); the running mean and variance: 2 products
    # each per channel
    assert counter.forward.total == (2 + affine) * elements + 4 * c
    # backward: Σ gy·x̂, x̂·mean(gy·x̂), the final ·γ/σ (·σ⁻¹ without a weight); γ·σ⁻¹ once per channel
    assert counter.backward.total == 3 * elements + affine * c


def test_chunks_follow_the_shape_only():
    x = np.zeros((10, 2, 4, 4), np.float32)  # 128 bytes an image
    with mb.chunk_sizes(norm_bytes=300):
        assert normalization._norm_chunks(x) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
        previous = mb.set_num_threads(2)
        try:
            assert normalization._norm_chunks(x) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
        finally:
            mb.set_num_threads(previous)
