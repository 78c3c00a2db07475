"""Reading and writing model files: atomic writes, ``.npz`` state files, PyTorch checkpoints.

The implementation lives in :mod:`minibasis.serialization`; this module keeps the public
names where they always were:

* :func:`atomic_write`: every file minibasis writes goes through it (temp file in the same
  folder, flush + fsync, ``os.replace``).
* :func:`save` / :func:`load`: nested state in one ``.npz``, read back without pickle.
* :func:`load_torch_checkpoint` / :func:`load_torch_object`: ``torch.save`` files (legacy and
  zip formats) without torch, through the restricted unpickler.
* :func:`read_weights`: any of those files → name → array, the format sniffed once.

Every problem with a file raises :class:`CheckpointError` (a ``ValueError``) naming the file,
or :class:`~minibasis.serialization.UnsafePickleError` when a pickle asks for something refused.
"""
from minibasis.serialization import (
    CheckpointError, atomic_write, load, load_torch_checkpoint, load_torch_object, read_weights, save,
)

__all__ = ["CheckpointError", "atomic_write", "save", "load", "load_torch_checkpoint", "load_torch_object",
           "read_weights"]
