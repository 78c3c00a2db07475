"""Zoo constructors record what built a model: ``model.architecture = {"name", "kwargs"}``.

:func:`zoo_constructor` wraps a constructor so that every model it returns carries the zoo name
and *all* its keyword arguments (defaults filled in), such that
``get_model(model.architecture["name"], **model.architecture["kwargs"])`` rebuilds the same
architecture. Convenience constructors (``resnet20``, ``vgg16``, ``densenet190``) call the
general one and so carry its record (``resnet_cifar`` with ``depth=20``). Model files store it.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

__all__ = ["zoo_constructor", "ZOO_NAME_ATTRIBUTE"]

#: The attribute of a wrapped constructor holding its zoo name.
ZOO_NAME_ATTRIBUTE = "zoo_name"


def zoo_constructor(name: str) -> Callable:
    """Decorator: the wrapped constructor tags its model with ``{"name": name, "kwargs": {...}}``."""

    def decorate(constructor: Callable) -> Callable:
        signature = inspect.signature(constructor)

        @functools.wraps(constructor)
        def build(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            model = constructor(*args, **kwargs)
            model.architecture = {"name": name, "kwargs": dict(bound.arguments)}
            return model

        setattr(build, ZOO_NAME_ATTRIBUTE, name)
        return build

    return decorate
