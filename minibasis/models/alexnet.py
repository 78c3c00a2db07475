"""AlexNet for 32×32 inputs, as in bearpaw/pytorch-classification (``models/cifar/alexnet.py``).

Five convolutions with biases, three 2×2 max-pools, one linear head. With
32×32 inputs the feature map after the last pool is 1×1×256, so the head is
``Linear(256, num_classes)``. Key names match bearpaw's: ``features.{0,3,6,8,10}``
(convs) and ``classifier``. With ``num_classes=100`` the net holds 2,495,396
parameters, the paper's Table 1.
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.models._architecture import zoo_constructor
from minibasis.nn import Conv2d, Linear, MaxPool2d, Module, ReLU, Sequential

__all__ = ["AlexNet", "alexnet"]


class AlexNet(Module):
    """x (N, 3, 32, 32) → logits (N, num_classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.features = Sequential(
            Conv2d(3, 64, kernel_size=11, stride=4, padding=5), ReLU(),      # 32 → 8
            MaxPool2d(kernel_size=2, stride=2),                                # 8 → 4
            Conv2d(64, 192, kernel_size=5, padding=2), ReLU(),
            MaxPool2d(kernel_size=2, stride=2),                                # 4 → 2
            Conv2d(192, 384, kernel_size=3, padding=1), ReLU(),
            Conv2d(384, 256, kernel_size=3, padding=1), ReLU(),
            Conv2d(256, 256, kernel_size=3, padding=1), ReLU(),
            MaxPool2d(kernel_size=2, stride=2),                                # 2 → 1
        )
        self.classifier = Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        if features.shape[2:] != (1, 1):
            raise ValueError(f"AlexNet expects 32×32 inputs (features 256×1×1), got input {tuple(x.shape)} "
                             f"giving features {tuple(features.shape[1:])}")
        return self.classifier(F.flatten(features))


@zoo_constructor("alexnet")
def alexnet(num_classes: int = 10) -> AlexNet:
    """bearpaw's CIFAR AlexNet (PyTorch default initialization, as there)."""
    return AlexNet(num_classes=num_classes)
