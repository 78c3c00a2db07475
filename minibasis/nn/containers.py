"""ModuleList and ModuleDict: submodules held in a list or a dict, registered as PyTorch registers them.

Their children are ordinary submodules, so ``parameters()``, ``state_dict()``, ``to()`` and
``train()`` see them, under PyTorch's key names ("layers.0.weight", "heads.cls.bias"). Neither
has a ``forward``: the owning module decides how to call them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from minibasis.nn.module import Module

__all__ = ["ModuleList", "ModuleDict"]


def _checked(who: str, module) -> Module:
    if not isinstance(module, Module):
        raise TypeError(f"{who} holds Modules, got {type(module).__name__}")
    return module


class ModuleList(Module):
    """A list of modules; child ``i`` is named ``str(i)``."""

    def __init__(self, modules: Iterable[Module] | None = None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"ModuleList indices must be ints or slices, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"ModuleList index {index} is out of range for {len(self)} modules")
        return index % len(self)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ModuleList(list(self._modules.values())[index])
        return self._modules[str(self._index(index))]

    def __setitem__(self, index: int, module: Module) -> None:
        self._modules[str(self._index(index))] = _checked("ModuleList", module)

    def __delitem__(self, index: int) -> None:
        kept = [m for i, m in enumerate(self._modules.values()) if i != self._index(index)]
        self._renumber(kept)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def append(self, module: Module) -> "ModuleList":
        self.add_module(str(len(self)), _checked("ModuleList", module))
        return self

    def extend(self, modules: Iterable[Module]) -> "ModuleList":
        if isinstance(modules, Module) and not hasattr(modules, "__iter__"):
            raise TypeError(f"ModuleList.extend takes an iterable of Modules, got a single {type(modules).__name__}")
        for module in modules:
            self.append(module)
        return self

    def insert(self, index: int, module: Module) -> None:
        items = list(self._modules.values())
        items.insert(index, _checked("ModuleList", module))
        self._renumber(items)

    def _renumber(self, modules: list) -> None:
        self._modules.clear()
        for i, module in enumerate(modules):
            self._modules[str(i)] = module

    def forward(self, *args, **kwargs):
        raise NotImplementedError("ModuleList has no forward(); call its modules from the owning module's forward")


class ModuleDict(Module):
    """An ordered dict of modules; each key is a child's name (no dots)."""

    def __init__(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]] | None = None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        if key not in self._modules:
            raise KeyError(f"ModuleDict has no key {key!r} (keys: {list(self._modules)})")
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, _checked("ModuleDict", module))

    def __delitem__(self, key: str) -> None:
        self.pop(key)

    def __contains__(self, key) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()

    def pop(self, key: str) -> Module:
        module = self[key]
        del self._modules[key]
        return module

    def update(self, modules) -> None:
        pairs = modules.items() if isinstance(modules, Mapping) else modules
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"ModuleDict.update takes a mapping or (name, module) pairs, got {pair!r}")
            self[pair[0]] = pair[1]

    def forward(self, *args, **kwargs):
        raise NotImplementedError("ModuleDict has no forward(); call its modules from the owning module's forward")
