"""``chunk_sizes``: set the engine's chunk sizes for a block, so a small batch goes through in many chunks.

The host engine takes a batch in chunks (``minibasis.parallel``): a convolution in chunks
of about ``conv.CHUNK_TARGET_BYTES`` of columns (a pointwise 1×1 conv about
``conv.POINTWISE_CHUNK_BYTES`` of input and output), a max pool about
``pooling.MAX_POOL_CHUNK_BYTES`` of padded input, a linear layer ``basic.LINEAR_BLOCK_ROWS``
rows at a time; a conv with fewer than ``conv.PARALLEL_MIN_BYTES`` of columns over its
batch runs its chunks serially. These sizes are set for speed: a real batch (128 CIFAR
images) takes several chunks and the engine threads, a batch of a few small images takes
one chunk. Inside ``chunk_sizes(...)`` the sizes are the ones given, so a check on small
shapes runs the very loops a large batch runs::

    with minibasis.chunk_sizes(conv_bytes=1, pointwise_bytes=1, pool_bytes=1, linear_rows=1,
                               parallel_min_bytes=0):
        ...  # one image (one row) per chunk, every chunk loop on the engine threads

(``smallest_chunks()`` is that block.) Sizes change speed and memory only: results equal
those of one chunk within float rounding (a max pool's bitwise), and multiplication counts
are identical. The previous sizes come back on exit, also after an exception. The sizes
are process-wide: blocks in different threads take turns (a lock is held for the block).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from minibasis.checks import non_negative_int, positive_int
from minibasis.functions import basic, conv, pooling

__all__ = ["chunk_sizes", "smallest_chunks"]

# keyword → (module, constant, check): the one table of the engine's chunk constants
_SETTINGS = {
    "conv_bytes": (conv, "CHUNK_TARGET_BYTES", positive_int),
    "im2col_budget_bytes": (conv, "IM2COL_BUDGET_BYTES", positive_int),
    "pointwise_bytes": (conv, "POINTWISE_CHUNK_BYTES", positive_int),
    "parallel_min_bytes": (conv, "PARALLEL_MIN_BYTES", non_negative_int),
    "pool_bytes": (pooling, "MAX_POOL_CHUNK_BYTES", positive_int),
    "linear_rows": (basic, "LINEAR_BLOCK_ROWS", positive_int),
}
_lock = threading.RLock()


@contextlib.contextmanager
def chunk_sizes(*, conv_bytes: int | None = None, im2col_budget_bytes: int | None = None,
                pointwise_bytes: int | None = None, parallel_min_bytes: int | None = None,
                pool_bytes: int | None = None, linear_rows: int | None = None) -> Iterator[None]:
    """Within the block, the engine's chunks have the sizes given (None: unchanged).

    Args:
        conv_bytes: target column bytes of one conv chunk (``conv.CHUNK_TARGET_BYTES``);
            a chunk holds at least one image, so 1 means one image per chunk.
        im2col_budget_bytes: hard cap on one chunk's columns (``conv.IM2COL_BUDGET_BYTES``).
        pointwise_bytes: input-and-output bytes of one pointwise conv chunk (``conv.POINTWISE_CHUNK_BYTES``).
        parallel_min_bytes: convs with fewer column bytes over the batch run their chunks
            serially (``conv.PARALLEL_MIN_BYTES``); 0 puts every conv on the engine threads.
        pool_bytes: padded-input bytes of one max-pool chunk (``pooling.MAX_POOL_CHUNK_BYTES``).
        linear_rows: rows of one linear-layer block (``basic.LINEAR_BLOCK_ROWS``).

    Raises TypeError / ValueError for a size that is not a positive integer
    (``parallel_min_bytes``: not a non-negative one), before anything is changed.
    """
    given = {"conv_bytes": conv_bytes, "im2col_budget_bytes": im2col_budget_bytes,
             "pointwise_bytes": pointwise_bytes, "parallel_min_bytes": parallel_min_bytes,
             "pool_bytes": pool_bytes, "linear_rows": linear_rows}
    new = {key: _SETTINGS[key][2](key, value) for key, value in given.items() if value is not None}
    with _lock:
        saved = {key: getattr(module, name) for key, (module, name, _) in _SETTINGS.items()}
        try:
            for key, value in new.items():
                module, name, _ = _SETTINGS[key]
                setattr(module, name, value)
            yield
        finally:
            for key, value in saved.items():
                module, name, _ = _SETTINGS[key]
                setattr(module, name, value)


def smallest_chunks():
    """``chunk_sizes`` with one image (one row) per chunk and every chunk loop on the engine threads."""
    return chunk_sizes(conv_bytes=1, pointwise_bytes=1, pool_bytes=1, linear_rows=1, parallel_min_bytes=0)
