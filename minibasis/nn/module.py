"""Module: parameters, buffers, submodules, train/eval, state_dict, PyTorch's conventions."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Iterator

from minibasis import backend, counting
from minibasis.autograd import Tensor

__all__ = ["Module", "Parameter", "RemovableHandle"]


class Parameter(Tensor):
    """A Tensor that a Module registers as learnable (requires_grad defaults to True)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.data
        if getattr(getattr(data, "dtype", None), "kind", None) != "f":
            raise TypeError(f"a Parameter must hold floating data, got dtype {getattr(data, 'dtype', type(data))}")
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


# The chain of modules currently executing, with their paths, so that counts are
# attributed to "layer1.0.conv1" rather than to a class name.
_call_stack: list[tuple["Module", str]] = []


def _path_of(module: "Module") -> str:
    if not _call_stack:
        return ""
    parent, parent_path = _call_stack[-1]
    name = next((k for k, m in parent._modules.items() if m is module), None)
    if name is None:  # called from a parent that does not own it (e.g. a shared module)
        name = next((k for k, m in parent.named_modules() if m is module and k), type(module).__name__)
    return f"{parent_path}.{name}" if parent_path else name


def _check_child_name(who: str, name) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{who}: name must be a str, got {type(name).__name__}")
    if not name or "." in name:
        raise ValueError(f"{who}: name {name!r} must be non-empty and contain no '.' "
                         "(dots separate module paths in state_dict keys)")


class RemovableHandle:
    """What ``register_forward_hook`` returns: ``handle.remove()`` takes the hook off again
    (also usable as a context manager: the hook is removed on exit)."""

    _next_id = 0

    def __init__(self, hooks: "OrderedDict[int, Callable]", hook: Callable):
        RemovableHandle._next_id += 1
        self.id = RemovableHandle._next_id
        self._hooks = hooks
        hooks[self.id] = hook

    def remove(self) -> None:
        self._hooks.pop(self.id, None)

    def __enter__(self) -> "RemovableHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Module:
    """Base class of layers and models; subclasses define ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- registration -----------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        if name in self._buffers and not isinstance(value, (Parameter, Module)):
            self._buffers[name] = value  # re-assigning a buffer keeps it a buffer
            return
        for store in (self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        if isinstance(value, Parameter) or (value is None and name in ("weight", "bias")):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)
            return
        self.__dict__.pop(name, None)

    def __getattr__(self, name: str) -> Any:
        for store in ("_parameters", "_buffers", "_modules"):
            values = self.__dict__.get(store)
            if values is not None and name in values:
                return values[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array, persistent: bool = True) -> None:
        """A non-learnable array saved in ``state_dict`` when persistent (BN statistics, fixed bases)."""
        _check_child_name("register_buffer", name)
        self.__dict__.pop(name, None)
        self._buffers[name] = array
        if not persistent:
            self.__dict__.setdefault("_non_persistent", set()).add(name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register ``param`` under ``name``; ``None`` declares the slot empty (``bias=False``).

        An empty slot is skipped by ``parameters()`` and ``state_dict()``, and assigning a
        Parameter to it later fills it, as in PyTorch.
        """
        _check_child_name("register_parameter", name)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name!r} must be a Parameter or None, got {type(param).__name__}")
        for store in (self._buffers, self._modules):
            store.pop(name, None)
        self.__dict__.pop(name, None)
        self._parameters[name] = param

    def add_module(self, name: str, module: "Module | None") -> None:
        _check_child_name("add_module", name)
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module or None, got {type(module).__name__}")
        for store in (self._parameters, self._buffers):
            store.pop(name, None)
        self.__dict__.pop(name, None)
        self._modules[name] = module

    # -- paths --------------------------------------------------------------
    def get_submodule(self, path: str) -> "Module":
        """The descendant at dotted ``path`` ("layer1.0.conv1"); "" is this module itself."""
        if not isinstance(path, str):
            raise TypeError(f"get_submodule: path must be a str, got {type(path).__name__}")
        module = self
        walked = []
        for name in path.split(".") if path else ():
            child = module._modules.get(name)
            if child is None:
                where = ".".join(walked) or type(self).__name__
                raise AttributeError(f"get_submodule: {where} has no submodule {name!r} "
                                     f"(its children: {[k for k, _ in module.named_children()]})")
            walked.append(name)
            module = child
        return module

    def set_submodule(self, path: str, module: "Module") -> None:
        """Replace the descendant at dotted ``path`` by ``module``; it keeps its position among its siblings."""
        if not isinstance(module, Module):
            raise TypeError(f"set_submodule: module must be a Module, got {type(module).__name__}")
        if not isinstance(path, str) or not path:
            raise ValueError(f"set_submodule: path must be a non-empty dotted str, got {path!r}")
        parent_path, _, name = path.rpartition(".")
        parent = self.get_submodule(parent_path)
        if name not in parent._modules:
            raise AttributeError(f"set_submodule: {parent_path or type(self).__name__} has no submodule {name!r}")
        parent._modules[name] = module  # same key, same place in the OrderedDict

    # -- hooks --------------------------------------------------------------
    def register_forward_pre_hook(self, hook: Callable) -> "RemovableHandle":
        """``hook(module, args)`` runs before ``forward``; a non-None return replaces ``args``
        (a tuple, or a single value that is wrapped into one)."""
        return self._add_hook("_forward_pre_hooks", hook)

    def register_forward_hook(self, hook: Callable) -> "RemovableHandle":
        """``hook(module, args, output)`` runs after ``forward``; a non-None return replaces the output."""
        return self._add_hook("_forward_hooks", hook)

    def _add_hook(self, store: str, hook: Callable) -> "RemovableHandle":
        if not callable(hook):
            raise TypeError(f"a forward hook must be callable, got {type(hook).__name__}")
        hooks = self.__dict__.get(store)
        if hooks is None:
            hooks = OrderedDict()
            object.__setattr__(self, store, hooks)
        return RemovableHandle(hooks, hook)

    # -- traversal --------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(path, module) for this module and every descendant, each once, depth first."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield path, module
            children = [(f"{path}.{k}" if path else k, m) for k, m in module._modules.items() if m is not None]
            stack.extend(reversed(children))

    def modules(self) -> Iterator["Module"]:
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        return ((k, m) for k, m in self._modules.items() if m is not None)

    def children(self) -> Iterator["Module"]:
        return (m for _, m in self.named_children())

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(path, parameter) pairs, each parameter once, in registration order."""
        seen: set[int] = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for path, module in modules:
            for name, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for path, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                if b is not None:
                    yield (f"{path}.{name}" if path else name), b

    def num_parameters(self, learnable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not learnable_only)

    # -- modes ------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        if not isinstance(mode, bool):
            raise TypeError(f"train(mode): mode must be a bool, got {mode!r}")
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        if not isinstance(flag, bool):
            raise TypeError(f"requires_grad_(flag): flag must be a bool, got {flag!r}")
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def apply(self, fn: Callable[["Module"], None]) -> "Module":
        for m in self.modules():
            fn(m)
        return self

    def to(self, device=None, dtype=None) -> "Module":
        """Move every parameter and buffer to backend ``device`` and/or cast the floating ones to ``dtype``.

        ``device`` is a backend name ("numpy", "cupy", ...; PyTorch's "cpu" and "cuda" name
        numpy and cupy); a floating dtype (``np.float64``,
        "float64") in its place is taken as ``dtype``, as in PyTorch's ``module.to(dtype)``.
        The active backend is NOT switched: inputs and anything created afterwards follow
        ``minibasis.use(name)``, the one global switch (call it too, to run the model on
        the device). Integer buffers keep their dtype. Gradients are dropped. Returns self.
        """
        if device is not None and backend.device_backend(device) is None:
            if dtype is not None:
                raise ValueError(f"Module.to: unknown backend {device!r}; expected one of {backend.available_backends()}")
            device, dtype = None, device
        device = backend.device_backend(device)
        if dtype is not None:
            dtype = self._floating_dtype(dtype)

        def convert(array):
            if device is not None:
                array = backend.to_backend(array, device)
            if dtype is not None and getattr(array.dtype, "kind", None) == "f" and array.dtype != dtype:
                array = array.astype(dtype)
            return array

        for module in self.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    p.data = convert(p.data)
                    p.grad = None
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = convert(b)
        return self

    @staticmethod
    def _floating_dtype(dtype):
        try:
            resolved = backend.xp.dtype(dtype)
        except TypeError:
            raise ValueError(f"Module.to: {dtype!r} is neither a backend ({', '.join(backend.available_backends())}) "
                             "nor a dtype") from None
        if resolved.kind != "f":
            raise TypeError(f"Module.to: parameters need a floating dtype, got {resolved}")
        return resolved

    def double(self) -> "Module":
        """Cast floating parameters and buffers to float64 (``to(dtype="float64")``)."""
        return self.to(dtype="float64")

    def float(self) -> "Module":
        """Cast floating parameters and buffers to float32 (``to(dtype="float32")``)."""
        return self.to(dtype="float32")

    # -- state ------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, Any]":
        """Path → array for every parameter and persistent buffer (PyTorch's key names)."""
        state: OrderedDict[str, Any] = OrderedDict()
        for path, module in self.named_modules():
            skip = module.__dict__.get("_non_persistent", ())
            for name, p in module._parameters.items():
                if p is not None:
                    state[f"{path}.{name}" if path else name] = p.data
            for name, b in module._buffers.items():
                if b is not None and name not in skip:
                    state[f"{path}.{name}" if path else name] = b
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> tuple[list[str], list[str]]:
        """Copy arrays (NumPy, CuPy, Tensors, or PyTorch tensors) into this module's parameters and buffers.

        Keys must match ``state_dict()`` exactly when ``strict`` (PyTorch's
        ``num_batches_tracked`` entries are ignored); every shape must match.
        Nothing is changed unless every check passes. Returns (missing, unexpected).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: expected a dict of name -> array, got {type(state).__name__}")
        own = self.state_dict()
        incoming = {k: v for k, v in state.items() if not (isinstance(k, str) and k.endswith("num_batches_tracked"))}
        missing = [k for k in own if k not in incoming]
        unexpected = [k for k in incoming if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: state does not fit {type(self).__name__}: "
                           f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        updates = []
        for key, target in own.items():
            if key not in incoming:
                continue
            value = incoming[key]
            value = value.data if isinstance(value, Tensor) else value
            if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor (duck-typed: torch is optional)
                value = value.detach().cpu().numpy()
            shape = tuple(getattr(value, "shape", ()))
            if shape != tuple(target.shape):
                raise ValueError(f"load_state_dict: {key!r} has shape {shape}, the model expects {tuple(target.shape)}")
            kind = getattr(getattr(value, "dtype", None), "kind", None)
            if kind not in ("f", "i", "u", "b"):
                raise TypeError(f"load_state_dict: {key!r} is not a numeric array (dtype {getattr(value, 'dtype', type(value))})")
            updates.append((key, backend.asarray(value).astype(target.dtype, copy=True)))
        owners = dict(self._owners())
        for key, array in updates:
            module, name = owners[key]
            if name in module._parameters:
                module._parameters[name].data = array
            else:
                module._buffers[name] = array
        return missing, unexpected

    def _owners(self) -> Iterator[tuple[str, tuple["Module", str]]]:
        for path, module in self.named_modules():
            for name in list(module._parameters) + list(module._buffers):
                yield (f"{path}.{name}" if path else name), (module, name)

    # -- calling ----------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        if not counting.active():
            return self._forward_with_hooks(args, kwargs)
        path = _path_of(self)
        _call_stack.append((self, path))
        try:
            with counting.layer_scope(path):
                return self._forward_with_hooks(args, kwargs)
        finally:
            _call_stack.pop()

    def _forward_with_hooks(self, args: tuple, kwargs: dict):
        for hook in tuple(self.__dict__.get("_forward_pre_hooks", {}).values()):
            replaced = hook(self, args)
            if replaced is not None:
                args = replaced if isinstance(replaced, tuple) else (replaced,)
        output = self.forward(*args, **kwargs)
        for hook in tuple(self.__dict__.get("_forward_hooks", {}).values()):
            replaced = hook(self, args, output)
            if replaced is not None:
                output = replaced
        return output

    # -- printing ---------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n  " + "\n  ".join(lines) + "\n)"
