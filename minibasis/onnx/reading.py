"""Reading an ONNX file from outside, as untrusted input.

What is checked before a graph is looked at (SECURITY.md lists the same):

* the file is a regular file no larger than ``max_bytes`` (default 2 GiB, protobuf's own
  ceiling), read in one piece — nothing is memory-mapped or followed lazily;
* it parses as an ONNX ``ModelProto`` (protobuf decoding only: no code runs), declares an
  IR version and the default operator set, and has a graph with at least one node
  (a text file, a picture or a truncated file fails here with :class:`ModelFileError`);
* tensors kept in external data files are refused unless ``allow_external_data=True``;
  then each file must be a plain relative path that resolves (after symlinks) inside the
  model's own folder, and each tensor's offset and length must lie within its file;
  their bytes count toward ``max_bytes`` too;
* ``onnx.checker`` validates the structure (types, topological order, attribute kinds).
"""
from __future__ import annotations

import os
from pathlib import Path

from minibasis.model_files import ModelFileError

#: protobuf cannot hold a message over 2 GiB; larger weights need external data.
DEFAULT_MAX_BYTES = 2 ** 31


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ModelFileError("reading ONNX files needs the onnx package: pip install 'minibasis[onnx]'") from None
    return onnx


def read_model(path, *, max_bytes: int = DEFAULT_MAX_BYTES, allow_external_data: bool = False):
    """The checked ``onnx.ModelProto`` in the file at ``path`` (external tensors loaded in)."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file (or not a regular file)")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelFileError(f"{path}: {size} bytes is over the {max_bytes}-byte limit for a model file")
    data = path.read_bytes()
    model = _parse(onnx, data, str(path))
    _load_external_data(model, path, size, max_bytes, allow_external_data)
    _check(onnx, model, str(path))
    return model


def parse_model(data: bytes, source: str):
    """The checked ``onnx.ModelProto`` in ``data`` (a graph kept inside a minibasis model file)."""
    onnx = _onnx()
    model = _parse(onnx, bytes(data), source)
    if _external_tensors(model):
        raise ModelFileError(f"{source}: an embedded ONNX graph may not refer to external data files")
    _check(onnx, model, source)
    return model


def _parse(onnx, data: bytes, source: str):
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{source}: not an ONNX model, or a truncated one ({error})") from None
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise ModelFileError(f"{source}: not an ONNX model, or a truncated one (no IR version, operator set "
                             "or graph nodes)")
    return model


def _check(onnx, model, source: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{source}: not a valid ONNX model: {first}") from None


def _external_tensors(model):
    from onnx import TensorProto
    graph_tensors = list(model.graph.initializer)
    graph_tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    return [t for t in graph_tensors if t.data_location == TensorProto.EXTERNAL]


def _load_external_data(model, path: Path, size: int, max_bytes: int, allowed: bool) -> None:
    tensors = _external_tensors(model)
    if not tensors:
        return
    if not allowed:
        raise ModelFileError(f"{path}: {len(tensors)} tensor(s) are stored in external data files; "
                             "pass allow_external_data=True to read files beside the model")
    folder = path.resolve().parent
    total = size
    for tensor in tensors:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        relative = Path(location)
        if not location or relative.is_absolute() or ".." in relative.parts or os.sep + os.sep in location:
            raise ModelFileError(f"{path}: external data location {location!r} of tensor {tensor.name!r} is not "
                                 "a plain relative path inside the model's folder")
        target = (folder / relative).resolve()
        if folder not in target.parents or not target.is_file():
            raise ModelFileError(f"{path}: external data file {location!r} of tensor {tensor.name!r} is not a "
                                 "regular file inside the model's folder")
        file_size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else file_size - offset
        except ValueError:
            raise ModelFileError(f"{path}: tensor {tensor.name!r} has a malformed external offset/length") from None
        if offset < 0 or length < 0 or offset + length > file_size:
            raise ModelFileError(f"{path}: tensor {tensor.name!r} reads bytes {offset}..{offset + length} of "
                                 f"{location!r}, which has {file_size}")
        total += length
        if total > max_bytes:
            raise ModelFileError(f"{path}: model and external data exceed the {max_bytes}-byte limit")
        with open(target, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = 0  # DEFAULT: the bytes are in the tensor now
