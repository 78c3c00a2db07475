"""The ``.npz`` state format: nested state (model ``state_dict``, optimizer state, epoch, RNG
state, ...) in one ``.npz``: arrays as ``.npy`` members under flattened names, the nesting and
the plain values in a JSON member. Written atomically; read back without pickle
(``allow_pickle`` is never on)."""
from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from minibasis import backend
from minibasis.serialization.archive import _archive_errors, _check_member_names
from minibasis.serialization.atomic import atomic_write
from minibasis.serialization.errors import CheckpointError

__all__ = ["save", "load"]


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
