"""The optimizer base: parameter groups, zero_grad, and a state dict that checkpoints save.

Each optimizer's update follows PyTorch's (so runs can be compared step by step). A
parameter is skipped when it has no gradient or when ``requires_grad`` is False, which is
how layers are frozen. Optimizer updates are bookkeeping, not ops of the model, and are not
multiplication-counted.
"""
from __future__ import annotations

import math
import numbers

from minibasis import backend
from minibasis.autograd import Tensor
from minibasis.nn.module import Parameter

__all__ = ["Optimizer", "check_real"]


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
        # Plain numbers (Adam's step count) are kept as they are.
        state = {index[pid]: {k: backend.to_numpy(v).copy() if hasattr(v, "shape") else v for k, v in s.items()}
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
                if not hasattr(v, "shape") or (k == "step" and tuple(v.shape) == ()):  # a count, maybe read back 0-d
                    restored[k] = int(v)
                    continue
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {k!r} of parameter {key} has shape {tuple(v.shape)}, "
                                     f"the parameter has {p.shape}")
                restored[k] = backend.asarray(v).astype(p.dtype)
            self.state[id(p)] = restored


def check_real(who: str, name: str, value, low: float = 0.0, below: float | None = None) -> None:
    """Raise unless ``value`` is a finite real number ≥ ``low`` (and < ``below`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r}")
    if not (math.isfinite(value) and value >= low and (below is None or value < below)):
        bound = f"in [{low:g}, {below:g})" if below is not None else f"≥ {low:g}"
        raise ValueError(f"{who} needs a finite {name} {bound}, got {value!r}")
