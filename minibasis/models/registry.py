"""Model names → constructors, for the CLI and for users: ``get_model("resnet56", num_classes=100)``.

Every model built here (or by a zoo constructor called directly) carries
``model.architecture = {"name": ..., "kwargs": {...}}`` (see :mod:`minibasis.models._architecture`):
the general zoo name and all constructor arguments, so ``get_model("resnet56").architecture`` is
``{"name": "resnet_cifar", "kwargs": {"depth": 56, "num_classes": 10, "shortcut": "A"}}``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from minibasis.models._architecture import ZOO_NAME_ATTRIBUTE
from minibasis.models.alexnet import alexnet
from minibasis.models.demo import demo_cnn
from minibasis.models.densenet import densenet_bc
from minibasis.models.mobilenet import mobilenet_v2
from minibasis.models.resnet import RESNET_CIFAR_DEPTHS, resnet_cifar
from minibasis.models.table3 import table3_cnn
from minibasis.models.vgg import vgg
from minibasis.nn import Module

__all__ = ["MODELS", "get_model", "register_model", "model_names", "canonical_architecture"]


#: name → constructor taking keyword arguments (``num_classes`` for all of them). Aliases are
#: partials of the general constructors, so :func:`canonical_architecture` can see what they fix.
MODELS: dict[str, Callable[..., Module]] = {
    "table3_cnn": table3_cnn,
    "alexnet": alexnet,
    "vgg": vgg,
    "vgg16": functools.partial(vgg, 16),
    "vgg16_bn": functools.partial(vgg, 16, batch_norm=True),
    "resnet_cifar": resnet_cifar,
    **{f"resnet{depth}": functools.partial(resnet_cifar, depth) for depth in RESNET_CIFAR_DEPTHS},
    "densenet_bc": densenet_bc,
    "densenet190": functools.partial(densenet_bc, 190, 40),
    "mobilenet_v2": mobilenet_v2,
    "demo_cnn": demo_cnn,
}


def register_model(name: str, constructor: Callable[..., Module]) -> None:
    """Make ``get_model(name)`` build a model with ``constructor(**kwargs)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    MODELS[name] = constructor


def model_names() -> list[str]:
    return list(MODELS)


def _constructor(name: str) -> Callable[..., Module]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)} (a model class of your own: "
                         f"minibasis.models.register_model({name!r}, constructor) makes it known)") from None


def get_model(name: str, **kwargs) -> Module:
    """Build the zoo model ``name`` (see ``MODELS``) with keyword arguments such as ``num_classes``.

    The model carries ``model.architecture``; a registered constructor that does not tag its
    models gets ``{"name": name, "kwargs": kwargs}``.
    """
    model = _constructor(name)(**kwargs)
    if not isinstance(getattr(model, "architecture", None), dict):
        model.architecture = {"name": name, "kwargs": dict(kwargs)}
    return model


def canonical_architecture(name: str, **kwargs) -> tuple[str, dict]:
    """``(zoo name, keyword arguments)`` that ``get_model(name, **kwargs)`` records, without building:
    an alias resolves to its general constructor with the arguments it fixes
    (``"resnet56"`` → ``("resnet_cifar", {"depth": 56, ...})``). Only the arguments given or
    fixed by the alias are returned (no defaults), so they can be compared with a file's record."""
    constructor = _constructor(name)
    args, fixed = (), {}
    while isinstance(constructor, functools.partial):
        args, fixed = constructor.args + args, {**constructor.keywords, **fixed}
        constructor = constructor.func
    zoo_name = getattr(constructor, ZOO_NAME_ATTRIBUTE, None)
    if zoo_name is None:
        return name, dict(kwargs)
    signature = inspect.signature(inspect.unwrap(constructor))
    try:
        bound = signature.bind_partial(*args, **{**fixed, **kwargs})
    except TypeError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    return zoo_name, dict(bound.arguments)
