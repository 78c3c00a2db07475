"""Model names → constructors, for the CLI and for users: ``get_model("resnet56", num_classes=100)``."""
from __future__ import annotations

import functools
from typing import Callable

from minibasis.models.alexnet import alexnet
from minibasis.models.densenet import densenet190, densenet_bc
from minibasis.models.resnet import RESNET_CIFAR_DEPTHS, resnet_cifar
from minibasis.models.vgg import vgg, vgg16
from minibasis.nn import Module

__all__ = ["MODELS", "get_model", "register_model", "model_names"]


def _table3_cnn(**kwargs) -> Module:
    # Imported on use: table3.py belongs to the BasisConv layer and may be absent in a partial checkout.
    from minibasis.models.table3 import table3_cnn
    return table3_cnn(**kwargs)


#: name → constructor taking keyword arguments (``num_classes`` for all of them).
MODELS: dict[str, Callable[..., Module]] = {
    "table3_cnn": _table3_cnn,
    "alexnet": alexnet,
    "vgg16": vgg16,
    "vgg16_bn": functools.partial(vgg, 16, batch_norm=True),
    "resnet_cifar": resnet_cifar,
    **{f"resnet{depth}": functools.partial(resnet_cifar, depth) for depth in RESNET_CIFAR_DEPTHS},
    "densenet_bc": densenet_bc,
    "densenet190": densenet190,
}


def register_model(name: str, constructor: Callable[..., Module]) -> None:
    """Make ``get_model(name)`` build a model with ``constructor(**kwargs)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    MODELS[name] = constructor


def model_names() -> list[str]:
    return list(MODELS)


def get_model(name: str, **kwargs) -> Module:
    """Build the zoo model ``name`` (see ``MODELS``) with keyword arguments such as ``num_classes``."""
    try:
        constructor = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
    return constructor(**kwargs)
