"""PyTorch-style conveniences: Module.to(dtype)/double()/float(), Module.to(device) without a global switch,
Tensor.numel(), readable counter reprs, and fuse_batch_norm."""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import backend, nn
from minibasis import functions as F
from minibasis.backend_strict import StrictArray
from minibasis.models import mobilenet_v2, resnet_cifar


class WithIntBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("steps", np.arange(3, dtype=np.int64))

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.double(), np.float64), (lambda m: m.to(np.float64), np.float64),
                                            (lambda m: m.to("float64"), np.float64), (lambda m: m.to(dtype="float64"), np.float64),
                                            (lambda m: m.double().float(), np.float32)])
def test_module_dtype_conversion(convert, dtype):
    model = WithIntBuffer()
    before = {k: np.asarray(v).copy() for k, v in model.state_dict().items()}
    model.conv.weight.grad = mb.tensor(np.ones(model.conv.weight.shape, np.float32))
    assert convert(model) is model
    state = model.state_dict()
    for key, value in state.items():
        want = np.int64 if key == "steps" else dtype
        assert value.dtype == want, key
        np.testing.assert_allclose(value, before[key].astype(want), rtol=1e-7)  # values kept
    assert model.conv.weight.grad is None
    out = model(mb.tensor(np.ones((1, 2, 4, 4), dtype=dtype)))
    assert out.dtype == dtype


def test_module_to_rejects_non_floating_and_unknown_targets():
    with pytest.raises(TypeError, match="floating"):
        nn.Linear(2, 2).to(np.int32)
    with pytest.raises(ValueError, match="'tpu'"):
        nn.Linear(2, 2).to("tpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        nn.Linear(2, 2).to("tpu", dtype=np.float64)


def test_module_to_device_does_not_switch_the_global_backend():
    model = WithIntBuffer()
    model.to("strict", dtype=np.float64)
    assert backend.current() == "numpy"
    assert all(isinstance(p.data, StrictArray) and p.dtype == np.float64 for p in model.parameters())
    assert all(isinstance(b, StrictArray) for _, b in model.named_buffers())
    assert isinstance(mb.tensor(np.zeros(2)).data, np.ndarray)  # new tensors still on the host
    mb.use("strict")
    out = model(mb.tensor(np.zeros((1, 2, 4, 4))))
    assert isinstance(out.data, StrictArray)
    mb.use("numpy")
    model.to("numpy")
    assert all(type(p.data) is np.ndarray for p in model.parameters())
    assert model(mb.tensor(np.zeros((1, 2, 4, 4)))).dtype == np.float64


def test_tensor_numel():
    assert mb.tensor(np.zeros((2, 3, 4))).numel() == 24
    assert mb.tensor(np.float32(1.0)).numel() == 1
    assert nn.Conv2d(4, 6, 3, groups=2).weight.numel() == 6 * 2 * 9


def test_counter_reprs_are_readable():
    x = mb.tensor(np.ones((2, 3, 4, 4), dtype=np.float32), requires_grad=True)
    w = mb.tensor(np.ones((5, 3, 3, 3), dtype=np.float32), requires_grad=True)
    with mb.count_mults() as counter:
        y = F.conv2d(x, w, padding=1)
        (y * y).sum().backward()
    forward = 2 * 5 * 27 * 16
    text = repr(counter)
    assert text.splitlines()[0] == (f"MultCounter(total={counter.total:,}, conv={counter.conv:,}, "
                                    f"forward={counter.forward.total:,}, backward={counter.backward.total:,})")
    assert f"conv2d={forward:,}" in text.splitlines()[1] and text.splitlines()[1].startswith("  forward:")
    assert "backward:" in text.splitlines()[2]
    assert repr(counter.forward).startswith(f"MultTally(forward: total={counter.forward.total:,}, conv={forward:,}")
    assert "mul=" in repr(counter.forward)


def randomize_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.data = rng.uniform(0.5, 1.5, c).astype(module.weight.dtype)
            module.bias.data = rng.standard_normal(c).astype(module.weight.dtype)
            module.running_mean = rng.standard_normal(c).astype(module.weight.dtype)
            module.running_var = rng.uniform(0.5, 2.0, c).astype(module.weight.dtype)
    return model


def outputs_and_counts(model, x):
    with mb.count_mults() as counter, mb.no_grad():
        out = model(mb.tensor(x)).data
    return out, counter


@pytest.mark.parametrize("build", [lambda: resnet_cifar(20), mobilenet_v2,
                                   lambda: mb.compress(randomize_batch_norms(resnet_cifar(20)).double().eval(),
                                                       energy_threshold=0.9)[0]])
def test_fuse_batch_norm_keeps_outputs_and_removes_the_bn_products(build):
    model = randomize_batch_norms(build()).double().eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
    want, before = outputs_and_counts(model, x)
    fused = mb.fuse_batch_norm(model)
    assert fused is not model and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    got, after = outputs_and_counts(fused, x)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(want).max())))
    assert before.by_op["batch_norm"] > 0 and "batch_norm" not in after.by_op
    assert after.conv == before.conv  # the convs (and BasisConvs) cost the same
    assert after.total == before.total - before.by_op["batch_norm"]
    new_keys = set(fused.state_dict()) - set(model.state_dict())
    assert new_keys and all(k.endswith(".bias") for k in new_keys)  # the folded shifts of bias-free convs
    assert not any("running_mean" in k for k in fused.state_dict())


class ResidualReadsRawConv(nn.Module):
    """bn(conv(x)) + conv(x): the BN cannot fold, since the raw conv output is read too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.pre = nn.BatchNorm2d(3)  # before a conv (pre-activation order): not foldable either
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.conv2(self.pre(self.bn(y) + y))


def test_fuse_batch_norm_leaves_bns_it_cannot_fold():
    model = randomize_batch_norms(ResidualReadsRawConv()).double().eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 6, 6))
    fused = mb.fuse_batch_norm(model, input_shape=(1, 3, 6, 6))
    assert isinstance(fused.bn, nn.BatchNorm2d) and isinstance(fused.pre, nn.BatchNorm2d)
    np.testing.assert_allclose(outputs_and_counts(fused, x)[0], outputs_and_counts(model, x)[0], rtol=1e-12)


def test_fuse_batch_norm_inplace_and_errors():
    model = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())).eval()
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = outputs_and_counts(model, x)[0]
    assert mb.fuse_batch_norm(model, input_shape=(1, 3, 8, 8), inplace=True) is model
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None and model[0].bias.dtype == np.float32
    np.testing.assert_allclose(outputs_and_counts(model, x)[0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        mb.fuse_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(TypeError, match="Module"):
        mb.fuse_batch_norm("model")
