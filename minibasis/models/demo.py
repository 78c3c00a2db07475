"""The demo's small CNN (``minibasis demo``): three convolutions with BatchNorm, global pooling.

In the zoo as ``demo_cnn``, so that the demo's checkpoints and model files rebuild it like any
other model (``minibasis eval --checkpoint runs/demo-.../checkpoint-train.npz --dataset synthetic``).
"""
from __future__ import annotations

from minibasis import nn
from minibasis.models._architecture import zoo_constructor

__all__ = ["DemoCNN", "demo_cnn"]


class DemoCNN(nn.Module):
    """A small CNN for 32×32 images: 3 conv layers (5×5, 3×3, 3×3) with BN, global pooling.

    (N, 3, 32, 32) → conv 5×5 3→w0 → pool → conv 3×3 w0→w1 → pool → conv 3×3 w1→w2 →
    global average → linear w2→num_classes.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 32)):
        super().__init__()
        w0, w1, w2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, w0, 5, padding=2), nn.BatchNorm2d(w0), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w0, w1, 3, padding=1), nn.BatchNorm2d(w1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(w2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@zoo_constructor("demo_cnn")
def demo_cnn(num_classes: int = 10, widths: list[int] = (16, 32, 32)) -> DemoCNN:
    """:class:`DemoCNN` (``widths`` are recorded as a list, a JSON value)."""
    model = DemoCNN(num_classes=num_classes, widths=tuple(widths))
    return model
