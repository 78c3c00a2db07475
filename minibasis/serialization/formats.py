"""Which format a weights file is in, decided once from its first bytes, and :func:`read_weights`."""
from __future__ import annotations

import os
import zipfile

import numpy as np

from minibasis.serialization.archive import ZIP_MAGIC
from minibasis.serialization.errors import CheckpointError
from minibasis.serialization.npz import load
from minibasis.serialization.torch_formats import load_torch_checkpoint

__all__ = ["NPZ", "TORCH_ZIP", "TORCH_LEGACY", "sniff_format", "read_weights"]

NPZ, TORCH_ZIP, TORCH_LEGACY = "npz", "torch-zip", "torch-legacy"
#: Where the model's arrays sit in the nested files minibasis writes (model files, training checkpoints).
_NESTED_STATE_KEYS = ("state_dict", "model")


def _holds_torch_pickle(path: str) -> bool | None:
    """Whether the zip at ``path`` has torch's ``<archive>/data.pkl``; None when it cannot be listed."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith("/data.pkl") and name.count("/") == 1 for name in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def sniff_format(path) -> str:
    """:data:`NPZ`, :data:`TORCH_ZIP` or :data:`TORCH_LEGACY` for the file at ``path``.

    A zip is a torch checkpoint when it holds ``<archive>/data.pkl``, else an ``.npz``; a zip
    too damaged to list goes by its suffix (``.npz`` or not), so the reader of that format
    reports the damage. A legacy torch checkpoint opens with the pickle PROTO opcode.
    Raises :class:`CheckpointError` for anything else, ``FileNotFoundError`` when missing.
    """
    source = os.fspath(path)
    with open(source, "rb") as handle:
        head = handle.read(4)
    if head == ZIP_MAGIC:
        torch_zip = _holds_torch_pickle(source)
        if torch_zip is None:
            torch_zip = not source.endswith(".npz")
        return TORCH_ZIP if torch_zip else NPZ
    if head[:1] == b"\x80":
        return TORCH_LEGACY
    raise CheckpointError(f"{source}: neither an .npz nor a PyTorch checkpoint (the file starts with {head!r})")


def read_weights(path) -> dict[str, np.ndarray]:
    """Name → array from an ``.npz`` (a state dict, or a model file / training checkpoint
    holding one under "state_dict" / "model") or a PyTorch checkpoint (see
    :func:`load_torch_checkpoint`). The format is sniffed once (:func:`sniff_format`)."""
    source = os.fspath(path)
    if sniff_format(source) != NPZ:
        return load_torch_checkpoint(source)
    content = load(source)
    if isinstance(content, dict):
        for key in _NESTED_STATE_KEYS:
            if isinstance(content.get(key), dict):
                content = content[key]
                break
    if not isinstance(content, dict) or not content or \
            not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in content.items()):
        raise CheckpointError(f"{source}: holds no state dict (name → array)")
    return content
