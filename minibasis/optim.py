"""SGD (momentum, Nesterov, weight decay) with parameter groups, and StepLR.

Updates follow PyTorch's ``torch.optim.SGD`` exactly (so runs can be compared
step by step). A parameter is skipped when it has no gradient or when
``requires_grad`` is False, which is how layers are frozen. Optimizer updates
are bookkeeping, not ops of the model, and are not multiplication-counted.
"""
from __future__ import annotations

from typing import Iterable

from minibasis import backend
from minibasis.nn.module import Parameter

__all__ = ["SGD", "StepLR", "Optimizer"]


class Optimizer:
    defaults: dict

    def __init__(self, params, defaults: dict):
        self.defaults = defaults
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups: list[dict] = []
        for group in groups:
            self.add_param_group(group)
        self.state: dict[int, dict] = {}

    def add_param_group(self, group: dict) -> None:
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
        self.param_groups.append({**self.defaults, **group, "params": params})

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
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs lr, momentum, weight_decay ≥ 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

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
        if step_size < 1:
            raise ValueError(f"step_size must be ≥ 1, got {step_size}")
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
        self.step_size, self.gamma = int(state["step_size"]), float(state["gamma"])
        self.base_lrs, self.last_epoch = [float(v) for v in state["base_lrs"]], int(state["last_epoch"])
