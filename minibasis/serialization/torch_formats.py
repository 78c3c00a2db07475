"""PyTorch checkpoint containers, read without torch: the zip format (``<archive>/data.pkl``
plus one member per storage) and the legacy format (magic, protocol, sys_info, the object,
the storage keys and the raw storages back to back), through the :data:`TORCH` profile."""
from __future__ import annotations

import collections
import os
import warnings
import zipfile
from typing import Any

import numpy as np

from minibasis.serialization.archive import ZIP_MAGIC, _archive_errors, _check_member_names, _read_member
from minibasis.serialization.errors import CheckpointError
from minibasis.serialization.torch_profile import TORCH, TorchStorages
from minibasis.serialization.unpickler import PLAIN, Resolved, resolve, safe_load, safe_load_prefix

__all__ = ["load_torch_object", "load_torch_checkpoint"]


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
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

    Never imports torch; pickles go through :data:`~minibasis.serialization.TORCH`. Tensors
    keep dtype (bfloat16 becomes float32, with a warning), shape and values; views are
    copied to contiguous arrays, and tensors sharing a storage share nothing afterwards.
    """
    source = os.fspath(path)
    with open(source, "rb") as handle:
        head = handle.read(4)
        handle.seek(0, os.SEEK_END)
        file_size = handle.tell()
        handle.seek(0)
        if head == ZIP_MAGIC:
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
