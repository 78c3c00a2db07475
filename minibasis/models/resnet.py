"""ResNets for CIFAR (He et al. 2016, section 4.2): depth 6n+2 with basic blocks, widths 16/32/64.

Two shortcut conventions, each with its source's exact ``state_dict`` key names
so that checkpoints load one to one:

* ``shortcut="A"``: akamaster/pytorch_resnet_cifar10 (the shared pretrained
  ResNet-20/56). Where a block changes shape, the shortcut keeps every second
  row and column (``x[:, :, ::2, ::2]``) and zero-pads the new channels,
  planes//4 before and planes//4 after; it has no parameters. Keys: ``conv1``,
  ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, head ``linear``.
* ``shortcut="B"``: bearpaw/pytorch-classification, whose nets the paper
  compresses: a strided 1×1 conv + BatchNorm (``layer{L}.0.downsample.{0,1}``),
  head ``fc``. With ``num_classes=100``, ResNet-110 holds 1,736,564 parameters,
  the paper's Table 1. (bearpaw's own code builds bottleneck blocks for
  depth ≥ 44; the Table 1 count is that of basic blocks, which are used here
  at every depth. See docs/models.md.)

Stem: 3×3 conv 3→16 (no bias), BN, ReLU. Each of the three stages has n
blocks; stages 2 and 3 halve the map in their first block's first conv. Head:
global average pool over the 8×8 map, then a linear layer 64→num_classes.
"""
from __future__ import annotations

from minibasis import functions as F
from minibasis.autograd import Tensor
from minibasis.models._architecture import zoo_constructor
from minibasis.models._init import kaiming_normal_
from minibasis.nn import BatchNorm2d, Conv2d, Linear, Module, Sequential

__all__ = ["BasicBlock", "ZeroPadShortcut", "ResNetCIFAR", "resnet_cifar", "RESNET_CIFAR_DEPTHS",
           "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]

#: The depths of He et al.'s CIFAR experiments (any 6n+2 works).
RESNET_CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
SHORTCUTS = ("A", "B")


class ZeroPadShortcut(Module):
    """Option A: (N, C, H, W) → (N, C + extra, ⌈H/s⌉, ⌈W/s⌉), subsampled, new channels zero; no parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"a zero-padding shortcut cannot reduce channels ({in_planes} → {planes})")
        self.stride = stride
        # akamaster pads planes//4 on each side for planes = 2·in_planes; the general split is the same.
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        if s != 1:
            x = x[:, :, ::s, ::s]
        return F.pad(x, ((0, 0), (self.pad_before, self.pad_after), (0, 0), (0, 0)))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        # The shortcut module's attribute name is its source's (no entry: identity).
        self.shortcut_name = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut_name = "shortcut"
                self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
            else:
                self.shortcut_name = "downsample"
                self.downsample = Sequential(Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                             BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.shortcut_name is None else getattr(self, self.shortcut_name)(x)
        return F.relu(out + residual)


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n ≥ 1 (e.g. {RESNET_CIFAR_DEPTHS}), got {depth!r}")
    return depth


class ResNetCIFAR(Module):
    """x (N, 3, H, W) (32×32 for CIFAR) → logits (N, num_classes)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.depth, self.num_classes, self.shortcut_type = _check_depth(depth), num_classes, shortcut
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(16)
        in_planes = 16
        for stage, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            setattr(self, f"layer{stage}", Sequential(*blocks))
        # The head's key is the source's: akamaster calls it "linear", bearpaw "fc".
        self.head_name = "linear" if shortcut == "A" else "fc"
        setattr(self, self.head_name, Linear(64, num_classes))
        self._initialize_weights()

    @property
    def head(self) -> Linear:
        return getattr(self, self.head_name)

    def _initialize_weights(self) -> None:
        # akamaster: kaiming_normal_ (fan_in) on convs and the linear layer;
        # bearpaw: convs N(0, 2/(k·k·out)) (fan_out), PyTorch's default linear. BN: ones/zeros (default).
        conv_mode = "fan_in" if self.shortcut_type == "A" else "fan_out"
        for module in self.modules():
            if isinstance(module, Conv2d):
                kaiming_normal_(module.weight, conv_mode)
            elif isinstance(module, Linear) and self.shortcut_type == "A":
                kaiming_normal_(module.weight, "fan_in")

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNetCIFAR expects input (N, 3, H, W), got shape {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.head(F.flatten(F.global_avg_pool2d(out)))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, num_classes={self.num_classes}, shortcut={self.shortcut_type!r}"


@zoo_constructor("resnet_cifar")
def resnet_cifar(depth: int = 20, num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    """CIFAR ResNet-``depth`` (6n+2) with basic blocks; ``shortcut`` "A" (akamaster) or "B" (bearpaw)."""
    return ResNetCIFAR(depth, num_classes, shortcut)


def resnet20(num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    return resnet_cifar(20, num_classes, shortcut)


def resnet32(num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    return resnet_cifar(32, num_classes, shortcut)


def resnet44(num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    return resnet_cifar(44, num_classes, shortcut)


def resnet56(num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    return resnet_cifar(56, num_classes, shortcut)


def resnet110(num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    return resnet_cifar(110, num_classes, shortcut)


def resnet1202(num_classes: int = 10, shortcut: str = "A") -> ResNetCIFAR:
    return resnet_cifar(1202, num_classes, shortcut)
