"""Reading and writing model files: atomic writes, ``.npz`` state files, PyTorch checkpoints.

* :func:`atomic_write`: every file minibasis writes goes through it (temp file in
  the same folder, flush + fsync, ``os.replace``), so a crash or an exception
  never leaves a half-written file where a good one was.
* :func:`save` / :func:`load`: nested state (model ``state_dict``, optimizer
  state, epoch, RNG state, ...) in one ``.npz``: arrays as ``.npy`` members under
  flattened names, the nesting and the plain values in a JSON member. Read back
  without pickle (``allow_pickle`` is never on).
* :func:`load_torch_checkpoint`: ``torch.save`` files (legacy and zip formats)
  without torch, through :mod:`minibasis.safe_pickle`.

Files from outside are untrusted: every problem raises :class:`CheckpointError`
(a ``ValueError``) naming the file and what is wrong, or
:class:`~minibasis.safe_pickle.UnsafePickleError` when a pickle asks for
something refused. A missing file raises ``FileNotFoundError``.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import tempfile
import warnings
import zipfile
from typing import Any, Iterator

import numpy as np

from minibasis import backend
from minibasis.safe_pickle import (
    PLAIN, TORCH, PickleDataError, Resolved, TorchStorages, UnsafePickleError, resolve, safe_load,
    safe_load_prefix,
)

__all__ = ["CheckpointError", "atomic_write", "save", "load", "load_torch_checkpoint", "load_torch_object"]


class CheckpointError(ValueError):
    """A model or checkpoint file is malformed, truncated or inconsistent (names file and problem)."""


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------
def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None) -> Iterator:
    """Open a temporary file beside ``path`` for writing; on success flush, fsync and
    ``os.replace`` it onto ``path``; on any exception remove it and leave ``path`` as it was.

    ``mode`` is "wb" (binary) or "w" (text, UTF-8 unless ``encoding`` says otherwise).
    The new file gets the permissions of the file it replaces, or 0o666 minus the umask.

    A process killed outright (SIGKILL, power loss) runs no cleanup: ``path`` still holds
    the previous complete file, and the temporary may stay behind as
    ``.<name>.<random>.tmp`` in the same folder. That name never matches ``path`` (nor a
    ``*.npz`` pattern), minibasis never reads it, and it may be deleted at any time when
    no writer is running (tests/test_atomic_kill.py kills writers at random points).
    """
    if mode not in ("wb", "w", "wt"):
        raise ValueError(f"atomic_write mode must be 'wb', 'w' or 'wt', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
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


# ---------------------------------------------------------------------------
# Zip members (shared by .npz and torch zip checkpoints)
# ---------------------------------------------------------------------------
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


def _check_member_names(zf: zipfile.ZipFile, source: str) -> dict[str, zipfile.ZipInfo]:
    """Refuse member names that are absolute or climb out (``..``); returns name → info."""
    infos = {}
    for info in zf.infolist():
        member = info.filename
        parts = member.replace("\\", "/").split("/")
        if (member.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(member) or ".." in parts
                or "\x00" in member):
            raise CheckpointError(f"{source}: unsafe member name {member!r:.200} in the archive "
                                  "(absolute or containing '..')")
        if member in infos:
            raise CheckpointError(f"{source}: member {member!r:.200} appears twice in the archive")
        infos[member] = info
    return infos


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int, source: str) -> bytes:
    """The first ``nbytes`` bytes of a member (CRC-checked when that is the whole member)."""
    if info.file_size < nbytes:
        raise CheckpointError(f"{source}: member {info.filename!r} holds {info.file_size} bytes, "
                              f"{nbytes} are needed")
    with zf.open(info) as handle:
        data = handle.read(nbytes)
    if len(data) != nbytes:
        raise CheckpointError(f"{source}: member {info.filename!r} is truncated "
                              f"({len(data)} of {nbytes} bytes)")
    return data


@contextlib.contextmanager
def _archive_errors(source: str, what: str):
    """Turn whatever a corrupt archive makes zipfile/zlib/numpy raise into CheckpointError."""
    try:
        yield
    except (CheckpointError, UnsafePickleError):
        raise
    except PickleDataError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, struct.error, ...
        raise CheckpointError(f"{source}: corrupt or truncated {what}: {type(exc).__name__}: {exc}"[:2000]) from exc


# ---------------------------------------------------------------------------
# save / load (.npz)
# ---------------------------------------------------------------------------
_META_MEMBER = "__minibasis_meta__"
_FORMAT = "minibasis.state"
_FORMAT_VERSION = 1
_MAX_TREE_DEPTH = 64
_PLAIN_VALUES = (str, int, float, bool, type(None))


def _is_array_like(value) -> bool:
    return isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic))


def _escape(component: str) -> str:
    return component.replace("%", "%25").replace("/", "%2F")


class _Flattener:
    """Nested state → (JSON tree, {member name: array})."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self._active: set[int] = set()

    def _array_node(self, array: np.ndarray, path: list[str], kind: str) -> dict:
        if array.dtype.hasobject:
            raise TypeError(f"save: {'/'.join(path) or 'value'} has dtype {array.dtype}; object arrays cannot be saved")
        base = "/".join(_escape(p) for p in path) or "value"
        member, suffix = base, 1
        while member in self.arrays or member == _META_MEMBER:
            suffix += 1
            member = f"{base}~{suffix}"
        self.arrays[member] = array
        return {"type": kind, "key": member}

    def node(self, value, path: list[str]) -> dict:
        where = "/".join(path) or "the top level"
        if len(path) > _MAX_TREE_DEPTH:
            raise ValueError(f"save: nesting deeper than {_MAX_TREE_DEPTH} at {where}")
        if isinstance(value, np.generic):
            return self._array_node(np.asarray(value), path, "scalar")
        if isinstance(value, _PLAIN_VALUES):
            return {"type": "value", "value": value}
        if _is_array_like(value):
            return self._array_node(np.asarray(backend.to_numpy(value)), path, "array")
        if isinstance(value, (dict, list, tuple)):
            if id(value) in self._active:
                raise ValueError(f"save: reference cycle at {where}")
            self._active.add(id(value))
            try:
                if isinstance(value, dict):
                    items = []
                    for key, item in value.items():
                        if not isinstance(key, (str, int)) or isinstance(key, bool):
                            raise TypeError(f"save: dict keys must be str or int, got {type(key).__name__} "
                                            f"{key!r:.60} at {where}")
                        items.append([key, self.node(item, path + [str(key)])])
                    return {"type": "dict", "items": items}
                kind = "list" if isinstance(value, list) else "tuple"
                return {"type": kind, "items": [self.node(item, path + [str(i)]) for i, item in enumerate(value)]}
            finally:
                self._active.discard(id(value))
        raise TypeError(f"save: cannot store a {type(value).__name__} at {where} "
                        "(arrays, numbers, strings, bools, None, dicts, lists and tuples only)")


def save(model_or_state, path) -> None:
    """Write a model's ``state_dict()`` or a nested state to ``path`` (``.npz``, atomically).

    ``model_or_state``: an object with ``state_dict()`` (name → array or Tensor), or a
    dict (str or int keys) nesting arrays (NumPy, CuPy, Tensor), NumPy scalars, Python
    numbers (ints of any size), strings, bools, None, lists and tuples. :func:`load`
    returns the same structure with NumPy arrays. ``path`` is used as given (no suffix added).
    """
    state = model_or_state.state_dict() if callable(getattr(model_or_state, "state_dict", None)) else model_or_state
    if not isinstance(state, dict):
        raise TypeError(f"save: expected a model with state_dict() or a dict, got {type(model_or_state).__name__}")
    flattener = _Flattener()
    tree = flattener.node(state, [])
    meta = json.dumps({"format": _FORMAT, "version": _FORMAT_VERSION, "tree": tree}, allow_nan=True).encode("utf-8")
    members = dict(flattener.arrays)
    members[_META_MEMBER] = np.frombuffer(meta, dtype=np.uint8)
    with atomic_write(path, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for member, array in members.items():
            with zf.open(member + ".npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> np.ndarray:
    """One ``.npy`` member, its declared size checked against the member's size first."""
    with zf.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise CheckpointError(f"{source}: member {info.filename!r} has unsupported .npy version {version}")
        if dtype.hasobject:
            raise CheckpointError(f"{source}: member {info.filename!r} holds Python objects (dtype {dtype}); refused")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > info.file_size:
            raise CheckpointError(f"{source}: member {info.filename!r} declares shape {shape} of {dtype} "
                                  f"({nbytes} bytes) but holds {info.file_size} bytes")
        data = handle.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{source}: member {info.filename!r} is truncated ({len(data)} of {nbytes} bytes)")
        handle.read()  # the rest (normally nothing), so zipfile verifies the CRC
    array = np.frombuffer(data, dtype=dtype)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return np.array(array, order="C")  # writable, private, C-contiguous


def _build_tree(tree, arrays: dict[str, np.ndarray], source: str):
    """Rebuild the nested value from the JSON tree (depth-bounded, types checked)."""
    used: set[str] = set()

    def fail(problem: str):
        raise CheckpointError(f"{source}: malformed metadata: {problem}")

    def build(node, depth):
        if depth > _MAX_TREE_DEPTH:
            fail(f"nesting deeper than {_MAX_TREE_DEPTH}")
        if type(node) is not dict or not isinstance(node.get("type"), str):
            fail(f"expected a node object, got {type(node).__name__}")
        kind = node["type"]
        if kind == "value":
            value = node.get("value")
            if not isinstance(value, _PLAIN_VALUES):
                fail(f"a plain value of type {type(value).__name__}")
            return value
        if kind in ("array", "scalar"):
            key = node.get("key")
            if not isinstance(key, str) or key not in arrays:
                fail(f"array {key!r:.80} is not in the file")
            used.add(key)
            array = arrays[key]
            if kind == "scalar":
                if array.ndim != 0:
                    fail(f"scalar {key!r} has shape {array.shape}")
                return array[()]
            return array
        items = node.get("items")
        if type(items) is not list:
            fail(f"{kind} node without an item list")
        if kind == "list":
            return [build(item, depth + 1) for item in items]
        if kind == "tuple":
            return tuple(build(item, depth + 1) for item in items)
        if kind == "dict":
            result = {}
            for pair in items:
                if type(pair) is not list or len(pair) != 2 or not isinstance(pair[0], (str, int)) \
                        or isinstance(pair[0], bool):
                    fail("dict items must be [str or int key, node] pairs")
                result[pair[0]] = build(pair[1], depth + 1)
            return result
        fail(f"unknown node type {kind!r:.40}")

    return build(tree, 0)


def load(path) -> Any:
    """Read a file written by :func:`save`: the same nested structure with NumPy arrays.

    A plain ``.npz`` (no minibasis metadata) gives a dict member name → array. Never
    unpickles; object arrays are refused. Raises :class:`CheckpointError` for malformed files.
    """
    source = os.fspath(path)
    with open(source, "rb") as handle, _archive_errors(source, "npz file"):
        with zipfile.ZipFile(handle) as zf:
            infos = _check_member_names(zf, source)
            arrays = {}
            for member, info in infos.items():
                if not member.endswith(".npy"):
                    raise CheckpointError(f"{source}: unexpected member {member!r:.200} (an .npz holds .npy members)")
                arrays[member[:-4]] = _read_npy(zf, info, source)
    meta = arrays.pop(_META_MEMBER, None)
    if meta is None:
        return arrays
    if meta.dtype != np.uint8 or meta.ndim != 1:
        raise CheckpointError(f"{source}: metadata member has dtype {meta.dtype} shape {meta.shape}, expected uint8 bytes")
    try:
        header = json.loads(meta.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{source}: metadata is not valid JSON: {exc}") from None
    if type(header) is not dict or header.get("format") != _FORMAT:
        raise CheckpointError(f"{source}: metadata does not describe a {_FORMAT} file")
    if header.get("version") != _FORMAT_VERSION:
        raise CheckpointError(f"{source}: format version {header.get('version')!r:.20} not supported "
                              f"(this minibasis reads version {_FORMAT_VERSION})")
    return _build_tree(header.get("tree"), arrays, source)


# ---------------------------------------------------------------------------
# PyTorch checkpoints
# ---------------------------------------------------------------------------
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_DATAPARALLEL_PREFIX = "module."
#: Tensors may materialize at most this much beyond twice the file size (zero strides
#: could otherwise expand a tiny storage to any size).
_OUTPUT_SLACK = 64 * 2**20


def _resolve_checkpoint(obj, registry: TorchStorages, source: str, byteorder: str, file_size: int):
    registry.attach_views()
    notes = Resolved()
    value = resolve(obj, name=source, limits=TORCH.limits, byteorder=byteorder,
                    output_budget=2 * file_size + _OUTPUT_SLACK, notes=notes)
    if notes.bfloat16_tensors:
        warnings.warn(f"{source}: {notes.bfloat16_tensors} bfloat16 tensor(s) converted to float32 "
                      "(exactly: bfloat16 is the top half of a float32)", stacklevel=3)
    return value


def _load_zip_checkpoint(handle, source: str, file_size: int):
    with zipfile.ZipFile(handle) as zf:
        infos = _check_member_names(zf, source)
        pickles = [name for name in infos if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{source}: expected exactly one '<archive>/data.pkl' member, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in infos:
            info = infos[prefix + "byteorder"]
            if info.file_size > 16:
                raise CheckpointError(f"{source}: byteorder record of {info.file_size} bytes")
            byteorder = _read_member(zf, info, info.file_size, source).decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{source}: byteorder record says {byteorder!r:.20}, expected 'little' or 'big'")
        info = infos[pickles[0]]
        if info.file_size > TORCH.limits.max_pickle_bytes:
            raise CheckpointError(f"{source}: data.pkl of {info.file_size} bytes exceeds the limit")
        data_pkl = _read_member(zf, info, info.file_size, source)
        registry = TorchStorages(source, legacy=False)
        obj = safe_load(data_pkl, profile=TORCH, persistent_load=registry, name=f"{source}:{pickles[0]}",
                        resolve=False)
        for key, storage in registry.roots.items():
            member = f"{prefix}data/{key}"
            if member not in infos:
                raise CheckpointError(f"{source}: storage {key!r} is referenced but {member!r} is missing")
            record = infos[member]
            if storage.nbytes > record.file_size:
                raise CheckpointError(
                    f"{source}: storage {key!r} declares {storage.numel} {storage.element.name} elements "
                    f"({storage.nbytes} bytes) but {member!r} holds {record.file_size} bytes")
            storage.data = _read_member(zf, record, storage.nbytes, source)
        return _resolve_checkpoint(obj, registry, source, byteorder, file_size)


def _load_legacy_checkpoint(data: bytes, source: str):
    """magic, protocol, sys_info, object (storages as persistent ids), storage keys, raw storages."""
    magic, pos = safe_load_prefix(data, 0, profile=PLAIN, name=f"{source} (magic number)")
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a PyTorch checkpoint (bad magic number; tar-format "
                              "checkpoints from torch < 0.1.10 are not supported)")
    protocol, pos = safe_load_prefix(data, pos, profile=PLAIN, name=f"{source} (protocol)")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: legacy protocol {protocol!r:.20}, expected {_LEGACY_PROTOCOL}")
    sys_info, pos = safe_load_prefix(data, pos, profile=PLAIN, name=f"{source} (sys_info)")
    if type(sys_info) is not dict:
        raise CheckpointError(f"{source}: sys_info is a {type(sys_info).__name__}, expected a dict")
    little_endian = sys_info.get("little_endian", True)
    if type(little_endian) is not bool:
        raise CheckpointError(f"{source}: sys_info little_endian is {type(little_endian).__name__}")
    byteorder = "little" if little_endian else "big"
    registry = TorchStorages(source, legacy=True)
    obj, pos = safe_load_prefix(data, pos, profile=TORCH, persistent_load=registry, name=source, resolve=False)
    keys, pos = safe_load_prefix(data, pos, profile=PLAIN, name=f"{source} (storage keys)")
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise CheckpointError(f"{source}: storage key list is not a list of strings")
    if len(set(keys)) != len(keys):
        raise CheckpointError(f"{source}: storage key list repeats a key")
    view = memoryview(data)
    for key in keys:
        storage = registry.roots.get(key)
        if storage is None:
            raise CheckpointError(f"{source}: storage {key!r:.80} has data but no tensor refers to it")
        if pos + 8 > len(data):
            raise CheckpointError(f"{source}: truncated: storage {key!r} size field missing at byte {pos}")
        count = int.from_bytes(data[pos:pos + 8], byteorder, signed=True)
        pos += 8
        nbytes = count * storage.element.raw.itemsize
        if count < 0 or pos + nbytes > len(data):
            raise CheckpointError(f"{source}: truncated: storage {key!r} has {count} elements "
                                  f"({nbytes} bytes) at byte {pos} but {len(data) - pos} bytes remain")
        if storage.numel > count:
            raise CheckpointError(f"{source}: storage {key!r} declares {storage.numel} {storage.element.name} "
                                  f"elements but its data holds {count}")
        storage.data = view[pos:pos + nbytes]
        pos += nbytes
    missing = sorted(set(registry.roots) - set(keys))
    if missing:
        raise CheckpointError(f"{source}: storage(s) {missing[:5]} referenced but missing from the file")
    return _resolve_checkpoint(obj, registry, source, byteorder, len(data))


def load_torch_object(path) -> Any:
    """The whole object of a ``torch.save`` file (legacy or zip), tensors as NumPy arrays.

    Never imports torch; pickles go through :data:`minibasis.safe_pickle.TORCH`. Tensors
    keep dtype (bfloat16 becomes float32, with a warning), shape and values; views are
    copied to contiguous arrays, and tensors sharing a storage share nothing afterwards.
    """
    source = os.fspath(path)
    with open(source, "rb") as handle:
        head = handle.read(4)
        handle.seek(0, os.SEEK_END)
        file_size = handle.tell()
        handle.seek(0)
        if head == _ZIP_MAGIC:
            with _archive_errors(source, "zip checkpoint"):
                return _load_zip_checkpoint(handle, source, file_size)
        if head[:1] != b"\x80":  # a legacy checkpoint opens with the pickle PROTO opcode
            raise CheckpointError(f"{source}: not a PyTorch checkpoint: neither a zip archive nor a legacy "
                                  f"pickle (the file starts with {head!r})")
        data = handle.read()
    with _archive_errors(source, "legacy checkpoint"):
        return _load_legacy_checkpoint(data, source)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, np.ndarray) for v in value.values())


def load_torch_checkpoint(path) -> "collections.OrderedDict[str, np.ndarray]":
    """A PyTorch checkpoint's state dict as name → ndarray, ready for ``Module.load_state_dict``.

    Accepts a bare state dict or a dict holding one under ``'state_dict'``,
    ``'model_state_dict'`` or ``'model'`` (other entries such as ``'best_prec1'`` are
    ignored; use :func:`load_torch_object` for them). A ``'module.'`` prefix (from
    ``nn.DataParallel``) is stripped. Order is preserved.
    """
    source = os.fspath(path)
    obj = load_torch_object(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: checkpoint holds a {type(obj).__name__}, expected a dict")
    if _is_tensor_dict(obj):
        state = obj
    else:
        nested = [key for key in _STATE_DICT_KEYS if _is_tensor_dict(obj.get(key))]
        if not nested:
            keys = [k if isinstance(k, str) else type(k).__name__ for k in list(obj)[:10]]
            raise CheckpointError(f"{source}: no state dict found: expected tensors at the top level or under "
                                  f"one of {list(_STATE_DICT_KEYS)}; top-level keys are {keys}")
        state = obj[nested[0]]
    result: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, array in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: state dict key {key!r:.60} is not a string")
        name = key[len(_DATAPARALLEL_PREFIX):] if key.startswith(_DATAPARALLEL_PREFIX) else key
        if name in result:
            raise CheckpointError(f"{source}: key {name!r} appears both with and without the 'module.' prefix")
        result[name] = array
    return result
