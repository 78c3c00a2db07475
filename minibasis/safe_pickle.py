"""The restricted unpickler minibasis uses for every pickle it reads (see SECURITY.md).

The implementation lives in :mod:`minibasis.serialization` (the core in
:mod:`~minibasis.serialization.unpickler`, the profiles in
:mod:`~minibasis.serialization.numpy_profile` and :mod:`~minibasis.serialization.torch_profile`);
this module keeps the public names where they always were.
"""
from minibasis.serialization import (
    CIFAR, PLAIN, TORCH, TORCH_STORAGE_TYPES, Limits, PickleDataError, Profile, Resolved, TorchElement,
    TorchStorage, TorchStorages, UnsafePickleError, resolve, safe_load, safe_load_prefix,
)

__all__ = [
    "PickleDataError", "UnsafePickleError", "Limits", "Profile", "CIFAR", "TORCH", "PLAIN",
    "safe_load", "safe_load_prefix", "resolve", "Resolved", "TorchStorage", "TorchStorages", "TorchElement",
    "TORCH_STORAGE_TYPES",
]
