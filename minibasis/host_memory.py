"""Freed host memory kept in the process for reuse (glibc's malloc); the one place that sets it.

Why. A training step allocates and frees arrays of the same sizes over and over
(activations, column buffers, gradients: 1–16 MiB each at batch 128). By default
glibc hands large freed blocks back to the operating system: a block above its mmap
threshold is unmapped on free, and free space at the top of the heap above its trim
threshold is trimmed. The next array of that size is then mapped afresh and faulted
in page by page, each 4 KiB page zeroed by the kernel: about 50,000 minor page faults
per ResNet-20 training step at batch 128, some 100 ms of a 600 ms step, on memory
that is reused a moment later. (PyTorch users get the same effect from a caching
allocator such as jemalloc or tcmalloc preloaded.)

With retention on (the default where the C library is glibc), blocks up to
:data:`MMAP_THRESHOLD_BYTES` come from the heap and up to
:data:`TRIM_THRESHOLD_BYTES` of free heap stay mapped, so a steady training loop
makes no page faults at all; and all threads allocate from one arena (glibc gives
each new thread its own by default), so the engine's helper thread reuses the
blocks the main thread freed instead of keeping a second pool of them (ResNet-20
training peak 472 → 469 MiB). The peak resident memory stays what it was (the same
arrays are alive at the peak); the cost is that memory freed after a peak is kept
by the process, to be reused by its next allocations, instead of being returned to
the system. ``set_memory_retention(False)`` restores glibc's default thresholds
and returns the free memory at once (``malloc_trim``); the one-arena limit stays
once a second thread has allocated (glibc fixes its arena count then).

The setting is process-wide: it applies to every allocation of the process, not
only minibasis's. ``$MINIBASIS_RETAIN_MEMORY`` = 0 (or off/false/no) leaves glibc's
defaults untouched when minibasis is imported; 1 (on/true/yes) or unset applies
retention. On other C libraries (macOS, musl) nothing is changed and
:func:`get_memory_retention` reports False.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["set_memory_retention", "get_memory_retention", "memory_retention_supported", "apply_default",
           "ENV_VARIABLE", "MMAP_THRESHOLD_BYTES", "FALLBACK_MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES"]

#: Environment variable read when minibasis is imported.
ENV_VARIABLE = "MINIBASIS_RETAIN_MEMORY"
#: Blocks up to this size come from the heap (reused) instead of their own mapping. Older glibc
#: versions refuse more than half their 64 MiB arena heap: FALLBACK_MMAP_THRESHOLD_BYTES then.
MMAP_THRESHOLD_BYTES = 256 * 2 ** 20
FALLBACK_MMAP_THRESHOLD_BYTES = 32 * 2 ** 20
#: At most this much free memory at the top of the heap stays mapped.
TRIM_THRESHOLD_BYTES = 2 ** 30
#: glibc's own defaults, restored by ``set_memory_retention(False)``.
GLIBC_DEFAULT_THRESHOLD_BYTES = 128 * 2 ** 10
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_TRUE, _FALSE = ("1", "on", "true", "yes"), ("0", "off", "false", "no")

_libc = None  # the process's C library (ctypes), once found
_retaining = False


def _glibc():
    """The process's glibc as a ctypes library, or None when the C library is not glibc."""
    global _libc
    if _libc is None:
        try:
            version = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (AttributeError, ValueError, OSError):  # not a GNU system
            version = ""
        if not version.startswith("glibc"):
            _libc = False
        else:
            library = ctypes.CDLL(None)  # the symbols already loaded into the process, glibc's among them
            _libc = library if hasattr(library, "mallopt") and hasattr(library, "malloc_trim") else False
    return _libc or None


def memory_retention_supported() -> bool:
    """Whether this process's C library (glibc) lets minibasis keep freed memory."""
    return _glibc() is not None


def get_memory_retention() -> bool:
    """Whether freed host memory is kept for reuse (see the module docstring)."""
    return _retaining


def set_memory_retention(enabled: bool) -> bool:
    """Keep freed host memory for reuse (True) or restore glibc's defaults (False); returns the previous state.

    Raises RuntimeError for True where the C library is not glibc (nothing to set);
    False is always accepted.
    """
    global _retaining
    if not isinstance(enabled, bool):
        raise TypeError(f"set_memory_retention takes True or False, got {enabled!r}")
    previous = _retaining
    libc = _glibc()
    if libc is None:
        if enabled:
            raise RuntimeError("keeping freed memory needs glibc's malloc (mallopt); this process's C library is "
                               "not glibc, so nothing was changed")
        return previous
    if enabled:
        # The mmap threshold first: setting the trim threshold alone also freezes the mmap
        # threshold at its 128 KiB start, which maps every larger array afresh (far worse).
        if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                or libc.mallopt(_M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD_BYTES)):
            raise RuntimeError(f"glibc refused an mmap threshold of {FALLBACK_MMAP_THRESHOLD_BYTES} bytes")
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, 1)
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD_BYTES)
        libc.mallopt(_M_ARENA_MAX, 0)  # glibc's own limit, for threads that have not allocated yet
        libc.malloc_trim(0)  # hand what is free back to the system now
    _retaining = enabled
    return previous


def apply_default() -> bool:
    """What ``import minibasis`` does: retention on unless ``$MINIBASIS_RETAIN_MEMORY`` says off; returns the state.

    Silently leaves other C libraries alone; an unreadable value of the variable is a ValueError.
    """
    value = os.environ.get(ENV_VARIABLE, "").strip().lower()
    if value and value not in _TRUE + _FALSE:
        raise ValueError(f"${ENV_VARIABLE} must be one of {', '.join(_TRUE + _FALSE)}, got {value!r}")
    if value in _FALSE or not memory_retention_supported():
        return _retaining
    set_memory_retention(True)
    return _retaining
