"""Adam and AdamW: PyTorch's ``torch.optim.Adam`` / ``AdamW`` update rules (``amsgrad`` included).

Per parameter, at step t with gradient g (Adam: g + weight_decay·p; AdamW instead shrinks
p by the factor 1 − lr·weight_decay first):

    m ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²   (v̂ = running max of v with amsgrad)
    p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)

The state per parameter is ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) and, with
amsgrad, ``max_exp_avg_sq``: PyTorch's names, saved and restored by ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Iterable

from minibasis import backend
from minibasis.optim.optimizer import Optimizer, check_real

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as PyTorch's ``Adam``."""

    #: AdamW decays the weights directly (decoupled) instead of adding weight_decay·p to g.
    decoupled_weight_decay = False

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self._check_options(defaults)
        super().__init__(params, defaults)

    def _check_options(self, group: dict) -> None:
        who = type(self).__name__
        for name in ("lr", "eps", "weight_decay"):
            check_real(who, name, group[name])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{who}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            check_real(who, f"betas[{i}]", beta, 0.0, 1.0)
        if not isinstance(group["amsgrad"], bool):
            raise TypeError(f"{who}: amsgrad must be a bool, got {group['amsgrad']!r}")

    def step(self) -> None:
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                xp = backend.get_array_module(p.data)
                g = p.grad.data
                state = self.state.setdefault(id(p), {})
                if not state:
                    state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = xp.zeros_like(p.data)
                state["step"] += 1
                t = state["step"]
                if wd and self.decoupled_weight_decay:
                    p.data *= 1 - lr * wd
                elif wd:
                    g = g + wd * p.data
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * (g * g)
                if group["amsgrad"]:
                    v = xp.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                denom = xp.sqrt(v) / math.sqrt(1 - beta2 ** t) + eps
                p.data -= (lr / (1 - beta1 ** t)) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as PyTorch's ``AdamW``
    (whose default weight_decay is 0.01)."""

    decoupled_weight_decay = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
