"""Atomic writes: every file minibasis writes goes through :func:`atomic_write` (temp file in
the same folder, flush + fsync, ``os.replace``), so a crash or an exception never leaves a
half-written file where a good one was."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator

__all__ = ["atomic_write"]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None) -> Iterator:
    """Open a temporary file beside ``path`` for writing; on success flush, fsync and
    ``os.replace`` it onto ``path``; on any exception remove it and leave ``path`` as it was.
    An ``OSError`` of the write itself (``ENOSPC``, ``EFBIG``, ...) is raised with ``path`` as
    its ``filename``.

    ``mode`` is "wb" (binary) or "w" (text, UTF-8 unless ``encoding`` says otherwise).
    The new file gets the permissions of the file it replaces, or 0o666 minus the umask.

    A process killed outright (SIGKILL, power loss) runs no cleanup: ``path`` still holds
    the previous complete file, and the temporary may stay behind as
    ``.<name>.<random>.tmp`` in the same folder. That name never matches ``path`` (nor a
    ``*.npz`` pattern), minibasis never reads it, and it may be deleted at any time when
    no writer is running (tests/serialization/test_atomic_kill.py kills writers at random points).
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_write mode must be 'wb', 'w' or 'wt', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # named here: mkstemp's error would name the temporary file
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: the folder {directory} does not exist", path)
    try:
        permissions = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        permissions = 0o666 & ~_UMASK
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(temp_path, permissions)
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None,
                       newline=newline if text else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, temp_path):
            # A failed write, flush, fsync or rename (a full disk, a file-size limit) names the
            # file the caller asked for, not the temporary that is gone now.
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); harmless where directories cannot be opened."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
