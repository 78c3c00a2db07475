"""CIFAR MobileNetV2 against a PyTorch re-implementation of kuangliu/pytorch-cifar's models/mobilenetv2.py.

The PyTorch net is written here from that file's structure (expand 1×1 → depthwise
3×3 → project 1×1 blocks, cfg with stage 2 at stride 1, stem at stride 1, 4×4
average pool), with torch's own layers, so it shares no code with minibasis.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import minibasis as mb
from minibasis import nn
from minibasis.models import get_model, mobilenet_v2

torch = pytest.importorskip("torch")
tnn, tF = torch.nn, torch.nn.functional


class TorchBlock(tnn.Module):
    def __init__(self, in_planes, out_planes, expansion, stride):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = tnn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, out_planes, 1, 1, 0, bias=False)
        self.bn3 = tnn.BatchNorm2d(out_planes)
        self.shortcut = tnn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = tnn.Sequential(tnn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False),
                                           tnn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = tF.relu(self.bn1(self.conv1(x)))
        out = tF.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class TorchMobileNetV2(tnn.Module):
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(32)
        layers, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in self.cfg:
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(TorchBlock(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = tnn.Sequential(*layers)
        self.conv2 = tnn.Conv2d(320, 1280, 1, 1, 0, bias=False)
        self.bn2 = tnn.BatchNorm2d(1280)
        self.linear = tnn.Linear(1280, num_classes)

    def forward(self, x):
        out = tF.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = tF.relu(self.bn2(self.conv2(out)))
        out = tF.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


@pytest.fixture(scope="module")
def pair():
    from torch_zoo import numpy_state, randomize

    reference = randomize(TorchMobileNetV2(), seed=0).eval()
    model = mobilenet_v2()
    model.load_state_dict(numpy_state(reference), strict=True)  # strict: every key is kuangliu's
    return reference, model.eval()


def test_parameter_count_and_keys_match_the_pytorch_net(pair):
    reference, model = pair
    assert sum(p.numel() for p in reference.parameters()) == 2_296_922
    assert model.num_parameters() == 2_296_922
    torch_keys = [k for k in reference.state_dict() if not k.endswith("num_batches_tracked")]
    assert list(model.state_dict()) == torch_keys
    assert get_model("mobilenet_v2", num_classes=100).linear.out_features == 100
    assert model.architecture == {"name": "mobilenet_v2", "kwargs": {"num_classes": 10}}


def test_logits_and_per_layer_conv_multiplications_match_pytorch(pair):
    reference, model = pair
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    torch_mults = {}

    def hook(name):
        def record(module, inputs, output):  # M·(C/g)·kh·kw per output position, per image
            torch_mults[name] = module.weight.numel() * output.shape[2] * output.shape[3]
        return record
    handles = [m.register_forward_hook(hook(n)) for n, m in reference.named_modules() if isinstance(m, tnn.Conv2d)]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    for h in handles:
        h.remove()
    with mb.count_mults() as counter, mb.no_grad():
        got = model(mb.tensor(x)).numpy()
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    assert np.ptp(want, axis=0).max() > 1e-2 * scale
    measured = counter.forward.conv_by_layer()
    assert len(torch_mults) == 1 + 17 * 3 + 4 + 1  # stem, 17 blocks, 4 width-changing shortcuts, head conv
    assert {k: v // 2 for k, v in measured.items()} == torch_mults  # batch of 2
    depthwise = [n for n, m in reference.named_modules() if isinstance(m, tnn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    assert torch_mults["layers.0.conv2"] == 32 * 1 * 9 * 32 * 32


def test_count_verb_runs_on_mobilenet(tmp_path, pair):
    """`minibasis count mobilenet_v2 --layers`: one row per conv, measured equal to the formula."""
    out = tmp_path / "count.json"
    result = subprocess.run([sys.executable, "-m", "minibasis", "count", "mobilenet_v2", "--layers", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "layers.0.conv2" in result.stdout
    (report,) = json.loads(out.read_text())["models"]
    assert report["params"] == 2_296_922
    assert len(report["layers"]) == 57
    assert all(row["measured_mults"] == row["formula_mults"] for row in report["layers"])
    depthwise = [row for row in report["layers"] if row["groups"] > 1]
    assert len(depthwise) == 17 and all(row["groups"] == row["in_channels"] for row in depthwise)


def test_compress_replaces_only_the_ungrouped_convs(pair):
    _, model = pair
    compressed, report = mb.compress(model, energy_threshold=0.5)
    kinds = {path: type(m).__name__ for path, m in compressed.named_modules() if isinstance(m, (nn.Conv2d, nn.BasisConv2d))}
    for path, kind in kinds.items():
        if path.endswith("conv2") and path.startswith("layers."):
            assert kind == "Conv2d", path  # depthwise: kept
    kept = {row.name: row for row in report.layers if not row.replaced}
    assert all(f"layers.{i}.conv2" in kept for i in range(17))
    assert all("grouped" in kept[f"layers.{i}.conv2"].reason for i in range(17))
    assert len(report.replaced) > 17  # e.g. the expansion convs (M = 6·D) at t = 0.5
    for row in report.replaced:
        assert kinds[row.name] == "BasisConv2d" and getattr(model.get_submodule(row.name), "groups") == 1
