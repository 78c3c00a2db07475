"""minibasis.chunk_sizes: the engine's chunk constants set for a block, and restored after it."""
import threading

import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F
from minibasis.functions import basic, chunking, conv, pooling, smallest_chunks

CONSTANTS = [(conv, "CHUNK_TARGET_BYTES"), (conv, "IM2COL_BUDGET_BYTES"), (conv, "POINTWISE_CHUNK_BYTES"),
             (conv, "PARALLEL_MIN_BYTES"), (pooling, "MAX_POOL_CHUNK_BYTES"), (basic, "LINEAR_BLOCK_ROWS")]


def current():
    return [getattr(module, name) for module, name in CONSTANTS]


def test_sizes_hold_inside_the_block_and_come_back_after_it():
    before = current()
    with mb.chunk_sizes(conv_bytes=11, im2col_budget_bytes=12, pointwise_bytes=13, parallel_min_bytes=0,
                        pool_bytes=14, linear_rows=2):
        assert current() == [11, 12, 13, 0, 14, 2]
        with mb.chunk_sizes(linear_rows=5):  # nested: only what is named changes
            assert current() == [11, 12, 13, 0, 14, 5]
        assert basic.LINEAR_BLOCK_ROWS == 2
    assert current() == before


def test_sizes_come_back_after_an_exception():
    before = current()
    with pytest.raises(KeyError):
        with smallest_chunks():
            assert current()[0] == 1
            raise KeyError("inside")
    assert current() == before


@pytest.mark.parametrize("keyword, value, error", [("conv_bytes", 0, ValueError), ("linear_rows", -1, ValueError),
                                                   ("pool_bytes", 1.5, TypeError),
                                                   ("parallel_min_bytes", -1, ValueError)])
def test_a_bad_size_is_refused_before_anything_changes(keyword, value, error):
    before = current()
    with pytest.raises(error, match=keyword):
        with mb.chunk_sizes(**{"im2col_budget_bytes": 7, keyword: value}):
            pass
    assert current() == before


def test_small_chunks_really_split_the_batch(monkeypatch):
    """Inside smallest_chunks() a conv and a linear layer go through their batch one image (row) at a time."""
    seen = []
    original = mb.parallel.chunk_ranges
    monkeypatch.setattr(mb.parallel, "chunk_ranges", lambda n, step: seen.append((n, step)) or original(n, step))
    x = mb.tensor(np.ones((3, 2, 5, 5), np.float32))
    with smallest_chunks():
        F.conv2d(x, mb.tensor(np.ones((4, 2, 3, 3), np.float32)))
        F.linear(mb.tensor(np.ones((3, 4), np.float32)), mb.tensor(np.ones((2, 4), np.float32)))
    assert seen == [(3, 1), (3, 1)]
    seen.clear()
    F.conv2d(x, mb.tensor(np.ones((4, 2, 3, 3), np.float32)))
    assert seen == [(3, 3)]  # the default: one chunk


def test_blocks_in_two_threads_take_turns():
    inside, order = threading.Event(), []

    def other():
        inside.wait()
        with mb.chunk_sizes(linear_rows=9):
            order.append(("other", basic.LINEAR_BLOCK_ROWS))

    thread = threading.Thread(target=other)
    thread.start()
    with mb.chunk_sizes(linear_rows=3):
        inside.set()
        thread.join(timeout=0.2)  # the other block waits for this one to end
        order.append(("first", basic.LINEAR_BLOCK_ROWS))
    thread.join()
    assert order == [("first", 3), ("other", 9)]
    assert chunking.chunk_sizes is mb.chunk_sizes
