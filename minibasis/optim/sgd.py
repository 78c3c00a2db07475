"""SGD with momentum, Nesterov momentum and weight decay: PyTorch's ``torch.optim.SGD``."""
from __future__ import annotations

from typing import Iterable

from minibasis.optim.optimizer import Optimizer, check_real

__all__ = ["SGD"]


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
            check_real("SGD", name, group[name])
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
