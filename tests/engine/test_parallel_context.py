"""The engine's helper threads see the caller's context (NumPy's errstate lives in a context variable)."""
import threading

import numpy as np

from minibasis import parallel


def test_helper_threads_run_in_the_callers_errstate():
    previous = parallel.set_num_threads(2)
    seen = {}
    barrier = threading.Barrier(2, timeout=10)

    def work(index):
        barrier.wait()  # both workers hold a chunk at once, so one of them is the helper thread
        seen[threading.current_thread().name] = np.geterr()["over"]
        return index

    try:
        with np.errstate(over="ignore"):
            assert list(parallel.map_chunks(work, [(0,), (1,)], workers=2)) == [0, 1]
    finally:
        parallel.set_num_threads(previous)
    assert len(seen) == 2, seen  # the caller and one helper
    assert set(seen.values()) == {"ignore"}, seen
