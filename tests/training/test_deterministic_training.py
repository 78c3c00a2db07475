"""Training gives the same parameter bits on 1 or 2 engine threads, 1 or 2 BLAS threads, and under load.

A few SGD steps of a small conv net that takes every kind of chunk loop (a "same" conv,
kn2row and a 1×1 coefficient stage in a BasisConv, a strided conv, batch norm, max
pooling, linear layers), with the chunk constants shrunk so the batch goes through
in several chunks. The chunks are sized from the shapes alone and every GEMM runs
with the BLAS held at one thread (minibasis.parallel), so nothing may change a bit:
not the engine's thread count, not the BLAS's, not a busy thread or process beside it.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading

import numpy as np
import pytest

import minibasis as mb
from minibasis import backend, nn, optim, parallel
from minibasis import functions as F
from minibasis.functions import basic, conv, pooling

threadpoolctl = pytest.importorskip("threadpoolctl")

BATCH, SIZE = 48, 9


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a few images everywhere, threads even for these small layers; the engine's threads restored."""
    # the first conv in 4 chunks of 12 images: its weight gradient is a (16, 12·81) @ (12·81, 75) GEMM per chunk,
    # large enough for OpenBLAS to split it over its threads (with bits that depend on their number)
    monkeypatch.setattr(conv, "CHUNK_TARGET_BYTES", 12 * 75 * SIZE * SIZE * 4)
    monkeypatch.setattr(conv, "POINTWISE_CHUNK_BYTES", 8 * (10 + 12) * 5 * 5 * 4)  # the 1×1 stage: 6 chunks of 8
    monkeypatch.setattr(conv, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(pooling, "MAX_POOL_CHUNK_BYTES", 8 * 16 * 11 * 11 * 4)  # 6 chunks of 8
    monkeypatch.setattr(basic, "LINEAR_BLOCK_ROWS", 16)  # 3 blocks
    previous = mb.set_num_threads(1)
    yield
    mb.set_num_threads(previous)


def small_net():
    mb.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2),  # "same": shifted-run columns
        nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),  # 9×9 → 5×5
        nn.BasisConv2d.random(16, 12, 3, num_basis=10, padding=1, bn=True, seed=1),  # kn2row basis stage, 1×1 stage
        nn.ReLU(),
        nn.Conv2d(12, 16, 5, stride=2, padding=2),  # strided windows: 5×5 → 3×3
        nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 10))


def train(steps: int = 3) -> dict:
    """Parameters and buffers (host copies) after ``steps`` SGD steps on a fixed batch."""
    rng = np.random.default_rng(0)
    x = mb.tensor(rng.standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32))
    labels = mb.tensor(rng.integers(0, 10, BATCH))
    model = small_net()
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    return {name: backend.to_numpy(value).copy() for name, value in model.state_dict().items()}


@contextlib.contextmanager
def busy_neighbours():
    """A Python thread and a process spinning beside the training for the duration of the block."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))
    thread = threading.Thread(target=spin, daemon=True)
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    thread.start()
    try:
        yield
    finally:
        stop.set()
        process.kill()
        process.wait()
        thread.join()


def run(engine_threads: int, blas_threads: int, busy: bool = False) -> dict:
    mb.set_num_threads(engine_threads)
    with threadpoolctl.threadpool_limits(blas_threads, user_api="blas"):
        with busy_neighbours() if busy else contextlib.nullcontext():
            return train()


def assert_same_bits(got: dict, want: dict, label: str) -> None:
    assert got.keys() == want.keys()
    differing = [name for name in want if not np.array_equal(got[name], want[name])]
    assert not differing, f"{label}: parameters differ from the serial run's: {differing}"


def test_the_net_takes_several_chunks_in_every_loop(monkeypatch):
    """Guards the comparison below against passing on one-piece loops: count each loop's chunks."""
    chunk_counts = []
    original = parallel.map_chunks

    def counting(work, chunks, workers):
        chunks = list(chunks)
        chunk_counts.append(len(chunks))
        return original(work, chunks, workers)
    monkeypatch.setattr(parallel, "map_chunks", counting)
    mb.set_num_threads(2)
    train(steps=1)
    # forward and backward: 2 convs, a BasisConv's 2 stages, a pool and 2 linear layers, each in 2 chunks or more
    assert len(chunk_counts) == 2 * 7 and min(chunk_counts) >= 2, chunk_counts


def test_training_gives_the_same_bits_on_any_engine_and_blas_thread_count_and_under_load():
    serial = run(engine_threads=1, blas_threads=1)
    assert_same_bits(run(engine_threads=2, blas_threads=1), serial, "2 engine threads")
    assert_same_bits(run(engine_threads=1, blas_threads=2), serial, "2 BLAS threads")
    assert_same_bits(run(engine_threads=2, blas_threads=2), serial, "2 engine and 2 BLAS threads")
    assert_same_bits(run(engine_threads=3, blas_threads=2), serial, "3 engine threads")
    assert_same_bits(run(engine_threads=2, blas_threads=2, busy=True), serial, "a busy thread and process beside it")
    assert_same_bits(run(engine_threads=1, blas_threads=2, busy=True), serial, "serial, busy neighbours")


def numpy_blas() -> list:
    """threadpoolctl's controllers of the BLAS that NumPy calls (SciPy may have loaded a second one):
    the libraries shipped with NumPy, else (a BLAS shared by the whole environment) every one."""
    libraries = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    return [lib for lib in libraries if "numpy" in lib.filepath] or libraries


def test_every_gemm_of_a_training_step_runs_on_a_single_threaded_blas(monkeypatch):
    """On one engine thread as on two, every GEMM (conv stages, 1×1 coefficient convs, linear layers, the
    Tensor's own matmul) runs with the BLAS held at one thread: a multi-threaded OpenBLAS GEMM may change
    its bits with the BLAS's thread count, and beside the engine's threads it would wake the BLAS's own,
    which then spin for a while and slow the sections that follow."""
    blas = numpy_blas()
    seen, original = [], backend.matmul

    def spy(a, b, out=None):
        seen.append(max(lib.num_threads for lib in blas))
        return original(a, b, out=out)
    monkeypatch.setattr(backend, "matmul", spy)
    for engine_threads in (1, 2):
        with threadpoolctl.threadpool_limits(2, user_api="blas"):
            mb.set_num_threads(engine_threads)
            train(steps=1)
            x = mb.tensor(np.ones((3, 4), np.float32), requires_grad=True)
            (x @ mb.tensor(np.ones((4, 5), np.float32))).sum().backward()  # the Tensor's own matmul
    assert len(seen) > 40 and set(seen) == {1}, f"BLAS thread counts seen by the GEMMs: {sorted(set(seen))}"


def test_chunk_step_cuts_chunks_within_the_target_and_no_more_than_two_workers_need():
    for n in (1, 2, 3, 7, 48, 127, 128):
        for per_item in (1, 5, 100):
            for target in (1, 99, 100, 250, 10 ** 6):
                step = parallel.chunk_step(n, per_item, target)
                chunks = parallel.chunk_ranges(n, step)
                assert sum(stop - start for start, stop in chunks) == n and 1 <= step <= n
                assert step * per_item <= target or step == 1  # within the target, or one item that exceeds it
                if len(chunks) > 1:
                    fits = max(1, target // per_item)
                    assert len(chunks) < -(-n // fits) + parallel.CHUNK_COUNT_MULTIPLE  # no smaller than needed
