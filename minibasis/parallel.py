"""Worker threads for the engine's chunk loops (NumPy backend only); the one place that owns them.

A convolution and a max pool go through their batch in chunks
(``minibasis.functions.conv``, ``minibasis.functions.pooling``, sized by
:func:`chunk_step`); the chunks are independent, and NumPy releases the GIL in
its copies, ufuncs and BLAS calls, so with ``set_num_threads(n)`` (n > 1) :func:`map_chunks` runs them on
n worker threads: the calling thread and n − 1 helpers. For the duration of such
a section the BLAS is limited to ONE thread (through ``threadpoolctl``, ~13 µs a
section), so each worker's GEMM is single-threaded and the cores are never
oversubscribed; outside it the BLAS keeps its own setting.

Results come back in chunk order (never completion order), so whatever the
caller accumulates, it accumulates in the same order as the serial loop: the
results are identical run to run. n chunks are in flight at once, so n chunks'
buffers are alive at a time; :func:`chunk_step` sizes the chunks for that.
Device arrays (CuPy, the strict test backend) always take the serial path.

The default is ``$MINIBASIS_NUM_THREADS``, else 2 where the process may run on
at least 2 CPUs (else 1): measured on the 2-core machine (bench/README.md, issue
13), 2 threads made a ResNet-20 training step 1.14-1.39x and a ResNet-56
evaluation 1.42-1.47x faster on an idle machine and cost nothing with one core
busy. ``set_num_threads(1)`` restores the serial loop.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from minibasis import backend
from minibasis.checks import positive_int

__all__ = ["set_num_threads", "get_num_threads", "workers_for", "chunk_step", "chunk_ranges", "map_chunks",
           "run_chunks", "ENV_VARIABLE"]

#: Environment variable read for the initial thread count.
ENV_VARIABLE = "MINIBASIS_NUM_THREADS"
#: Threads without the variable (at most the CPUs this process may use): the count measured to pay.
DEFAULT_THREADS = 2

_num_threads: int | None = None  # None: not read from the environment yet
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (its thread count, the pool)
_blas = None  # threadpoolctl.ThreadpoolController, built once (its library scan costs ~2 ms)
_lock = threading.Lock()
_in_worker = threading.local()


def _forget_pool_in_child() -> None:
    # A forked child (a data-loader worker) inherits the pool object but not its threads: a chunk
    # submitted there would wait forever, so the child builds its own pool when it needs one.
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _blas_controller():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError as exc:
            raise RuntimeError("more than one engine thread needs threadpoolctl (pip install threadpoolctl), "
                               "to keep the BLAS single-threaded inside the worker threads") from exc
        _blas = ThreadpoolController()
    return _blas


def set_num_threads(n: int) -> int:
    """Run the conv's chunks on ``n`` worker threads (1: the serial loop); returns the previous count.

    n > 1 needs ``threadpoolctl`` (a dependency). Results equal the serial path's within float
    rounding (the chunks may be sized differently) and are identical run to run;
    multiplication counts are identical.
    """
    global _num_threads
    n = positive_int("num_threads", n)
    previous = get_num_threads()
    _num_threads = _checked(n)
    return previous


def _checked(n: int) -> int:
    if n > 1:
        _blas_controller()  # fails here, not in the middle of a conv, without threadpoolctl
    return n


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def get_num_threads() -> int:
    """The engine's thread count (first call: ``$MINIBASIS_NUM_THREADS``, else 2 on ≥ 2 usable CPUs, else 1)."""
    global _num_threads
    if _num_threads is None:
        value = os.environ.get(ENV_VARIABLE, "").strip()
        if not value:
            _num_threads = _checked(min(DEFAULT_THREADS, _usable_cpus()))
        else:
            try:
                count = positive_int(ENV_VARIABLE, int(value))
            except ValueError:
                raise ValueError(f"${ENV_VARIABLE} must be a positive integer, got {value!r}") from None
            _num_threads = _checked(count)
    return _num_threads


def workers_for(*arrays) -> int:
    """How many threads :func:`map_chunks` will use on these arrays: 1 for device arrays or inside a worker."""
    threads = get_num_threads()
    if threads == 1 or getattr(_in_worker, "active", False) or not all(backend.is_host_array(a) for a in arrays):
        return 1
    return threads


def _helpers(count: int) -> ThreadPoolExecutor:
    """The pool of ``count`` helper threads (the caller's own thread is the other worker)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != count:
            if _pool is not None:
                _pool[1].shutdown(wait=False)  # its threads exit once idle
            _pool = count, ThreadPoolExecutor(max_workers=count, thread_name_prefix="minibasis",
                                              initializer=setattr, initargs=(_in_worker, "active", True))
        return _pool[1]


def chunk_step(n: int, per_item_bytes: int, target_bytes: int, workers: int = 1) -> int:
    """Items per chunk: about ``target_bytes`` of working data per chunk (but ≥ 1 item).

    ``workers`` chunks are alive at once on worker threads, so each gets 1/workers of
    the target (the bytes alive stay within it), and the chunk count is rounded up
    to a multiple of ``workers`` (equal shares).
    """
    step = max(1, min(n, (target_bytes // workers) // max(per_item_bytes, 1)))
    if workers > 1:
        chunks = -(-n // step)
        step = -(-n // (-(-chunks // workers) * workers))
    return step


def chunk_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``step`` items out of ``n``."""
    return [(start, min(n, start + step)) for start in range(0, n, step)]


@contextlib.contextmanager
def _single_threaded_blas():
    with _blas_controller().limit(limits=1, user_api="blas"):
        yield


def map_chunks(work: Callable, chunks: Iterable[tuple], workers: int) -> Iterator:
    """``work(*chunk)`` for every chunk, yielded in chunk order; on ``workers`` threads when > 1.

    ``workers`` comes from :func:`workers_for` on the arrays the work touches. The
    calling thread is one of the workers and ``workers − 1`` helper threads the
    others: each takes the next chunk not yet taken, so ``workers`` chunks are in
    flight at a time, and the caller yields the results in chunk order between its
    own chunks (a result waits only until the ones before it are done). Consume
    the iterator fully: the BLAS limit is lifted at its end.
    """
    if workers == 1:
        for chunk in chunks:
            yield work(*chunk)
        return
    chunks = list(chunks)
    results: dict[int, object] = {}
    taken = itertools.count()  # next() on it is atomic: each chunk is taken by one thread
    stop = threading.Event()  # set on an error: nobody takes another chunk

    def take_chunks() -> None:
        try:
            while not stop.is_set() and (index := next(taken)) < len(chunks):
                results[index] = work(*chunks[index])
        except BaseException:
            stop.set()
            raise

    with _single_threaded_blas():
        # Each helper runs in a copy of the caller's context: NumPy's errstate (e.g. the trainer's
        # errstate(all='ignore') around a step that may diverge) lives in a context variable,
        # which a pool thread would otherwise not see.
        helpers = [_helpers(workers - 1).submit(contextvars.copy_context().run, take_chunks)
                   for _ in range(workers - 1)]
        done = 0
        try:
            _in_worker.active = True  # the caller's chunks must not start a pool of their own
            while not stop.is_set() and (index := next(taken)) < len(chunks):
                results[index] = work(*chunks[index])
                _in_worker.active = False
                while done in results:
                    yield results.pop(done)
                    done += 1
                _in_worker.active = True
        except BaseException:
            stop.set()
            raise
        finally:
            _in_worker.active = False
            for helper in helpers:  # every helper has finished before the BLAS limit lifts
                helper.exception()
        for helper in helpers:
            helper.result()  # a helper's error, raised here
        while done < len(chunks):
            yield results.pop(done)
            done += 1


def run_chunks(work: Callable, chunks: Iterable[tuple], workers: int) -> None:
    """:func:`map_chunks` for work that returns nothing (it writes its chunk's slice of an output)."""
    for _ in map_chunks(work, chunks, workers):
        pass
