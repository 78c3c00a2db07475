"""PyTorch re-implementations of the zoo's source architectures, used only as test oracles.

Written from the sources' descriptions (akamaster/pytorch_resnet_cifar10 ``resnet.py``
as summarised in shared/models/akamaster/README.md; bearpaw/pytorch-classification
``models/cifar/{alexnet,vgg,resnet,densenet}.py``), with torch's own layers, so that
minibasis's models are compared with something that shares no code with them. Module
attribute names are the sources' so that ``state_dict`` keys are theirs.

Import only after ``pytest.importorskip("torch")``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as tF


class AkamasterBlock(tnn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.changes_shape = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def shortcut(self, x):
        if not self.changes_shape:
            return x
        # akamaster's option A: even rows/columns, planes//4 zero channels on each side.
        return tF.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)

    def forward(self, x):
        out = tF.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return tF.relu(out + self.shortcut(x))


class AkamasterResNet(tnn.Module):
    """akamaster's CIFAR ResNet (option A), keys conv1/bn1/layer1..3/linear."""

    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(16)
        in_planes = 16
        for index, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(AkamasterBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{index}", tnn.Sequential(*blocks))
        self.linear = tnn.Linear(64, num_classes)

    def forward(self, x):
        out = tF.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = tF.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


class BearpawBasicBlock(tnn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = tF.relu(self.bn1(self.conv1(x)))
        return tF.relu(self.bn2(self.conv2(out)) + residual)


class BearpawResNet(tnn.Module):
    """bearpaw's CIFAR ResNet with basic blocks and 1×1 conv + BN projection shortcuts; head ``fc``."""

    def __init__(self, depth=20, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = tnn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = tnn.AvgPool2d(8)
        self.fc = tnn.Linear(64, num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = tnn.Sequential(tnn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                        tnn.BatchNorm2d(planes))
        layers = [BearpawBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BearpawBasicBlock(planes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = tF.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


class BearpawDenseBottleneck(tnn.Module):
    def __init__(self, inplanes, growth):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(inplanes)
        self.conv1 = tnn.Conv2d(inplanes, 4 * growth, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(4 * growth)
        self.conv2 = tnn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(tF.relu(self.bn1(x)))
        out = self.conv2(tF.relu(self.bn2(out)))
        return torch.cat((x, out), 1)


class BearpawTransition(tnn.Module):
    def __init__(self, inplanes, outplanes):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(inplanes)
        self.conv1 = tnn.Conv2d(inplanes, outplanes, 1, bias=False)

    def forward(self, x):
        return tF.avg_pool2d(self.conv1(tF.relu(self.bn1(x))), 2)


class BearpawDenseNet(tnn.Module):
    """bearpaw's DenseNet-BC (bottleneck, compression 2)."""

    def __init__(self, depth=40, growth=12, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        channels = 2 * growth
        self.conv1 = tnn.Conv2d(3, channels, 3, padding=1, bias=False)
        for block in (1, 2, 3):
            layers = []
            for _ in range(n):
                layers.append(BearpawDenseBottleneck(channels, growth))
                channels += growth
            setattr(self, f"dense{block}", tnn.Sequential(*layers))
            if block < 3:
                setattr(self, f"trans{block}", BearpawTransition(channels, channels // 2))
                channels //= 2
        self.bn = tnn.BatchNorm2d(channels)
        self.fc = tnn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.trans1(self.dense1(self.conv1(x)))
        x = self.trans2(self.dense2(x))
        x = tF.relu(self.bn(self.dense3(x)))
        return self.fc(tF.avg_pool2d(x, 8).flatten(1))


class BearpawAlexNet(tnn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = tnn.Sequential(
            tnn.Conv2d(3, 64, 11, stride=4, padding=5), tnn.ReLU(), tnn.MaxPool2d(2, 2),
            tnn.Conv2d(64, 192, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2, 2),
            tnn.Conv2d(192, 384, 3, padding=1), tnn.ReLU(),
            tnn.Conv2d(384, 256, 3, padding=1), tnn.ReLU(),
            tnn.Conv2d(256, 256, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2, 2))
        self.classifier = tnn.Linear(256, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BearpawVGG16(tnn.Module):
    PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

    def __init__(self, num_classes=10, batch_norm=False):
        super().__init__()
        layers, channels = [], 3
        for item in self.PLAN:
            if item == "M":
                layers.append(tnn.MaxPool2d(2, 2))
                continue
            layers.append(tnn.Conv2d(channels, item, 3, padding=1))
            layers += [tnn.BatchNorm2d(item), tnn.ReLU()] if batch_norm else [tnn.ReLU()]
            channels = item
        self.features = tnn.Sequential(*layers)
        self.classifier = tnn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def randomize(model: tnn.Module, seed: int = 0) -> tnn.Module:
    """He-normal conv/linear weights, random biases, and non-trivial BN weights, biases and running
    statistics, so that every input changes the logits (PyTorch's default init lets a deep plain
    net like VGG16 forget its input) and eval-mode BN is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (tnn.Conv2d, tnn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            if isinstance(module, tnn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model


def numpy_state(model: tnn.Module) -> dict:
    """The torch model's state_dict as name → ndarray (num_batches_tracked included, as torch saves it)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def akamaster_from_checkpoint(path, depth: int) -> AkamasterResNet:
    """The akamaster net with the weights of a shared ``.th`` file, read by torch itself."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint["state_dict"].items()}
    model = AkamasterResNet(depth)
    model.load_state_dict(state, strict=True)
    return model.eval()


def torch_logits(model: tnn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Eval-mode logits (N, classes) of float32 NCHW ``images``."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))).numpy())
    return np.concatenate(out)
