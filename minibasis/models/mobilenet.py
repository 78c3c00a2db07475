"""MobileNetV2 for CIFAR (Sandler et al. 2018) in the layout of kuangliu/pytorch-cifar.

Same modules, order and ``state_dict`` keys as ``models/mobilenetv2.py`` there, so
its PyTorch checkpoints load one to one: ``conv1 bn1``,
``layers.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}`` (+ ``layers.{i}.shortcut.{0,1}``
where a stride-1 block changes the width), ``conv2 bn2 linear``. For 32×32
inputs the stem conv and the second stage run at stride 1 (the ImageNet net has
stride 2 there), so the map is 32×32 → 16 → 8 → 4 and the head averages a
4×4 map. With 10 classes it holds 2,296,922 parameters.

Block (inverted residual): 1×1 expansion conv (×t) → BN → ReLU → 3×3 depthwise
conv (groups = width, the block's stride) → BN → ReLU → 1×1 projection conv →
BN; a stride-1 block adds its input (through a 1×1 conv + BN when the width
changes). kuangliu's net uses ReLU (not ReLU6) and PyTorch's default init.

The depthwise convs cannot be replaced by BasisConv2d (a depthwise conv never
saves multiplications, see docs/models.md); ``minibasis.compress`` keeps them and
considers the 1×1 convs and the stem.
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.models._architecture import zoo_constructor
from minibasis.nn import BatchNorm2d, Conv2d, Linear, Module, Sequential

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2", "MOBILENET_V2_CIFAR_CONFIG"]

#: (expansion t, output width, number of blocks, stride of the first block); kuangliu's ``cfg``.
MOBILENET_V2_CIFAR_CONFIG = ((1, 16, 1, 1),
                             (6, 24, 2, 1),  # stride 1 for CIFAR (2 on ImageNet)
                             (6, 32, 3, 2),
                             (6, 64, 4, 2),
                             (6, 96, 3, 1),
                             (6, 160, 3, 2),
                             (6, 320, 1, 1))


class InvertedResidual(Module):
    """expand (1×1) → depthwise 3×3 (stride) → project (1×1); (N, in, H, W) → (N, out, H/stride, W/stride)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = BatchNorm2d(out_planes)
        self.shortcut = Sequential()  # identity (no keys), as in kuangliu's code
        if stride == 1 and in_planes != out_planes:
            self.shortcut = Sequential(Conv2d(in_planes, out_planes, kernel_size=1, bias=False),
                                       BatchNorm2d(out_planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class MobileNetV2(Module):
    """(N, 3, 32, 32) → logits (N, num_classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)  # stride 1 for CIFAR
        self.bn1 = BatchNorm2d(32)
        blocks, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in MOBILENET_V2_CIFAR_CONFIG:
            for block_stride in [stride] + [1] * (num_blocks - 1):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, block_stride))
                in_planes = out_planes
        self.layers = Sequential(*blocks)
        self.conv2 = Conv2d(320, 1280, kernel_size=1, bias=False)
        self.bn2 = BatchNorm2d(1280)
        self.linear = Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)  # the 4×4 map of a 32×32 input
        return self.linear(F.flatten(out, 1))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


@zoo_constructor("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10) -> MobileNetV2:
    """CIFAR MobileNetV2 (kuangliu/pytorch-cifar layout); 2,296,922 parameters at 10 classes."""
    return MobileNetV2(num_classes)
