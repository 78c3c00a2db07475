"""CPU (NumPy) against GPU (CuPy): the same engine code must give the same numbers on both.

Skipped, with the reason, where CuPy or a CUDA device is missing. On a CPU-only
machine the strict stand-in backend (tests/engine/test_backend.py) catches host/device
mix-ups instead; these tests check the real device. Float64 cases compare
tightly (the GPU's reductions and GEMMs only reorder sums); float32 cases
compare at float32 rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F, nn, optim

cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'minibasis[gpu]')")
try:
    _devices = cupy.cuda.runtime.getDeviceCount()
except Exception as exc:  # CUDA driver or runtime missing
    pytest.skip(f"CuPy is installed but CUDA is not usable: {exc}", allow_module_level=True)
if _devices < 1:
    pytest.skip("CuPy is installed but no CUDA device was found", allow_module_level=True)

pytestmark = pytest.mark.gpu


def _conv_run(backend_name, x, w, b, stride, padding, grad_out):
    mb.use(backend_name)
    xt, wt, bt = (mb.tensor(a, requires_grad=True) for a in (x, w, b))
    y = F.conv2d(xt, wt, bt, stride=stride, padding=padding)
    assert isinstance(y.data, cupy.ndarray if backend_name == "cupy" else np.ndarray)
    y.backward(mb.tensor(grad_out))
    return [mb.to_numpy(a) for a in (y, xt.grad, wt.grad, bt.grad)]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("geometry", [(3, 1, 1), (1, 1, 0), (5, 2, 2), (3, 2, 0), (1, 2, 0)])
def test_conv2d_forward_backward_match(dtype, tol, geometry):
    kernel, stride, padding = geometry
    rng = np.random.default_rng(0)
    n, c, m, h = 5, 6, 7, 11
    x = rng.standard_normal((n, c, h, h)).astype(dtype)
    w = rng.standard_normal((m, c, kernel, kernel)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype)
    ho = (h + 2 * padding - kernel) // stride + 1
    grad_out = rng.standard_normal((n, m, ho, ho)).astype(dtype)
    cpu = _conv_run("numpy", x, w, b, stride, padding, grad_out)
    gpu = _conv_run("cupy", x, w, b, stride, padding, grad_out)
    for name, got, want in zip(("y", "gx", "gw", "gb"), gpu, cpu):
        assert got.dtype == want.dtype == dtype, name
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())), err_msg=name)


def test_conv2d_counts_match():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    counts = []
    for name in ("numpy", "cupy"):
        mb.use(name)
        xt, wt = mb.tensor(x, requires_grad=True), mb.tensor(w, requires_grad=True)
        with mb.count_mults() as counter:
            F.conv2d(xt, wt, padding=1).sum().backward()
        counts.append(counter.as_dict())
    assert counts[0] == counts[1] and counts[0]["conv"] == 3 * 2 * 4 * 27 * 64


def _basisconv_run(backend_name):
    mb.use(backend_name)
    mb.manual_seed(5)  # host-side init: the same weights on both backends
    conv = nn.Conv2d(6, 10, 3, padding=1)
    layers = [nn.BasisConv2d.from_conv(conv, energy_threshold=0.9),
              nn.BasisConv2d.random(6, 10, 3, 7, stride=2, padding=1, seed=2, basis_bias=True, bn=True)]
    x = mb.tensor(np.random.default_rng(4).standard_normal((3, 6, 8, 8)).astype(np.float32), requires_grad=True)
    with mb.count_mults() as counter:
        total = layers[0](x).sum() + 0.5 * layers[1](x).sum()
        total.backward()
    grads = [mb.to_numpy(p.grad) for layer in layers for p in layer.parameters() if p.grad is not None]
    return [mb.to_numpy(total), mb.to_numpy(x.grad)] + grads, counter.as_dict()


def test_basisconv_matches():
    cpu, cpu_counts = _basisconv_run("numpy")
    gpu, gpu_counts = _basisconv_run("cupy")
    assert len(cpu) == len(gpu) and gpu_counts == cpu_counts
    for got, want in zip(gpu, cpu):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * max(1.0, float(np.abs(want).max())))


def _resnet20_step(backend_name):
    models = pytest.importorskip("minibasis.models")
    mb.use(backend_name)
    mb.manual_seed(0)
    model = models.resnet_cifar(20)
    rng = np.random.default_rng(0)
    x = mb.tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    labels = mb.tensor(rng.integers(0, 10, size=8))
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    opt.step()
    return loss.item(), {k: mb.to_numpy(v) for k, v in model.state_dict().items()}


def test_resnet20_training_step_matches():
    cpu_loss, cpu_state = _resnet20_step("numpy")
    gpu_loss, gpu_state = _resnet20_step("cupy")
    assert abs(gpu_loss - cpu_loss) <= 1e-4 * max(1.0, abs(cpu_loss))
    assert gpu_state.keys() == cpu_state.keys()
    for key, want in cpu_state.items():
        np.testing.assert_allclose(gpu_state[key], want, rtol=1e-3, atol=1e-4, err_msg=key)


def test_module_to_cupy_moves_everything():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.to("cupy")
    assert mb.backend.current() == "numpy"  # Module.to moves the module only; minibasis.use is the switch
    assert all(isinstance(p.data, cupy.ndarray) for p in model.parameters())
    assert all(isinstance(b, cupy.ndarray) for _, b in model.named_buffers())
    mb.use("cupy")
    out = model(mb.tensor(np.zeros((1, 3, 5, 5), dtype=np.float32)))
    assert isinstance(out.data, cupy.ndarray)
