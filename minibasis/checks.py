"""Argument checks shared by every layer of minibasis: one accepted set of inputs, one message.

functions, nn, basis, formulas, compress, data and the CLI all validate their integer options,
int pairs (kernel sizes, strides, paddings) and energy thresholds here, so ``conv2d`` and
``nn.Conv2d`` accept exactly the same strides and say the same thing about a wrong one.

Rules (the same everywhere):
- an integer is a Python or NumPy integer, never a ``bool`` (``Conv2d(True, ...)`` is a mistake,
  not one channel) and never a float, even an integral one;
- a pair is an integer (used for both dimensions) or a tuple/list of exactly two integers;
- an energy threshold is a real number in (0, 1].

A value of the wrong *type* raises :class:`ArgumentTypeError`, which is both a ``TypeError``
(what PyTorch raises there) and a ``ValueError`` (so ``except ValueError`` keeps catching every
bad argument, as NumPy's ``AxisError`` is both a ``ValueError`` and an ``IndexError``). A value of
the right type outside its range raises ``ValueError``.
"""
from __future__ import annotations

import numbers

__all__ = [
    "ArgumentTypeError", "is_int", "positive_int", "non_negative_int", "int_at_least",
    "int_pair", "positive_pair", "non_negative_pair", "energy_threshold", "probability",
]


class ArgumentTypeError(ValueError, TypeError):
    """An argument of the wrong type (a float where an int belongs, a string, None, a bool)."""


def is_int(value) -> bool:
    """True for Python and NumPy integers; False for bools, floats and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(minimum: int) -> str:
    return {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")


def int_at_least(name: str, value, minimum: int) -> int:
    """``value`` as a Python int, or an error naming ``name``, the rule and the value."""
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be {_describe(minimum)}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {_describe(minimum)}, got {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    """An integer >= 1 (channels, features, batch sizes, Q)."""
    return int_at_least(name, value, 1)


def non_negative_int(name: str, value) -> int:
    """An integer >= 0 (paddings, counts, epochs, indices)."""
    return int_at_least(name, value, 0)


def int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int (used twice) or a pair of ints, each >= ``minimum``, as a tuple of two Python ints."""
    if is_int(value):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        pair = tuple(value)
    else:
        raise ArgumentTypeError(f"{name} must be {_describe(minimum)} or a pair of them, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be {_describe(minimum)} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def positive_pair(name: str, value) -> tuple[int, int]:
    """Kernel sizes, strides, dilations."""
    return int_pair(name, value, 1)


def non_negative_pair(name: str, value) -> tuple[int, int]:
    """Paddings."""
    return int_pair(name, value, 0)


def energy_threshold(value, name: str = "energy_threshold") -> float:
    """The paper's threshold t: the retained fraction of the eigenvalue energy, in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def positive_number(name: str, value) -> float:
    """A real number > 0 (refuses bools and NaN)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a positive number, got {value!r}")
    if not float(value) > 0:  # also refuses NaN
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def probability(name: str, value, *, inclusive_high: bool = True) -> float:
    """A real number in [0, 1] (or [0, 1) with ``inclusive_high=False``)."""
    bound = "1]" if inclusive_high else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number in [0, {bound}, got {value!r}")
    v = float(value)
    if not (0.0 <= v <= 1.0 if inclusive_high else 0.0 <= v < 1.0):
        raise ValueError(f"{name} must be in [0, {bound}, got {value!r}")
    return v
