"""PyTorch networks of seven families, exported by torch.onnx and imported by minibasis.

For each: logits equal PyTorch's and onnxruntime's (float32 rounding), every conv's measured
forward multiplications equal M·(C/g)·k²·Ho·Wo and torch's FlopCounterMode count ÷ 2 (backward:
the closed form once per gradient; FlopCounterMode overcounts a grouped conv's weight gradient), the
``state_dict`` keys equal PyTorch's; compressing at t = 1 and exporting gives the original
logits in onnxruntime, at t = 0.8 minibasis's compressed logits; fine-tuning the imported
network changes only what each of the paper's steps allows.

Exporters: torch.onnx's TorchScript exporter (``dynamo=False``) for every test, and its dynamo
exporter (``dynamo=True``, which needs the ``onnxscript`` package of the ``oracle`` extra) for
every network in one test (~15 s).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from torch import nn as tnn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import minibasis as mb  # noqa: E402
from minibasis.data import DataLoader, ToFloat, synthetic  # noqa: E402
from minibasis.onnx import load_model, save_model  # noqa: E402
from minibasis.training import fine_tune  # noqa: E402
from minibasis.training.finetune import coefficient_parameters  # noqa: E402

SIZE = 16


def conv_bn(c, m, k=3, stride=1, groups=1):
    return tnn.Sequential(tnn.Conv2d(c, m, k, stride, k // 2, groups=groups, bias=False), tnn.BatchNorm2d(m))


class BasicBlock(tnn.Module):
    def __init__(self, c, m, stride):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(c, m, 3, stride, 1, bias=False), tnn.BatchNorm2d(m)
        self.conv2, self.bn2 = tnn.Conv2d(m, m, 3, 1, 1, bias=False), tnn.BatchNorm2d(m)
        self.shortcut = conv_bn(c, m, 1, stride) if stride != 1 or c != m else tnn.Sequential()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetish(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(3, 8, 3, 1, 1, bias=False), tnn.BatchNorm2d(8)
        self.layer1 = tnn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.fc = tnn.Linear(16, 10)

    def forward(self, x):
        out = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        out = tnn.functional.adaptive_avg_pool2d(out, 1)
        return self.fc(out.view(out.size(0), -1))


class VGGish(tnn.Module):
    def __init__(self):
        super().__init__()
        self.features = tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU(inplace=True),
                                       tnn.MaxPool2d(2), tnn.Conv2d(8, 16, 3, padding=1), tnn.BatchNorm2d(16),
                                       tnn.ReLU(inplace=True), tnn.MaxPool2d(2, ceil_mode=True))
        self.classifier = tnn.Sequential(tnn.Dropout(0.5), tnn.Linear(16 * 4 * 4, 32), tnn.ReLU(), tnn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class InvertedResidual(tnn.Module):
    def __init__(self, c, m, stride, expand):
        super().__init__()
        hidden = c * expand
        self.use_res = stride == 1 and c == m
        self.conv = tnn.Sequential(tnn.Conv2d(c, hidden, 1, bias=False), tnn.BatchNorm2d(hidden), tnn.ReLU6(),
                                   tnn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                   tnn.BatchNorm2d(hidden), tnn.ReLU6(),
                                   tnn.Conv2d(hidden, m, 1, bias=False), tnn.BatchNorm2d(m))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Sequential(tnn.Conv2d(3, 8, 3, 2, 1, bias=False), tnn.BatchNorm2d(8), tnn.Hardswish())
        self.blocks = tnn.Sequential(InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3))
        self.classifier = tnn.Linear(12, 10)

    def forward(self, x):
        return self.classifier(self.blocks(self.stem(x)).mean([2, 3]))


class DenseLayer(tnn.Module):
    def __init__(self, c, growth):
        super().__init__()
        self.bn1, self.conv1 = tnn.BatchNorm2d(c), tnn.Conv2d(c, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = tnn.BatchNorm2d(4 * growth), tnn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.bn2(out)))], 1)


class DenseNetish(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dense1 = tnn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.trans_bn, self.trans_conv = tnn.BatchNorm2d(16), tnn.Conv2d(16, 8, 1, bias=False)
        self.pool = tnn.AvgPool2d(3, 2, padding=1, count_include_pad=False)
        self.fc = tnn.Linear(8, 10)

    def forward(self, x):
        out = self.pool(self.trans_conv(torch.relu(self.trans_bn(self.dense1(self.conv1(x))))))
        return self.fc(torch.flatten(tnn.functional.adaptive_avg_pool2d(out, 1), 1))


class SEBlock(tnn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = tnn.Conv2d(c, c // r, 1), tnn.Conv2d(c // r, c, 1)

    def forward(self, x):
        w = tnn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))


class SENet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16)
        self.se = SEBlock(16)
        self.conv2, self.bn2 = tnn.Conv2d(16, 16, 3, 2, 1, bias=False), tnn.BatchNorm2d(16)
        self.act = tnn.LeakyReLU(0.1)
        self.head = tnn.Sequential(tnn.Flatten(), tnn.Linear(16 * 8 * 8, 10))

    def forward(self, x):
        out = self.se(torch.relu(self.bn1(self.conv1(x))))
        return self.head(self.act(self.bn2(self.conv2(out))))


class Inception(tnn.Module):
    def __init__(self, c):
        super().__init__()
        self.b1 = tnn.Conv2d(c, 4, 1)
        self.b2 = tnn.Sequential(tnn.Conv2d(c, 4, 1), tnn.ReLU(), tnn.Conv2d(4, 6, 3, padding=1))
        self.b3 = tnn.Sequential(tnn.Conv2d(c, 2, 1), tnn.ReLU(), tnn.Conv2d(2, 4, 5, padding=2))
        self.b4 = tnn.Sequential(tnn.MaxPool2d(3, 1, 1), tnn.Conv2d(c, 4, 1))

    def forward(self, x):
        return torch.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class GoogLeNetish(tnn.Module):
    def __init__(self):
        super().__init__()
        self.pre = tnn.Sequential(tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU())
        self.a3 = Inception(8)
        self.pool = tnn.MaxPool2d(3, 2, 1)
        self.fc = tnn.Linear(18, 10)

    def forward(self, x):
        out = self.pool(self.a3(self.pre(x)))
        return self.fc(tnn.functional.adaptive_avg_pool2d(out, 1).view(x.size(0), -1))


class ShuffleNetish(tnn.Module):
    """ShuffleNetV2's unit: split channels, branch, concat, channel shuffle (view/transpose/view)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(3, 8, 3, 1, 1, bias=False), tnn.BatchNorm2d(8)
        self.branch = tnn.Sequential(tnn.Conv2d(4, 4, 1, bias=False), tnn.BatchNorm2d(4), tnn.ReLU(),
                                     tnn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False), tnn.BatchNorm2d(4))
        self.fc = tnn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        a, b = x.chunk(2, dim=1)
        out = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = out.shape
        out = out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(out.mean([2, 3]))


NETWORKS = {"resnet": ResNetish, "vgg_bn": VGGish, "mobilenet_v2": MobileNetV2ish, "densenet": DenseNetish,
            "se_net": SENet, "googlenet": GoogLeNetish, "shufflenet_v2": ShuffleNetish}
#: One operator-set version per network, spanning what the exporters write (13–20); 18 moved
#: ReduceMean's axes and Split's sizes from attributes to inputs.
OPSETS = {"resnet": 13, "vgg_bn": 14, "mobilenet_v2": 15, "densenet": 16, "se_net": 17, "googlenet": 18,
          "shufflenet_v2": 20}


def torch_network(name):
    torch.manual_seed(0)
    net = NETWORKS[name]()
    with torch.no_grad():  # trained-looking BatchNorm statistics (not the fresh 0/1, which exporters deduplicate)
        for m in net.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def export(net, path, opset):
    torch.onnx.export(net, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                      training=torch.onnx.TrainingMode.PRESERVE)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (torch network, path of its ONNX file), each exported once per test module."""
    folder, cache = tmp_path_factory.mktemp("exported"), {}

    def get(name):
        if name not in cache:
            net = torch_network(name)
            cache[name] = net, export(net, folder / f"{name}.onnx", OPSETS[name])
        return cache[name]
    return get


def images(n=3, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def run_ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def run_mb(model, x):
    with mb.no_grad():
        return model(mb.tensor(x)).numpy()


def close(a, b, scale):
    """Equal to float32 rounding, relative to the logits' scale."""
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(1.0, float(np.abs(scale).max())))


def torch_conv_facts(net, x):
    """path → (M, C/g, k·k, Ho·Wo·N, FlopCounterMode mults, reads the network's input) for every torch
    conv, measured on ``x``."""
    facts, handles = {}, []
    source = torch.tensor(x)
    for path, m in net.named_modules():
        if isinstance(m, tnn.Conv2d):
            def hook(module, args, out, path=path):
                with FlopCounterMode(display=False) as flops:
                    tnn.functional.conv2d(args[0], module.weight, module.bias, module.stride, module.padding,
                                          module.dilation, module.groups)
                kh, kw = module.kernel_size
                facts[path] = (module.out_channels, module.in_channels // module.groups, kh * kw,
                               out.shape[0] * out.shape[2] * out.shape[3], flops.get_total_flops() // 2,
                               args[0] is source)
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        net(source)
    for h in handles:
        h.remove()
    return facts


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_imported_network_matches_pytorch_and_onnxruntime(exported, name):
    net, path = exported(name)
    model = load_model(path)
    x = images()
    with torch.no_grad():
        expected = net(torch.tensor(x)).numpy()
    ours = run_mb(model, x)
    close(ours, expected, expected)
    close(ours, run_ort(path, x), expected)
    torch_keys = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(model.state_dict()) == torch_keys
    with mb.count_mults() as counter:
        model(mb.tensor(x)).sum().backward()
    facts = torch_conv_facts(net, x)
    assert facts
    for path_, (m, c_per_group, kk, positions, flop_mults, reads_input) in facts.items():
        formula = m * c_per_group * kk * positions
        assert counter.forward.by_layer[path_] == formula == flop_mults, path_
        # backward: the weight's gradient, and the input's unless the input is the network's own
        assert counter.backward.by_layer[path_] == formula * (1 if reads_input else 2), path_


@pytest.mark.parametrize("name", ["resnet", "googlenet", "se_net"])
def test_compressed_import_exports_to_onnxruntime(tmp_path, exported, name):
    model = load_model(exported(name)[1])
    x = images(seed=2)
    original = run_mb(model, x)
    exact, report = mb.compress(model, 1.0, skip_unprofitable=False, input_shape=(1, 3, SIZE, SIZE))
    assert any(row.replaced for row in report.layers)
    save_model(exact, tmp_path / "t1.onnx", (1, 3, SIZE, SIZE))
    close(run_ort(tmp_path / "t1.onnx", x), original, original)
    compressed, report = mb.compress(model, 0.8, input_shape=(1, 3, SIZE, SIZE))
    assert any(row.replaced for row in report.layers)
    ours = run_mb(compressed, x)
    assert np.abs(ours - original).max() > 1e-3  # t = 0.8 really changed the network ...
    for fold in (False, True):
        save_model(compressed, tmp_path / "t08.onnx", (1, 3, SIZE, SIZE), fold_batch_norm=fold)
        close(run_ort(tmp_path / "t08.onnx", x), ours, ours)  # ... and onnxruntime runs that changed network
        back = load_model(tmp_path / "t08.onnx")
        close(run_mb(back, x), ours, ours)


def test_fine_tuning_an_imported_network_changes_only_what_each_step_allows(exported):
    model = load_model(exported("resnet")[1])
    compressed, report = mb.compress(model, 0.9, skip_unprofitable=False, input_shape=(1, 3, SIZE, SIZE))
    replaced = [row.name for row in report.layers if row.replaced]
    assert replaced
    (x, y), _ = synthetic(num_train=32, num_test=0, image_size=SIZE, seed=1)
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=0, transform=ToFloat())

    def state(m):
        return {k: mb.to_numpy(v).copy() for k, v in m.state_dict().items()}
    before, snapshots = state(compressed), {}
    fine_tune(compressed, loader, step1_params=coefficient_parameters(compressed), epochs1=1, lr1=0.1, epochs2=1,
              lr2=0.05, progress=False, on_step_end=lambda stage, m: snapshots.__setitem__(stage, state(m)))
    step1, step2 = snapshots["step1"], snapshots["step2"]
    frozen = [k for k in before if k.endswith(".basis") or (k.endswith(".weight") and "conv" in k
                                                             and k[: -len(".weight")] not in replaced)]
    assert frozen
    for key in frozen:  # fixed bases and kept convs' filters: never trained
        np.testing.assert_array_equal(before[key], step2[key], err_msg=key)
    coeffs = [k for k in before if k.endswith(".coeffs")]
    assert coeffs and all(not np.array_equal(before[k], step1[k]) for k in coeffs)
    others = [k for k in before if not k.endswith((".coeffs", ".basis")) and "running" not in k and k not in frozen]
    assert all(np.array_equal(before[k], step1[k]) for k in others), "step 1 trains the coefficients only"
    assert any(not np.array_equal(step1[k], step2[k]) for k in others if k.startswith(("bn1", "fc")))


def test_dynamo_exporter(tmp_path):
    """The dynamo exporter (opset 20, BatchNorm folded into the convs it follows, static batch)."""
    pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs the onnxscript package")
    for name in sorted(NETWORKS):
        net = torch_network(name)
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(net, (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=True, external_data=False)
        model = load_model(path, input_shape=(2, 3, SIZE, SIZE))
        x = images(2)
        with torch.no_grad():
            expected = net(torch.tensor(x)).numpy()
        with mb.count_mults() as counter:
            close(run_mb(model, x), expected, expected)
        for path_, (m, c_per_group, kk, positions, flop_mults, _) in torch_conv_facts(net, x).items():
            assert counter.forward.by_layer[path_] == m * c_per_group * kk * positions == flop_mults, path_
        # exported at batch 2, the graph's literal reshapes still run at other batches
        for batch in (1, 3):
            x = images(batch, seed=batch)
            with torch.no_grad():
                expected = net(torch.tensor(x)).numpy()
            close(run_mb(model, x), expected, expected)


def test_pytorchs_default_export_with_batch_norm_folded_imports_with_paths_from_node_scopes(tmp_path):
    net = torch_network("resnet")
    path = tmp_path / "folded.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "N"}})  # eval: BN folded into the convs
    model = load_model(path)
    convs = {p for p, m in model.named_modules() if isinstance(m, mb.nn.Conv2d)}
    assert convs == {p for p, m in net.named_modules() if isinstance(m, tnn.Conv2d)}  # "/layer1/layer1.0/conv1/Conv"
    assert not any(isinstance(m, mb.nn.BatchNorm2d) for m in model.modules())
    x = images(seed=4)
    with torch.no_grad():
        expected = net(torch.tensor(x)).numpy()
    close(run_mb(model, x), expected, expected)
