"""Readers for the official dataset files: CIFAR-10, CIFAR-100 (python pickles) and SVHN (.mat).

Nothing is downloaded. The files are untrusted: the pickles go through
:mod:`minibasis.serialization`'s restricted unpickler (profile ``CIFAR``: NumPy arrays and plain
containers only), the ``.mat`` files through ``scipy.io.loadmat`` after their
headers were checked. Each loader returns ``(x_train, y_train), (x_test, y_test)``
with images ``uint8`` of shape (N, 3, 32, 32) and labels ``int64`` of shape (N,);
the returned tuple also carries ``.label_names`` (class names, or None).

Errors: a missing file raises ``FileNotFoundError`` naming the expected layout;
malformed content raises :class:`DatasetError` (a ``ValueError``) naming the
file and the key; a pickle asking for anything outside the allow-list raises
:class:`~minibasis.serialization.UnsafePickleError` (also a ``ValueError``).
"""
from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from minibasis.serialization import CIFAR, PickleDataError, UnsafePickleError, safe_load

__all__ = ["DatasetError", "DatasetSplits", "load_cifar10", "load_cifar100", "load_svhn"]

IMAGE_SHAPE = (3, 32, 32)
_IMAGE_BYTES = math.prod(IMAGE_SHAPE)


class DatasetError(ValueError):
    """A dataset file is malformed: names the file and the key."""


class DatasetSplits(tuple):
    """``((x_train, y_train), (x_test, y_test))`` that also knows its ``label_names``.

    Unpacks exactly like the plain pair of pairs; ``.train`` / ``.test`` name the parts.
    """

    def __new__(cls, train, test, label_names: Sequence[str] | None = None):
        self = super().__new__(cls, (tuple(train), tuple(test)))
        self.label_names = tuple(label_names) if label_names is not None else None
        return self

    def __getnewargs__(self):
        return self[0], self[1], self.label_names

    @property
    def train(self):
        return self[0]

    @property
    def test(self):
        return self[1]


# ---------------------------------------------------------------------------
# Locating the files
# ---------------------------------------------------------------------------
def _dataset_dir(root, folder: str, required: Sequence[str], dataset: str) -> Path:
    """``root/folder`` or ``root`` itself, whichever holds every required file."""
    root = Path(root)
    for candidate in (root / folder, root):
        if all((candidate / name).is_file() for name in required):
            return candidate
    for candidate in (root / folder, root):
        present = [name for name in required if (candidate / name).is_file()]
        if present:
            missing = [name for name in required if name not in present]
            raise FileNotFoundError(f"{dataset}: {candidate} lacks {missing} (the official layout has "
                                    f"{list(required)})")
    raise FileNotFoundError(
        f"{dataset} not found: expected {root / folder}/ holding {list(required)} (the official "
        f"python-version layout), or those files directly in {root}")


# ---------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------
def _load_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys (the official files use bytes keys)."""
    with open(path, "rb") as handle:
        try:
            obj = safe_load(handle, profile=CIFAR, name=str(path))
        except UnsafePickleError:
            raise
        except PickleDataError as exc:
            raise DatasetError(str(exc)) from exc
    if type(obj) is not dict:
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    entries = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(key, str):
            entries[key] = value
    return entries


def _entry(entries: dict, key: str, path: Path):
    if key not in entries:
        raise DatasetError(f"{path}: key {key!r} missing (found {sorted(entries)[:10]})")
    return entries[key]


def _labels(value, key: str, path: Path, count: int, num_classes: int) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise DatasetError(f"{path}: {key!r} must be a list of ints, got {type(value).__name__}")
    try:
        labels = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DatasetError(f"{path}: {key!r} is not a flat list of ints: {exc}") from None
    if labels.ndim != 1 or len(labels) != count:
        raise DatasetError(f"{path}: {key!r} has shape {labels.shape}, expected ({count},) to match 'data'")
    if labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: {key!r} holds {labels.dtype} values, expected ints")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: {key!r} has values in [{labels.min()}, {labels.max()}], "
                           f"expected 0..{num_classes - 1}")
    return labels.astype(np.int64)


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entries = _load_pickle(path)
    data = _entry(entries, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        described = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, {_IMAGE_BYTES}), got {described}")
    labels = _labels(_entry(entries, label_key, path), label_key, path, len(data), num_classes)
    # Each row is 1024 red, 1024 green, 1024 blue values, row-major: CHW as stored.
    return data.reshape((len(data),) + IMAGE_SHAPE), labels


def _label_names(path: Path, key: str, num_classes: int) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    names = _entry(_load_pickle(path), key, path)
    if not isinstance(names, list) or len(names) != num_classes or \
            not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{path}: {key!r} must be a list of {num_classes} names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def load_cifar10(root) -> DatasetSplits:
    """CIFAR-10 from the official python files.

    ``root``: the folder holding ``cifar-10-batches-py/`` (as torchvision lays it out)
    or that folder itself. Returns ``(x_train, y_train), (x_test, y_test)``: x uint8
    (50000 | 10000, 3, 32, 32), y int64 in 0..9; ``.label_names`` from ``batches.meta``.
    """
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    folder = _dataset_dir(root, "cifar-10-batches-py", train_files + ["test_batch"], "CIFAR-10")
    train = _concat([_read_cifar_batch(folder / name, "labels", 10) for name in train_files])
    test = _read_cifar_batch(folder / "test_batch", "labels", 10)
    return DatasetSplits(train, test, _label_names(folder / "batches.meta", "label_names", 10))


def load_cifar100(root) -> DatasetSplits:
    """CIFAR-100 from the official python files, with the 100 fine labels.

    ``root``: the folder holding ``cifar-100-python/`` or that folder itself (files
    ``train``, ``test``, optional ``meta``). x uint8 (N, 3, 32, 32), y int64 in 0..99.
    """
    folder = _dataset_dir(root, "cifar-100-python", ["train", "test"], "CIFAR-100")
    train = _read_cifar_batch(folder / "train", "fine_labels", 100)
    test = _read_cifar_batch(folder / "test", "fine_labels", 100)
    return DatasetSplits(train, test, _label_names(folder / "meta", "fine_label_names", 100))


# ---------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------
#: A .mat variable may decompress to at most this multiple of the file size (plus 1 MiB);
#: the official files compress by about 1.25.
_MAX_MAT_EXPANSION = 16


#: Bytes per element of MATLAB's numeric array classes (mxDOUBLE_CLASS = 6 ... mxUINT64_CLASS = 15).
_MAT_CLASS_ITEMSIZE = {6: 8, 7: 4, 8: 1, 9: 1, 10: 2, 11: 2, 12: 4, 13: 4, 14: 8, 15: 8}
_MI_INT8, _MI_INT32, _MI_UINT32, _MI_MATRIX, _MI_COMPRESSED = 1, 5, 6, 14, 15
_MAT_HEADER_BYTES = 4096   # a variable's flags, dimensions and name fit easily


def _mat_tag(buf: bytes, offset: int, order: str) -> tuple[int, int, int, int]:
    """(type, byte count, data offset, next offset) of the data element at ``offset``."""
    first, second = struct.unpack_from(order + "II", buf, offset)
    if first >> 16:  # "small data element": type and count packed in 4 bytes, data in the next 4
        return first & 0xFFFF, first >> 16, offset + 4, offset + 8
    return first, second, offset + 8, offset + 8 + second + (-second % 8)


def _mat_matrix_header(content: bytes, order: str) -> tuple[str, int, tuple[int, ...], bool]:
    """(name, class, dimensions, is_complex) from the start of a miMATRIX element's content."""
    kind, count, data, offset = _mat_tag(content, 0, order)
    if kind != _MI_UINT32 or count != 8:
        raise ValueError("array flags sub-element missing")
    flags = struct.unpack_from(order + "I", content, data)[0]
    kind, count, data, offset = _mat_tag(content, offset, order)
    if kind != _MI_INT32 or count % 4 or not count:
        raise ValueError("dimensions sub-element missing")
    dims = struct.unpack_from(order + f"{count // 4}i", content, data)
    kind, count, data, _ = _mat_tag(content, offset, order)
    if kind != _MI_INT8 or data + count > len(content):
        raise ValueError("name sub-element missing")
    return content[data:data + count].decode("latin-1"), flags & 0xFF, dims, bool(flags & 0x800)


def _mat_variables(path: Path) -> dict[str, tuple[int, tuple[int, ...], bool]]:
    """name → (class, dims, is_complex) of the top-level variables of a MATLAB v5 file, read
    from the headers alone: compressed variables are inflated only as far as their header,
    so a decompression bomb is seen before anything large is allocated."""
    variables = {}
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        header = handle.read(128)
        order = {b"IM": "<", b"MI": ">"}.get(header[126:128]) if len(header) == 128 else None
        if order is None:
            raise DatasetError(f"{path}: not a MATLAB v5 file (no v5 header)")
        version = struct.unpack(order + "H", header[124:126])[0]
        if version != 0x0100:
            raise DatasetError(f"{path}: MATLAB file version {version:#06x} is not v5 "
                               "(v7.3/HDF5 files are not supported)")
        position = 128
        try:
            while position + 8 <= size:
                handle.seek(position)
                kind, count = struct.unpack(order + "II", handle.read(8))
                if kind == _MI_COMPRESSED:
                    inflated = zlib.decompressobj().decompress(handle.read(min(count, 2**16)), _MAT_HEADER_BYTES)
                    inner_kind, _, data, _ = _mat_tag(inflated, 0, order)
                    if inner_kind != _MI_MATRIX:
                        raise ValueError(f"compressed element of type {inner_kind}")
                    content = inflated[data:]
                elif kind == _MI_MATRIX:
                    content = handle.read(min(count, _MAT_HEADER_BYTES))
                else:
                    raise ValueError(f"top-level element of type {kind} at byte {position}")
                name, mclass, dims, is_complex = _mat_matrix_header(content, order)
                variables[name] = (mclass, dims, is_complex)
                position += 8 + count
        except (ValueError, struct.error, zlib.error) as exc:
            raise DatasetError(f"{path}: malformed MATLAB v5 file: {exc}") from None
    return variables


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # scipy is a runtime dependency; imported here to keep `import minibasis` light

    header = _mat_variables(path)
    for key in ("X", "y"):
        if key not in header:
            raise DatasetError(f"{path}: variable {key!r} missing (found {sorted(header)[:10]})")
        if header[key][0] not in _MAT_CLASS_ITEMSIZE or header[key][2]:
            raise DatasetError(f"{path}: variable {key!r} is not a real numeric array (MATLAB class {header[key][0]})")
    x_shape = header["X"][1]
    if len(x_shape) != 4 or tuple(x_shape[:3]) != (32, 32, 3):
        raise DatasetError(f"{path}: 'X' has shape {tuple(x_shape)}, expected (32, 32, 3, N)")
    declared = sum(math.prod(max(d, 0) for d in dims) * _MAT_CLASS_ITEMSIZE[mclass]
                   for mclass, dims, _ in (header["X"], header["y"]))
    limit = _MAX_MAT_EXPANSION * path.stat().st_size + 2**20
    if declared > limit:
        raise DatasetError(f"{path}: variables declare {declared} bytes, more than {limit} for a "
                           f"{path.stat().st_size}-byte file (decompression bomb?)")
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read 'X'/'y': {type(exc).__name__}: {exc}"[:1000]) from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        described = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{path}: 'X' must be a uint8 array (32, 32, 3, N), got {described}")
    count = x.shape[3]
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iuf" or y.size != count or \
            (y.ndim == 2 and 1 not in y.shape) or y.ndim > 2:
        described = f"{y.dtype} array of shape {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise DatasetError(f"{path}: 'y' must hold {count} numeric labels, got {described}")
    y = y.reshape(-1)
    if count and (not np.all(np.isfinite(y)) or not np.all(y == np.round(y)) or y.min() < 0 or y.max() > 10):
        raise DatasetError(f"{path}: 'y' must hold integer labels 0..10 (10 meaning digit 0)")
    labels = y.astype(np.int64) % 10  # SVHN writes digit 0 as label 10
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (H, W, C, N) → (N, C, H, W)
    return images, labels


def load_svhn(root) -> DatasetSplits:
    """SVHN (cropped digits) from ``train_32x32.mat`` and ``test_32x32.mat`` in ``root``
    (or in ``root/svhn``).

    X (32, 32, 3, N) becomes uint8 (N, 3, 32, 32); label 10 becomes 0, so y is the digit.
    """
    folder = _dataset_dir(root, "svhn", ["train_32x32.mat", "test_32x32.mat"], "SVHN")
    train = _read_svhn_mat(folder / "train_32x32.mat")
    test = _read_svhn_mat(folder / "test_32x32.mat")
    return DatasetSplits(train, test, tuple(str(d) for d in range(10)))
