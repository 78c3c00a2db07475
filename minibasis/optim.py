"""SGD (momentum, Nesterov, weight decay) with parameter groups, and StepLR.

Updates follow PyTorch's ``torch.optim.SGD`` exactly (so runs can be compared
step by step). A parameter is skipped when it has no gradient or when
``requires_grad`` is False, which is how layers are frozen. Optimizer updates
are bookkeeping, not ops of the model, and are not multiplication-counted.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

from minibasis import backend
from minibasis.autograd import Tensor
from minibasis.nn.module import Parameter

__all__ = ["SGD", "StepLR", "Optimizer"]


class Optimizer:
    defaults: dict

    def __init__(self, params, defaults: dict):
        self.defaults = defaults
        if isinstance(params, Tensor):
            raise TypeError("optimizer params must be an iterable of Parameters (e.g. model.parameters()), "
                            "got a single tensor; pass [param]")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError("optimizer params must be an iterable of Parameters or of parameter-group dicts "
                            f"(e.g. model.parameters()), got {type(params).__name__}") from None
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict] = []
        for group in groups:
            self.add_param_group(group)
        self.state: dict[int, dict] = {}

    def add_param_group(self, group: dict) -> None:
        if not isinstance(group, dict) or "params" not in group:
            got = sorted(map(str, group)) if isinstance(group, dict) else type(group).__name__
            raise ValueError(f"a parameter group must be a dict with a 'params' entry, got {got}")
        params = list(group["params"])
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"optimizer params must be Parameters, got {type(p).__name__}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("a parameter appears in more than one parameter group")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown optimizer options {sorted(unknown)}; known: {sorted(self.defaults)}")
        merged = {**self.defaults, **group, "params": params}
        self._check_options(merged)
        self.param_groups.append(merged)

    def _check_options(self, group: dict) -> None:
        """Raise for hyper-parameters out of range (each optimizer knows its own)."""

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """Hyper-parameters per group and per-parameter state, keyed by position (PyTorch's layout)."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        # A copy: on NumPy to_numpy returns the live buffer, which later steps update in place.
        state = {index[pid]: {k: backend.to_numpy(v).copy() for k, v in s.items()}
                 for pid, s in self.state.items() if pid in index}
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"optimizer load_state_dict: expected a dict, got {type(state_dict).__name__}")
        missing = [key for key in ("param_groups", "state") if key not in state_dict]
        if missing:
            raise KeyError(f"optimizer load_state_dict: missing keys {missing} (has {sorted(map(str, state_dict))})")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state does not fit: the parameter groups differ in number or size")
        params = self._params()
        for saved, group in zip(groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for key, s in state_dict["state"].items():
            p = params[int(key)]
            restored = {}
            for k, v in s.items():
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {k!r} of parameter {key} has shape {tuple(v.shape)}, "
                                     f"the parameter has {p.shape}")
                restored[k] = backend.asarray(v).astype(p.dtype)
            self.state[id(p)] = restored


class SGD(Optimizer):
    """Stochastic gradient descent, PyTorch's update rule.

    With g = grad + weight_decay·p, buf ← momentum·buf + (1 − dampening)·g
    (buf = g at the first step), the step is g + momentum·buf with Nesterov,
    else buf, and p ← p − lr·step.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        self._check_options(defaults)
        super().__init__(params, defaults)

    def _check_options(self, group: dict) -> None:
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"SGD: {name} must be a real number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SGD needs a finite {name} ≥ 0, got {value!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"Nesterov momentum needs momentum > 0 and dampening = 0, "
                             f"got momentum={group['momentum']!r}, dampening={group['dampening']!r}")

    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                g = p.grad.data
                if wd:
                    g = g + wd * p.data
                if momentum:
                    state = self.state.setdefault(id(p), {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.copy()
                    else:
                        buf *= momentum
                        buf += (1 - group["dampening"]) * g
                    g = g + momentum * buf if group["nesterov"] else buf
                p.data -= lr * g


class StepLR:
    """Multiply each group's learning rate by ``gamma`` every ``step_size`` calls of ``step()`` (epochs)."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"StepLR needs a minibasis.optim Optimizer, got {type(optimizer).__name__}")
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral):
            raise TypeError(f"StepLR: step_size must be an int, got {step_size!r}")
        if step_size < 1:
            raise ValueError(f"step_size must be ≥ 1, got {step_size}")
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
            raise TypeError(f"StepLR: gamma must be a real number, got {gamma!r}")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"StepLR: gamma must be a finite number > 0, got {gamma!r}")
        self.optimizer, self.step_size, self.gamma = optimizer, step_size, gamma
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_epoch = 0

    def step(self) -> None:
        self.last_epoch += 1
        factor = self.gamma ** (self.last_epoch // self.step_size)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma, "base_lrs": list(self.base_lrs),
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("step_size", "gamma", "base_lrs", "last_epoch") if k not in state]
        if missing:
            raise KeyError(f"StepLR load_state_dict: missing keys {missing}")
        self.step_size, self.gamma = int(state["step_size"]), float(state["gamma"])
        self.base_lrs, self.last_epoch = [float(v) for v in state["base_lrs"]], int(state["last_epoch"])
