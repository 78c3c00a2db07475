"""Reading and writing files safely: one package for every byte minibasis reads or writes.

* :mod:`~.atomic`: :func:`atomic_write` (temp file, fsync, rename), used for every file written.
* :mod:`~.npz`: :func:`save` / :func:`load`, nested state in one ``.npz`` without pickle.
* :mod:`~.archive`: zip member checks shared by ``.npz`` and torch zip files.
* :mod:`~.unpickler`: the guarded unpickler core (limits, opcode pre-scan, restricted
  ``find_class``, the placeholder resolver) and the :data:`PLAIN` profile.
* :mod:`~.numpy_profile` (:data:`CIFAR`) and :mod:`~.torch_profile` (:data:`TORCH`): what
  each pickle format may name, as stand-ins.
* :mod:`~.torch_formats`: PyTorch's zip and legacy containers
  (:func:`load_torch_object`, :func:`load_torch_checkpoint`), without torch.
* :mod:`~.formats`: :func:`sniff_format` and :func:`read_weights` (any weights file → name → array).
* :mod:`~.safetensors_format`: ``.safetensors`` model records and state dicts (the ``safetensors`` extra).

Files from outside are untrusted: every problem raises :class:`CheckpointError` (a
``ValueError``) naming the file and what is wrong, or :class:`UnsafePickleError` when a
pickle asks for something refused (see SECURITY.md). ``minibasis.io`` is the
documented short name for the file functions.
"""
from minibasis.serialization.atomic import atomic_write
from minibasis.serialization.errors import CheckpointError, PickleDataError, UnsafePickleError
from minibasis.serialization.formats import NPZ, TORCH_LEGACY, TORCH_ZIP, read_weights, sniff_format
from minibasis.serialization.npz import load, save
from minibasis.serialization.numpy_profile import CIFAR
from minibasis.serialization.torch_formats import load_torch_checkpoint, load_torch_object
from minibasis.serialization.torch_profile import (
    TORCH, TORCH_STORAGE_TYPES, TorchElement, TorchStorage, TorchStorages,
)
from minibasis.serialization.unpickler import PLAIN, Limits, Profile, Resolved, resolve, safe_load, safe_load_prefix

__all__ = ["atomic_write", "save", "load", "read_weights", "sniff_format", "NPZ", "TORCH_ZIP", "TORCH_LEGACY",
           "load_torch_checkpoint", "load_torch_object", "CheckpointError", "PickleDataError", "UnsafePickleError",
           "Limits", "Profile", "CIFAR", "TORCH", "PLAIN", "safe_load", "safe_load_prefix", "resolve", "Resolved",
           "TorchStorage", "TorchStorages", "TorchElement", "TORCH_STORAGE_TYPES"]
