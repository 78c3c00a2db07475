"""Weight initializations the zoo's source repositories use, drawn on the host (same seed, same weights on every backend).

Only training from scratch depends on these; loaded checkpoints overwrite them.
"""
from __future__ import annotations

import math

from minibasis import backend
from minibasis.nn import Parameter

__all__ = ["kaiming_normal_", "normal_", "zeros_"]


def _fans(weight: Parameter) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight (out, in, *kernel) as PyTorch computes them."""
    shape = tuple(weight.shape)
    if len(shape) < 2:
        raise ValueError(f"fan of a weight needs at least 2 dimensions, got shape {shape}")
    receptive = 1
    for n in shape[2:]:
        receptive *= n
    return shape[1] * receptive, shape[0] * receptive


def kaiming_normal_(weight: Parameter, mode: str = "fan_in") -> Parameter:
    """N(0, 2/fan) in place, the ReLU gain (PyTorch's ``kaiming_normal_``; ``mode`` "fan_in" or "fan_out")."""
    fan_in, fan_out = _fans(weight)
    fans = {"fan_in": fan_in, "fan_out": fan_out}
    if mode not in fans:
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    return normal_(weight, math.sqrt(2.0 / fans[mode]))


def normal_(weight: Parameter, std: float) -> Parameter:
    """N(0, std²) in place."""
    weight.data = backend.random_normal(0.0, std, tuple(weight.shape), dtype=weight.dtype)
    return weight


def zeros_(weight: Parameter) -> Parameter:
    weight.data = backend.xp.zeros(tuple(weight.shape), dtype=weight.dtype)
    return weight
