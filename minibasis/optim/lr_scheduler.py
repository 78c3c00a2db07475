"""Learning-rate schedules, stepped once per epoch: PyTorch's ``torch.optim.lr_scheduler``.

Each schedule sets every parameter group's lr to a closed form of (base lr, epoch), where
the base lr is the group's lr when the schedule was made and the epoch counts ``step()``
calls (``last_epoch``). The closed forms equal PyTorch's sequences (which PyTorch computes
step by step from the current lr, so the two differ only in the last bits). ``state_dict``
holds the schedule's settings and ``last_epoch``; training checkpoints save it.
"""
from __future__ import annotations

import bisect
import math

from minibasis.checks import is_int
from minibasis.optim.optimizer import Optimizer, check_real

__all__ = ["LRScheduler", "StepLR", "MultiStepLR", "CosineAnnealingLR"]


class LRScheduler:
    """Base class: subclasses define ``lr_at(base_lr, epoch)``."""

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} needs a minibasis.optim Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_epoch = 0

    def lr_at(self, base_lr: float, epoch: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> None:
        """End of an epoch: move every group's lr to the next epoch's value."""
        self.last_epoch += 1
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(base, self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Every setting and ``last_epoch`` (not the optimizer, which saves itself)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in vars(self).items() if k != "optimizer"}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (each value keeps this schedule's types)."""
        own = self.state_dict()
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__} load_state_dict: expected a dict, got {type(state).__name__}")
        missing = [k for k in own if k not in state]
        if missing:
            raise KeyError(f"{type(self).__name__} load_state_dict: missing keys {missing}")
        for key, current in own.items():
            setattr(self, key, _same_type(current, state[key]))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if k not in ("base_lrs",))
        return f"{type(self).__name__}({settings})"


def _same_type(current, value):
    """``value`` with ``current``'s type (a checkpoint may give 0-d arrays or lists for tuples)."""
    if isinstance(current, list):
        kind = type(current[0]) if current else (lambda v: v)
        return [kind(v) for v in value]
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        return type(current)(value)
    return value


def _check_gamma(who: str, gamma) -> None:
    check_real(who, "gamma", gamma)
    if gamma == 0:
        raise ValueError(f"{who}: gamma must be a finite number > 0, got {gamma!r}")


class StepLR(LRScheduler):
    """lr = base · gamma^⌊epoch / step_size⌋: multiply by ``gamma`` every ``step_size`` epochs."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        if not is_int(step_size):
            raise TypeError(f"StepLR: step_size must be an int, got {step_size!r}")
        if step_size < 1:
            raise ValueError(f"step_size must be ≥ 1, got {step_size}")
        _check_gamma("StepLR", gamma)
        super().__init__(optimizer)
        self.step_size, self.gamma = int(step_size), float(gamma)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """lr = base · gamma^(number of milestones ≤ epoch): multiply by ``gamma`` at each milestone."""

    def __init__(self, optimizer: Optimizer, milestones, gamma: float = 0.1):
        if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
            raise TypeError(f"MultiStepLR: milestones must be a list of epochs, got {milestones!r}")
        milestones = list(milestones)
        if not all(is_int(m) and m >= 0 for m in milestones):
            raise ValueError(f"MultiStepLR: milestones must be epochs (ints ≥ 0), got {milestones!r}")
        _check_gamma("MultiStepLR", gamma)
        super().__init__(optimizer)
        self.milestones, self.gamma = sorted(int(m) for m in milestones), float(gamma)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base − eta_min)·(1 + cos(π·epoch / T_max))/2: from base down to
    ``eta_min`` over ``T_max`` epochs (and back up after, as PyTorch's)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803 - PyTorch's name
        if not is_int(T_max) or T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be an int ≥ 1, got {T_max!r}")
        check_real("CosineAnnealingLR", "eta_min", eta_min)
        super().__init__(optimizer)
        self.T_max, self.eta_min = int(T_max), float(eta_min)

    def lr_at(self, base_lr: float, epoch: int) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
