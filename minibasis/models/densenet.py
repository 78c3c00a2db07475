"""DenseNet-BC for CIFAR (Huang et al. 2017), as in bearpaw/pytorch-classification (``models/cifar/densenet.py``).

Depth 6n+4 with bottleneck layers: three dense blocks of n layers each, every
layer BN → ReLU → conv1×1 (4k filters) → BN → ReLU → conv3×3 (k filters) and
its k new maps concatenated to its input; between blocks a transition
BN → ReLU → conv1×1 halving the channels (compression 0.5) → 2×2 average pool.
Stem: 3×3 conv 3→2k (no bias). Head: BN → ReLU → global average pool →
``fc``. Key names match bearpaw's: ``conv1``, ``dense{1,2,3}.{i}.{bn1,conv1,bn2,conv2}``,
``trans{1,2}.{bn1,conv1}``, ``bn``, ``fc``.

DenseNet-BC-190 with k = 40 and ``num_classes=100`` holds 25,821,620
parameters, the paper's Table 1; it is large (≈ 9.3 G conv multiplications per
32×32 image), so expect seconds per image on a CPU.
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.models._architecture import zoo_constructor
from minibasis.models._init import kaiming_normal_
from minibasis.nn import BatchNorm2d, Conv2d, Linear, Module, Sequential

__all__ = ["DenseBottleneck", "DenseTransition", "DenseNetBC", "densenet_bc", "densenet190"]


class DenseBottleneck(Module):
    """(N, C, H, W) → (N, C + growth_rate, H, W): the input followed by growth_rate new maps."""

    def __init__(self, in_channels: int, growth_rate: int, expansion: int = 4):
        super().__init__()
        inner = expansion * growth_rate
        self.bn1 = BatchNorm2d(in_channels)
        self.conv1 = Conv2d(in_channels, inner, kernel_size=1, bias=False)
        self.bn2 = BatchNorm2d(inner)
        self.conv2 = Conv2d(inner, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return F.concat([x, out], axis=1)


class DenseTransition(Module):
    """(N, C, H, W) → (N, out_channels, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn1 = BatchNorm2d(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv1(F.relu(self.bn1(x))), 2)


class DenseNetBC(Module):
    """x (N, 3, 32, 32) → logits (N, num_classes)."""

    def __init__(self, depth: int = 190, growth_rate: int = 40, num_classes: int = 10, compression: int = 2):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC depth must be 6n+4 with n ≥ 1 (e.g. 100, 190, 250), got {depth!r}")
        if not isinstance(growth_rate, int) or growth_rate < 1:
            raise ValueError(f"growth_rate must be a positive int, got {growth_rate!r}")
        if not isinstance(compression, int) or compression < 1:
            raise ValueError(f"compression must be a positive int (channels are divided by it), got {compression!r}")
        self.depth, self.growth_rate, self.num_classes = depth, growth_rate, num_classes
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth_rate
        self.conv1 = Conv2d(3, channels, kernel_size=3, padding=1, bias=False)
        for block in (1, 2, 3):
            layers = []
            for _ in range(layers_per_block):
                layers.append(DenseBottleneck(channels, growth_rate))
                channels += growth_rate
            setattr(self, f"dense{block}", Sequential(*layers))
            if block < 3:
                setattr(self, f"trans{block}", DenseTransition(channels, channels // compression))
                channels //= compression
        self.bn = BatchNorm2d(channels)
        self.fc = Linear(channels, num_classes)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # bearpaw: convs N(0, 2/(k·k·out)), i.e. He fan_out; BN ones/zeros and linear PyTorch's defaults.
        for module in self.modules():
            if isinstance(module, Conv2d):
                kaiming_normal_(module.weight, "fan_out")

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DenseNetBC expects input (N, 3, H, W), got shape {tuple(x.shape)}")
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = F.relu(self.bn(self.dense3(out)))
        return self.fc(F.flatten(F.global_avg_pool2d(out)))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, growth_rate={self.growth_rate}, num_classes={self.num_classes}"


@zoo_constructor("densenet_bc")
def densenet_bc(depth: int = 190, growth_rate: int = 40, num_classes: int = 10) -> DenseNetBC:
    """DenseNet-BC-``depth`` with growth rate ``growth_rate`` (bottleneck layers, compression 0.5)."""
    return DenseNetBC(depth, growth_rate, num_classes)


def densenet190(num_classes: int = 10) -> DenseNetBC:
    """DenseNet-BC-190, k = 40: the paper's DenseNet190."""
    return densenet_bc(190, 40, num_classes)
