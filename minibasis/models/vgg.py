"""VGG for 32×32 inputs, as in bearpaw/pytorch-classification (``models/cifar/vgg.py``).

``features`` is the torchvision VGG stack of 3×3 convs (with biases; each
optionally followed by BatchNorm) and 2×2 max-pools; after five pools a 32×32
input is 1×1×512, so the head is one ``classifier = Linear(512, num_classes)``.
Key names match bearpaw's (``features.<i>``, ``classifier``). With
``num_classes=100``, VGG16 without BN holds 14,765,988 parameters, the paper's
Table 1.
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.models._architecture import zoo_constructor
from minibasis.models._init import kaiming_normal_, normal_, zeros_
from minibasis.nn import BatchNorm2d, Conv2d, Linear, MaxPool2d, Module, ReLU, Sequential

__all__ = ["VGG", "VGG_CONFIGS", "make_vgg_features", "vgg", "vgg11", "vgg13", "vgg16", "vgg19"]

#: Layer plans by depth: an int is a 3×3 conv with that many filters, "M" a 2×2 max-pool.
VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_vgg_features(config, batch_norm: bool = False, in_channels: int = 3) -> Sequential:
    """The ``features`` Sequential for a plan such as ``VGG_CONFIGS[16]``."""
    layers = []
    for item in config:
        if item == "M":
            layers.append(MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(Conv2d(in_channels, item, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(BatchNorm2d(item))
        layers.append(ReLU())
        in_channels = item
    return Sequential(*layers)


class VGG(Module):
    """x (N, 3, 32, 32) → logits (N, num_classes)."""

    def __init__(self, features: Sequential, num_classes: int = 10, feature_channels: int = 512):
        super().__init__()
        self.num_classes = num_classes
        self.features = features
        self.classifier = Linear(feature_channels, num_classes)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # bearpaw's scheme: conv N(0, 2/(k·k·out)) (He fan_out) with zero bias, linear N(0, 0.01²) with zero bias.
        for module in self.modules():
            if isinstance(module, Conv2d):
                kaiming_normal_(module.weight, "fan_out")
                if module.bias is not None:
                    zeros_(module.bias)
            elif isinstance(module, Linear):
                normal_(module.weight, 0.01)
                zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        if features.shape[2:] != (1, 1):
            raise ValueError(f"VGG expects 32×32 inputs (features {self.classifier.in_features}×1×1), "
                             f"got input {tuple(x.shape)} giving features {tuple(features.shape[1:])}")
        return self.classifier(F.flatten(features))


@zoo_constructor("vgg")
def vgg(depth: int = 16, num_classes: int = 10, batch_norm: bool = False) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19), optionally with BatchNorm after every conv."""
    if depth not in VGG_CONFIGS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
    return VGG(make_vgg_features(VGG_CONFIGS[depth], batch_norm), num_classes=num_classes)


def vgg11(num_classes: int = 10, batch_norm: bool = False) -> VGG:
    return vgg(11, num_classes, batch_norm)


def vgg13(num_classes: int = 10, batch_norm: bool = False) -> VGG:
    return vgg(13, num_classes, batch_norm)


def vgg16(num_classes: int = 10, batch_norm: bool = False) -> VGG:
    """VGG16 (13 convs + 1 linear); the paper's Table 1 net is ``vgg16(100)`` without BN."""
    return vgg(16, num_classes, batch_norm)


def vgg19(num_classes: int = 10, batch_norm: bool = False) -> VGG:
    return vgg(19, num_classes, batch_norm)
