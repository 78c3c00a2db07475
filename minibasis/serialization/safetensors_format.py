"""``.safetensors`` files: the same self-describing record as a model ``.npz``, or a plain state dict.

The format (the ``safetensors`` package, an optional extra) is an 8-byte header length, a
JSON header (tensor names, dtypes, shapes, byte ranges, and a ``__metadata__`` map of
strings) and the raw tensor bytes: nothing in it can run code. A minibasis record keeps
its ``state_dict`` as the tensors and everything else (format, architecture, BasisConv
layout, normalization, ...) as one JSON string under the metadata key ``minibasis_record``;
a file without that key is read as a plain state dict (name → array).
"""
from __future__ import annotations

import json
import os

import numpy as np

from minibasis.serialization.atomic import atomic_write
from minibasis.serialization.errors import CheckpointError

__all__ = ["SAFETENSORS_SUFFIX", "is_safetensors", "save_safetensors", "load_safetensors"]

SAFETENSORS_SUFFIX = ".safetensors"
RECORD_KEY = "minibasis_record"
#: A header larger than this is refused before it is parsed (real headers are kilobytes).
MAX_HEADER_BYTES = 100 * 2 ** 20


def _numpy_api():
    try:
        import safetensors.numpy
    except ImportError:
        raise CheckpointError("reading or writing .safetensors files needs the safetensors package: "
                              "pip install safetensors") from None
    return safetensors.numpy


def is_safetensors(path) -> bool:
    """Whether the file at ``path`` starts like a safetensors file (header length, then '{')."""
    with open(os.fspath(path), "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8


def save_safetensors(record: dict, path) -> None:
    """Write ``record`` (a dict whose ``"state_dict"`` maps names to arrays; every other entry
    JSON-serializable) to ``path`` atomically. A dict of arrays alone is written as a plain
    state dict."""
    record = dict(record)
    state = record.pop("state_dict", None)
    if state is None:
        state, record = record, {}
    try:
        metadata = {RECORD_KEY: json.dumps(record)} if record else None
    except TypeError as error:
        raise ValueError(f"save_model: a .safetensors file stores metadata as JSON text: {error}") from None
    tensors = {str(k): np.ascontiguousarray(v) for k, v in state.items()}
    data = _numpy_api().save(tensors, metadata=metadata)
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def load_safetensors(path) -> dict:
    """The record written by :func:`save_safetensors` (with its ``"state_dict"``), or name → array
    for a plain safetensors state dict. Raises :class:`CheckpointError` for a malformed file."""
    source = os.fspath(path)
    with open(source, "rb") as handle:
        data = handle.read()
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise CheckpointError(f"{source}: not a safetensors file (header length {size} for {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + size])
        tensors = _numpy_api().load(data)
    except Exception as error:  # the Rust reader raises its own SafetensorError type
        raise CheckpointError(f"{source}: malformed safetensors file: {error}") from None
    text = (header.get("__metadata__") or {}).get(RECORD_KEY) if isinstance(header, dict) else None
    if text is None:
        return tensors
    try:
        record = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{source}: malformed {RECORD_KEY} metadata: {error}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{source}: {RECORD_KEY} metadata is a {type(record).__name__}, not a record")
    record["state_dict"] = tensors
    return record
