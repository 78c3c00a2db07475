"""The command line's error type, beside the verbs that raise it.

Library code raises library exceptions (``ValueError``, ``TypeError``,
``minibasis.training.CheckpointError``, ...); only the verbs turn them into a
:class:`UserError`, which ``minibasis.cli`` prints as one line with exit code 2.
"""
from __future__ import annotations

__all__ = ["UserError", "first_line", "user_error_for_non_finite"]


class UserError(Exception):
    """An error the user can fix; the CLI prints its message on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def user_error_for_non_finite(exc) -> UserError:
    """A training that went NaN/inf, as the one-line message the command line prints."""
    return UserError(f"{exc} (lower the learning rate; --detect-anomaly names the first module where it happens)")
