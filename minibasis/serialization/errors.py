"""The exceptions every reader raises: all ``ValueError`` subclasses that name the file."""
from __future__ import annotations

__all__ = ["PickleDataError", "UnsafePickleError", "CheckpointError"]


class PickleDataError(ValueError):
    """A pickle is malformed, truncated or inconsistent (names the file)."""


class UnsafePickleError(PickleDataError):
    """A pickle asks for something the restricted unpickler refuses: a global outside
    the allow-list, a forbidden opcode, a bad persistent id, or more resources than
    the limits allow. Names the offending global/opcode and the file."""


class CheckpointError(ValueError):
    """A model or checkpoint file is malformed, truncated or inconsistent (names file and problem)."""
