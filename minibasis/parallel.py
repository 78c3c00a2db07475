"""Worker threads for the engine's chunk loops (NumPy backend only); the one place that owns them.

A convolution, a linear layer and a max pool go through their batch in chunks
(``minibasis.functions.conv``, ``.basic``, ``.pooling``, sized by :func:`chunk_step`);
the chunks are independent, and NumPy releases the GIL in its copies, ufuncs and
BLAS calls, so with ``set_num_threads(n)`` (n > 1) :func:`map_chunks` runs them on
n worker threads: the calling thread and n − 1 helpers.

Same bits on any thread count, under any load. Three rules make a result a
function of the shapes and values alone:

* the chunks are sized from the shapes only, never from the worker count
  (:func:`chunk_step`), so a weight gradient is summed over the same chunks;
* results come back in chunk order (never completion order), so whatever the
  caller accumulates, it accumulates in the order of the serial loop;
* every chunk loop, serial or threaded, runs with the BLAS held at ONE thread
  (:func:`single_threaded_blas`, through ``threadpoolctl``, ~10 µs a section): the
  bits of a multi-threaded OpenBLAS GEMM can depend on its thread count (measured
  for conv weight gradients, whose inner dimension n·Ho·Wo runs into thousands).
  Inside a section each worker's GEMM is single-threaded, so the cores are never
  oversubscribed either; outside it the BLAS keeps its own setting.

n chunks are in flight at once, so n chunks' buffers are alive at a time; a
caller with a memory bound gives fewer workers rather than smaller chunks.
Device arrays (CuPy, the strict test backend) always take the serial path.

The default is ``$MINIBASIS_NUM_THREADS``, else 2 where the process may run on
at least 2 CPUs (else 1): measured on the 2-core machine (bench/README.md),
2 threads made a ResNet-20 training step 1.14-1.39x and a ResNet-56
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
           "run_chunks", "single_threaded_blas", "ENV_VARIABLE", "CHUNK_COUNT_MULTIPLE"]

#: Environment variable read for the initial thread count.
ENV_VARIABLE = "MINIBASIS_NUM_THREADS"
#: Threads without the variable (at most the CPUs this process may use): the count measured to pay.
DEFAULT_THREADS = 2
#: A batch in more than one chunk is cut into a multiple of this many (near-equal) chunks, whatever the
#: thread count, so the default two workers get near-equal shares.
CHUNK_COUNT_MULTIPLE = 2

_num_threads: int | None = None  # None: not read from the environment yet
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (its thread count, the pool)
_blas = None  # threadpoolctl's controllers of the loaded BLAS libraries, found once (the scan costs ~2 ms)
_lock = threading.Lock()
_in_worker = threading.local()
_blas_saved: list[int] = []  # the BLAS libraries' own thread counts, while any section holds them at one
_blas_pin_depth = 0  # open single_threaded_blas sections, over all threads
_blas_pin_lock = threading.Lock()


def _forget_pool_in_child() -> None:
    # A forked child (a data-loader worker) inherits the pool object but not its threads: a chunk
    # submitted there would wait forever, so the child builds its own pool when it needs one.
    # The BLAS pin's count stays as it is (the forking thread's own sections still close in the child;
    # other threads' never do, which leaves the child's BLAS at one thread), only its lock is new.
    global _pool, _lock, _blas_pin_lock
    _pool, _lock, _blas_pin_lock = None, threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _blas_libraries() -> list:
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError as exc:
            raise RuntimeError("the engine needs threadpoolctl (pip install threadpoolctl) to hold the BLAS at "
                               "one thread in its chunk loops") from exc
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


def set_num_threads(n: int) -> int:
    """Run the conv's chunks on ``n`` worker threads (1: the serial loop); returns the previous count.

    Results are bitwise those of the serial path (see the module docstring), and
    multiplication counts are identical.
    """
    global _num_threads
    n = positive_int("num_threads", n)
    previous = get_num_threads()
    _num_threads = _checked(n)
    return previous


def _checked(n: int) -> int:
    if n > 1:
        _blas_libraries()  # fails here, not in the middle of a conv, without threadpoolctl
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


def chunk_step(n: int, per_item_bytes: int, target_bytes: int) -> int:
    """Items per chunk of ``n`` items: chunks of at most about ``target_bytes`` of working data (≥ 1 item).

    From the shapes alone, never from the worker count or the load: a sum over
    the chunks (a weight gradient) is then the same sum on any number of
    threads. A batch that needs more than one chunk gets its chunk count rounded
    up to a multiple of ``CHUNK_COUNT_MULTIPLE`` and the items spread evenly over
    them (the last chunk may be shorter), so two workers get near-equal shares.
    """
    step = max(1, min(n, target_bytes // max(per_item_bytes, 1)))
    chunks = -(-n // step)
    if chunks > 1:
        chunks = -(-chunks // CHUNK_COUNT_MULTIPLE) * CHUNK_COUNT_MULTIPLE
        step = -(-n // chunks)
    return step


def chunk_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``step`` items out of ``n``."""
    return [(start, min(n, start + step)) for start in range(0, n, step)]


@contextlib.contextmanager
def single_threaded_blas():
    """Hold the BLAS at one thread for the duration (process-wide; nestable, from any thread).

    The first section to open sets the limit and the last to close restores the
    BLAS's own setting, so sections that overlap on several threads (the
    engine's, or a user's own threads each running a model) never lift each
    other's limit. Every GEMM the engine runs is inside one: its bits are then
    those of the single-threaded BLAS, whatever the BLAS's own thread count.
    """
    global _blas_saved, _blas_pin_depth
    with _blas_pin_lock:
        if _blas_pin_depth == 0:
            libraries = _blas_libraries()
            _blas_saved = [library.num_threads for library in libraries]
            for library in libraries:
                library.set_num_threads(1)
        _blas_pin_depth += 1
    try:
        yield
    finally:
        with _blas_pin_lock:
            _blas_pin_depth -= 1
            if _blas_pin_depth == 0:
                for library, threads in zip(_blas_libraries(), _blas_saved):
                    library.set_num_threads(threads)


def map_chunks(work: Callable, chunks: Iterable[tuple], workers: int) -> Iterator:
    """``work(*chunk)`` for every chunk, yielded in chunk order; on ``workers`` threads when > 1.

    ``workers`` comes from :func:`workers_for` on the arrays the work touches. The
    calling thread is one of the workers and ``workers − 1`` helper threads the
    others: each takes the next chunk not yet taken, so ``workers`` chunks are in
    flight at a time, and the caller yields the results in chunk order between its
    own chunks (a result waits only until the ones before it are done). The BLAS
    is held at one thread throughout (:func:`single_threaded_blas`), on one worker
    as on several. Consume the iterator fully: the BLAS limit is lifted at its end.
    """
    if workers == 1:
        with single_threaded_blas():
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

    with single_threaded_blas():
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
