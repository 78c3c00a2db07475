"""conv2d's chunks on worker threads (minibasis.set_num_threads): same bits, same counts, same memory bound.

The threaded path runs the very chunk functions of the serial one on two
threads, over the same chunks (sized from the shapes alone), so each check
compares the two: outputs and gradients bit for bit equal (the weight
gradient's parts are summed in chunk order), counts identical and equal to
the closed form, and the threaded result identical from run to run. The serial path itself is
checked against independent references in tests/engine/test_conv*.py; here the
geometries come from hypothesis and a list of each path the conv takes (im2col
"same" runs, strided windows, kn2row, depthwise shifts, grouped, dilated).
"""
from __future__ import annotations

import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import backend, nn, parallel
from minibasis import functions as F
from minibasis.functions import conv as conv_module
from test_conv_grouped import spy_column_sizes


@pytest.fixture(autouse=True)
def serial_afterwards(monkeypatch):
    """Every test leaves the engine serial and the chunk sizes as they were."""
    previous = mb.set_num_threads(1)
    monkeypatch.setattr(conv_module, "CHUNK_TARGET_BYTES", conv_module.CHUNK_TARGET_BYTES)
    monkeypatch.setattr(conv_module, "IM2COL_BUDGET_BYTES", conv_module.IM2COL_BUDGET_BYTES)
    monkeypatch.setattr(conv_module, "PARALLEL_MIN_BYTES", 0)  # the small convs here are threaded too
    monkeypatch.setattr(conv_module, "POINTWISE_CHUNK_BYTES", conv_module.POINTWISE_CHUNK_BYTES)
    yield
    mb.set_num_threads(previous)


def run_conv(x, w, gy, threads, **geometry):
    """(y, gx, gw) and the counter of one conv2d forward + backward on ``threads`` engine threads."""
    mb.set_num_threads(threads)
    xt, wt = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
    with mb.count_mults() as counter:
        y = F.conv2d(xt, wt, **geometry)
        y.backward(mb.tensor(gy))
    mb.set_num_threads(1)
    return (y.numpy(), xt.grad.numpy(), wt.grad.numpy()), counter


def draw(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def case(n, c, m, k, groups=1, stride=1, padding=1, dilation=1, size=9, dtype=np.float64, seed=0):
    """Arrays and geometry of one conv; gy has the output's shape."""
    rng = np.random.default_rng(seed)
    x, w = draw(rng, (n, c, size, size), dtype), draw(rng, (m, c // groups, k, k), dtype)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ho, wo = F.conv2d(mb.tensor(x[:1]), mb.tensor(w), **geometry).shape[2:]
    return x, w, draw(rng, (n, m, ho, wo), dtype), geometry


def assert_identical(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def per_image_columns(x, w, geometry) -> int:
    """Bytes of one image's im2col columns (what the chunk size is computed from)."""
    n, c, h, _ = x.shape
    m, _, k, _ = w.shape
    ho = F.conv2d(mb.tensor(x[:1]), mb.tensor(w), **geometry).shape[2]
    return c * k * k * ho * ho * x.dtype.itemsize


def spy_threads(monkeypatch, meet: int = 1) -> set[int]:
    """The ids of the threads that build im2col columns from now on.

    ``meet`` > 1: each thread's first columns wait (at a barrier) until ``meet`` threads have
    arrived, so the set fills only if that many threads run chunks at the same time, however
    late a helper starts on a loaded machine; fewer threads break the barrier (an error) after
    a minute instead of passing.
    """
    seen, original = set(), conv_module.im2col
    barrier = threading.Barrier(meet, timeout=60) if meet > 1 else None

    def spy(*args, **kwargs):
        me = threading.get_ident()
        if me not in seen:
            seen.add(me)
            if barrier is not None and len(seen) <= meet:
                barrier.wait()
        return original(*args, **kwargs)
    monkeypatch.setattr(conv_module, "im2col", spy)
    return seen


PATHS = {  # name: (n, c, m, k, groups, stride, padding, dilation, size)
    "same 3x3 (shifted runs)": (9, 4, 6, 3, 1, 1, 1, 1, 9),
    "kn2row (M < 0.75 C)": (9, 8, 2, 3, 1, 1, 1, 1, 9),
    "depthwise same": (9, 6, 6, 3, 6, 1, 1, 1, 9),
    "grouped strided windows": (7, 6, 4, 3, 2, 2, 1, 1, 9),
    "dilated 5x5": (7, 3, 4, 5, 1, 1, 2, 2, 11),
    "valid 2x2 stride 3": (8, 3, 5, 2, 1, 3, 0, 1, 10),
    "pointwise (one batched GEMM per thread)": (6, 4, 5, 1, 1, 1, 0, 1, 7),
    "pointwise grouped": (6, 4, 6, 1, 2, 1, 0, 1, 7),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_threaded_chunks_equal_the_serial_path(path, dtype):
    n, c, m, k, groups, stride, padding, dilation, size = PATHS[path]
    x, w, gy, geometry = case(n, c, m, k, groups, stride, padding, dilation, size, dtype)
    conv_module.CHUNK_TARGET_BYTES = 2 * per_image_columns(x, w, geometry)  # several chunks per batch
    serial, serial_count = run_conv(x, w, gy, 1, **geometry)
    threaded, threaded_count = run_conv(x, w, gy, 2, **geometry)
    assert all(a.dtype == dtype for a in threaded)
    assert_identical(threaded, serial)
    assert threaded_count.as_dict() == serial_count.as_dict()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), c_per_group=st.integers(1, 3), m_per_group=st.integers(1, 3), groups=st.integers(1, 3),
       k=st.integers(1, 4), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       size=st.integers(7, 10), chunk_images=st.integers(1, 3), float32=st.booleans())
def test_threaded_equals_serial_on_drawn_geometries(n, c_per_group, m_per_group, groups, k, stride, padding, dilation,
                                                    size, chunk_images, float32):
    dtype = np.float32 if float32 else np.float64
    c, m = c_per_group * groups, m_per_group * groups
    x, w, gy, geometry = case(n, c, m, k, groups, stride, padding, dilation, size, dtype, seed=n + k)
    conv_module.CHUNK_TARGET_BYTES = chunk_images * per_image_columns(x, w, geometry)
    serial, serial_count = run_conv(x, w, gy, 1, **geometry)
    threaded, threaded_count = run_conv(x, w, gy, 2, **geometry)
    assert_identical(threaded, serial)
    assert threaded_count.as_dict() == serial_count.as_dict()


def test_the_chunks_really_run_on_two_threads(monkeypatch):
    """Guards the equality tests against passing vacuously on a serial path."""
    x, w, gy, geometry = case(32, 4, 6, 3, padding=2)
    conv_module.CHUNK_TARGET_BYTES = per_image_columns(x, w, geometry)  # one image per chunk: 32 chunks
    threads_seen = spy_threads(monkeypatch, meet=2)
    run_conv(x, w, gy, 2, **geometry)
    assert len(threads_seen) == 2
    threads_seen = spy_threads(monkeypatch)
    run_conv(x, w, gy, 1, **geometry)
    assert threads_seen == {threading.get_ident()}


def test_a_conv_below_the_size_threshold_stays_serial(monkeypatch):
    threads_seen = spy_threads(monkeypatch)
    x, w, gy, geometry = case(32, 4, 6, 3, padding=2)
    conv_module.CHUNK_TARGET_BYTES = per_image_columns(x, w, geometry)
    conv_module.PARALLEL_MIN_BYTES = 32 * per_image_columns(x, w, geometry) + 1  # one byte more than the batch's
    run_conv(x, w, gy, 2, **geometry)
    assert threads_seen == {threading.get_ident()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [0, 1, 7, 130])
def test_linear_gives_the_same_bits_on_any_number_of_threads(n, bias, dtype):
    """Linear runs its rows in blocks of LINEAR_BLOCK_ROWS whatever the threads (130 rows: 3 blocks),
    so the weight gradient's sum over blocks, and every result, is bit for bit the same."""
    rng = np.random.default_rng(n)
    x, w, gy = draw(rng, (n, 5), dtype), draw(rng, (3, 5), dtype), draw(rng, (n, 3), dtype)
    b = draw(rng, (3,), dtype) if bias else None
    results = []
    for threads in (1, 2, 3):
        mb.set_num_threads(threads)
        tensors = [mb.tensor(a, requires_grad=True) for a in (x, w) + ((b,) if bias else ())]
        with mb.count_mults() as counter:
            y = F.linear(*tensors)
            y.backward(mb.tensor(gy))
        results.append(([y.numpy()] + [t.grad.numpy() for t in tensors], counter.as_dict()))
    mb.set_num_threads(1)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    serial = results[0][0]
    for want, got in zip([x @ w.T + (b if bias else 0), gy @ w, gy.T @ x] + ([gy.sum(axis=0)] if bias else []), serial):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, **tolerance)
    for threaded, count in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(threaded, serial))
        assert count == results[0][1]


def test_a_pointwise_conv_gives_the_same_bits_on_any_number_of_threads():
    x, w, gy, geometry = case(12, 6, 4, 1, padding=0, dtype=np.float32)
    conv_module.POINTWISE_CHUNK_BYTES = 5 * (6 + 4) * 9 * 9 * 4  # five images per chunk: 3 chunks
    results = [run_conv(x, w, gy, threads, **geometry) for threads in (1, 2, 3)]
    for (got, count) in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(got, results[0][0]))
        assert count.as_dict() == results[0][1].as_dict()
    want = np.einsum("mc,nchw->nmhw", w[:, :, 0, 0].astype(np.float64), x)
    np.testing.assert_allclose(results[0][0][0], want, rtol=1e-5, atol=1e-5)


def test_threaded_results_are_identical_run_to_run():
    """The weight gradient is summed in chunk order, not in the order the threads finish."""
    x, w, gy, geometry = case(40, 8, 8, 3, dtype=np.float32, size=12)
    conv_module.CHUNK_TARGET_BYTES = per_image_columns(x, w, geometry)
    first, _ = run_conv(x, w, gy, 2, **geometry)
    for _ in range(3):
        again, _ = run_conv(x, w, gy, 2, **geometry)
        for a, b in zip(again, first):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("path", ["same 3x3 (shifted runs)", "kn2row (M < 0.75 C)", "depthwise same",
                                  "grouped strided windows"])
def test_threaded_counts_equal_the_formula(path):
    """Forward N·M·D·P (D = (C/g)·k²), backward twice that, all under conv2d, from both threads' GEMMs."""
    n, c, m, k, groups, stride, padding, dilation, size = PATHS[path]
    x, w, gy, geometry = case(n, c, m, k, groups, stride, padding, dilation, size)
    conv_module.CHUNK_TARGET_BYTES = per_image_columns(x, w, geometry)  # one image per chunk
    _, counter = run_conv(x, w, gy, 2, **geometry)
    positions = gy.shape[2] * gy.shape[3]
    forward = n * m * (c // groups) * k * k * positions
    assert counter.forward.by_op == {"conv2d": forward} and counter.forward.conv == forward
    assert counter.backward.by_op == {"conv2d": 2 * forward}


def test_threaded_counts_land_on_their_layer_and_phase():
    """Records made on worker threads are attributed to the layer (and phase) whose conv ran them."""
    mb.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 5, 3, padding=1, bias=False))
    x = mb.tensor(np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    conv_module.CHUNK_TARGET_BYTES = 4 * 3 * 9 * 64 * 4  # four images per chunk: 4 chunks in each layer
    mb.set_num_threads(2)
    with mb.count_mults() as counter:
        model(x).sum().backward()
    first, second = 16 * 4 * 27 * 64, 16 * 5 * 36 * 64
    assert counter.forward.conv_by_layer() == {"0": first, "1": second}
    # backward: the first layer's input needs no gradient (x is not a parameter): weight gradient only
    assert counter.backward.conv_by_layer() == {"0": first, "1": 2 * second}


@pytest.mark.parametrize("chunks_in_budget", [1, 2])
def test_threads_keep_the_columns_within_the_budget(monkeypatch, chunks_in_budget):
    """Each worker has one chunk's columns alive: a budget that holds two chunks runs them on two threads,
    one that holds a single chunk runs them serially; the chunks are the same either way."""
    x, w, gy, geometry = case(16, 8, 8, 3, size=16)  # M = C: im2col forward (not kn2row) and backward
    image = per_image_columns(x, w, geometry)
    conv_module.CHUNK_TARGET_BYTES = image  # one image per chunk
    conv_module.IM2COL_BUDGET_BYTES = budget = chunks_in_budget * image + image // 2
    sizes = spy_column_sizes(monkeypatch)
    threads_seen = spy_threads(monkeypatch, meet=chunks_in_budget)
    tracemalloc.start()
    try:
        run_conv(x, w, gy, 2, **geometry)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [image] * (2 * 16)  # 16 chunks of 1 image, forward and backward
    assert len(threads_seen) == chunks_in_budget
    assert peak < 16 * image / 2, f"peak {peak} bytes; the whole column buffer is {16 * image}, the budget {budget}"


def test_an_error_in_a_chunk_propagates_and_lifts_the_blas_limit(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas_threads = [info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    original, calls = conv_module.im2col, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("chunk failed")
        return original(*args, **kwargs)
    monkeypatch.setattr(conv_module, "im2col", failing)
    x, w, gy, geometry = case(12, 4, 6, 3)
    conv_module.CHUNK_TARGET_BYTES = per_image_columns(x, w, geometry)
    with pytest.raises(RuntimeError, match="chunk failed"):
        run_conv(x, w, gy, 2, **geometry)
    assert [info["num_threads"] for info in threadpoolctl.threadpool_info()
            if info["user_api"] == "blas"] == blas_threads
    monkeypatch.setattr(conv_module, "im2col", original)
    serial, _ = run_conv(x, w, gy, 1, **geometry)  # the engine still works afterwards
    again, _ = run_conv(x, w, gy, 2, **geometry)
    assert_identical(again, serial)


def test_map_chunks_yields_in_chunk_order_whatever_finishes_first():
    chunks = [(i, 0.02 if i % 3 == 0 else 0.0) for i in range(10)]

    def work(index, delay):
        time.sleep(delay)  # the slow chunks finish after their successors
        return index
    assert list(parallel.map_chunks(work, chunks, 2)) == list(range(10))
    assert list(parallel.map_chunks(work, chunks, 1)) == list(range(10))


def test_device_arrays_and_nested_calls_stay_serial():
    mb.set_num_threads(2)
    host = np.zeros(3)
    assert parallel.workers_for(host) == 2
    strict = backend.to_backend(host, "strict")
    assert parallel.workers_for(host, strict) == 1
    inner = list(parallel.map_chunks(lambda i: parallel.workers_for(host), [(i,) for i in range(4)], 2))
    assert inner == [1, 1, 1, 1]


def test_set_num_threads_returns_the_previous_count_and_rejects_bad_values():
    assert mb.set_num_threads(2) == 1  # the fixture made it serial
    assert mb.get_num_threads() == 2
    assert mb.set_num_threads(1) == 2
    with pytest.raises(ValueError, match="num_threads"):
        mb.set_num_threads(0)
    with pytest.raises(TypeError, match="num_threads"):
        mb.set_num_threads(1.5)
    with pytest.raises(TypeError, match="num_threads"):
        mb.set_num_threads("2")
    assert mb.get_num_threads() == 1


@pytest.mark.parametrize("value, expected", [("2", 2), (" 1 ", 1), ("3", 3)])
def test_the_environment_variable_sets_the_initial_count(monkeypatch, value, expected):
    monkeypatch.setattr(parallel, "_num_threads", None)
    monkeypatch.setenv(parallel.ENV_VARIABLE, value)
    assert parallel.get_num_threads() == expected


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 2), (16, 2)])
def test_without_the_variable_the_default_is_two_threads_where_two_cpus_are_usable(monkeypatch, cpus, expected):
    monkeypatch.setattr(parallel, "_num_threads", None)
    monkeypatch.delenv(parallel.ENV_VARIABLE, raising=False)
    monkeypatch.setattr(parallel, "_usable_cpus", lambda: cpus)
    assert parallel.get_num_threads() == expected


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_environment_variable_is_named_in_the_error(monkeypatch, value):
    monkeypatch.setattr(parallel, "_num_threads", None)
    monkeypatch.setenv(parallel.ENV_VARIABLE, value)
    with pytest.raises(ValueError, match=parallel.ENV_VARIABLE):
        parallel.get_num_threads()
    monkeypatch.delenv(parallel.ENV_VARIABLE)  # before the fixture's teardown reads it


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_threaded_convs_with_its_own_pool():
    """The child inherits the parent's pool object but not its threads: it must not wait on them."""
    x, w, gy, geometry = case(8, 3, 4, 3)
    conv_module.CHUNK_TARGET_BYTES = per_image_columns(x, w, geometry)
    parent, _ = run_conv(x, w, gy, 2, **geometry)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the threaded conv finishes and agrees
        code = 1
        try:
            child, _ = run_conv(x, w, gy, 2, **geometry)
            code = 0 if all(np.array_equal(a, b) for a, b in zip(child, parent)) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's threaded conv hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
