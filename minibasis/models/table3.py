"""The paper's Table 3 network: a small CIFAR-10 CNN and its BasisConv twin.

    features:   conv 5×5 3→32 pad 2, ReLU, max-pool 3×3/2     32×32 → 32×32 → 15×15
                conv 5×5 32→32 pad 2, ReLU, max-pool 3×3/2    15×15 → 15×15 → 7×7
                conv 5×5 32→64 pad 2, ReLU, max-pool 3×3/2     7×7  →  7×7  → 3×3
    classifier: flatten 64·3·3 = 576, fc 576→64, ReLU, fc 64→num_classes

(a 3×3 stride-2 pool without padding maps n to (n − 3) // 2 + 1: 32 → 15 → 7 → 3.)

The convolution layers hold 3·25·32+32 + 32·25·32+32 + 32·25·64+64 = 79,328 learnable
parameters. The twin (``basis=True``) replaces each conv by ``BasisConv2d.random`` with
Q = M fixed random orthonormal basis filters, a bias on both stages and a BatchNorm on
the Q-channel intermediate, as the paper trains it from scratch: its conv layers hold
32·32+32+32 + 32·32+32+32 + 64·64+64+64 = 6,400 learnable parameters (the paper's count:
1×1 coefficients and biases; BatchNorm parameters are not conv parameters).

State-dict keys follow PyTorch: ``features.0.weight``, ``features.3.weight``,
``features.6.weight``, ``classifier.0.weight``, ``classifier.2.weight`` (and for the twin
``features.0.coeffs``, ``features.0.basis``, ``features.0.basis_bias``, ``features.0.bn.*``).
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.models._architecture import zoo_constructor
from minibasis.nn import BasisConv2d, Conv2d, Linear, MaxPool2d, Module, ReLU, Sequential

__all__ = ["Table3CNN", "table3_cnn"]

#: (in_channels, out_channels) of the three 5×5 convolutions.
CONV_CHANNELS = ((3, 32), (32, 32), (32, 64))
KERNEL_SIZE, PADDING = 5, 2
FLAT_FEATURES = 64 * 3 * 3  # 576 for 32×32 inputs


class Table3CNN(Module):
    """Input (N, 3, 32, 32) → logits (N, num_classes).

    Args:
        num_classes: outputs of the last fully connected layer.
        basis: False for plain convolutions; True for the BasisConv twin (random fixed
            orthonormal bases, Q = M per layer, biases on both stages, BatchNorm on the
            intermediate).
        seed: seed of the random bases of the twin (layer i uses ``seed + i``); None draws
            them from minibasis's host generator (``minibasis.manual_seed``).
    """

    def __init__(self, num_classes: int = 10, basis: bool = False, seed: int | None = None):
        super().__init__()
        layers = []
        for i, (c_in, c_out) in enumerate(CONV_CHANNELS):
            if basis:
                conv = BasisConv2d.random(c_in, c_out, KERNEL_SIZE, num_basis=c_out, padding=PADDING, bias=True,
                                          basis_bias=True, bn=True, seed=None if seed is None else seed + i)
            else:
                conv = Conv2d(c_in, c_out, KERNEL_SIZE, padding=PADDING)
            layers += [conv, ReLU(), MaxPool2d(3, 2)]
        self.features = Sequential(*layers)
        self.classifier = Sequential(Linear(FLAT_FEATURES, 64), ReLU(), Linear(64, num_classes))
        self.num_classes = num_classes
        self.is_basis_twin = bool(basis)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"Table3CNN expects input (N, 3, 32, 32), got shape {tuple(x.shape)}")
        return self.classifier(F.flatten(self.features(x), 1))

    def conv_layers(self) -> list[Module]:
        """The three convolution layers (Conv2d or BasisConv2d), in order."""
        return [m for m in self.features if isinstance(m, (Conv2d, BasisConv2d))]


@zoo_constructor("table3_cnn")
def table3_cnn(num_classes: int = 10, basis: bool = False, seed: int | None = None) -> Table3CNN:
    """The paper's Table 3 CIFAR-10 CNN (``basis=False``) or its BasisConv twin (``basis=True``)."""
    return Table3CNN(num_classes=num_classes, basis=basis, seed=seed)
