"""The backend switch and the strict stand-in device backend.

``minibasis.use("strict")`` selects arrays that behave like CuPy's where host/device
mix-ups are concerned (they refuse to become or meet host NumPy arrays silently)
but compute with NumPy, so on a CPU-only machine (1) any mix-up in the engine
raises, and (2) the engine's results on "strict" must equal those on "numpy" bit
for bit (the same NumPy calls run underneath). The first half of this file shows
that the stand-in really refuses what CuPy refuses; the second half runs the
engine on it.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis as mb
from minibasis import backend, functions as F, nn, optim
from minibasis.backend_strict import HostDeviceMixError, StrictArray


@pytest.fixture
def strict():
    mb.use("strict")
    yield backend.xp
    mb.use("numpy")


def device(array):
    """A host array copied onto the strict device (explicitly, as cupy.asarray does)."""
    return backend.asarray(np.asarray(array))


# ---------------------------------------------------------------------------------------------
# The stand-in refuses what CuPy refuses
# ---------------------------------------------------------------------------------------------
def test_use_strict_switches_the_array_module(strict):
    assert backend.current() == "strict"
    assert backend.xp is strict and strict is not np
    a = strict.zeros((2, 3), dtype=strict.float32)
    assert isinstance(a, StrictArray) and a.shape == (2, 3) and a.dtype == np.float32
    assert backend.get_array_module(a) is strict
    assert backend.get_array_module(np.zeros(1)) is np


@pytest.mark.parametrize("convert", [np.asarray, np.array, np.ascontiguousarray, lambda a: np.exp(a),
                                     lambda a: np.concatenate([a, a]), lambda a: np.sum(a),
                                     lambda a: np.float32(1) * np.ones(3) + a])
def test_no_silent_conversion_to_host(strict, convert):
    a = device([1.0, 2.0, 3.0])
    with pytest.raises(TypeError):
        convert(a)


@pytest.mark.parametrize("mix", [
    lambda a, h: a + h, lambda a, h: h + a, lambda a, h: a * h, lambda a, h: h - a, lambda a, h: a @ h,
    lambda a, h: a > h, lambda a, h: a.__iadd__(h), lambda a, h: a.__setitem__(slice(None), h),
    lambda a, h: a[h.astype(bool)], lambda a, h: backend.xp.matmul(a, h), lambda a, h: backend.xp.maximum(a, h),
    lambda a, h: backend.xp.where(a > 0, h, 0), lambda a, h: backend.xp.concatenate([a, h]),
    lambda a, h: backend.matmul(a, h), lambda a, h: backend.mul(h, a),
])
def test_mixing_with_host_arrays_raises(strict, mix):
    a, host = device([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 1.0])
    with pytest.raises(HostDeviceMixError, match="host numpy.ndarray"):
        mix(a, host)


def test_scalars_explicit_copies_and_reductions_work_as_on_cupy(strict):
    host = np.array([[1.0, -2.0], [3.0, 4.0]], dtype=np.float32)
    a = device(host)
    host[0, 0] = 100.0  # asarray copied: the device array does not alias host memory
    assert (a * 2 + np.float32(1) - 0.5).dtype == np.float32
    total = a.sum()
    assert isinstance(total, StrictArray) and total.ndim == 0  # a 0-d device array, like CuPy's
    assert float(total) == 6.0 and a.max().item() == 4.0 and int(a.argmax()) == 3 and bool(a[0, 0] == 1.0)
    back = backend.to_numpy(a)
    assert type(back) is np.ndarray and back.tolist() == [[1.0, -2.0], [3.0, 4.0]]
    back[0, 0] = -1.0  # to_numpy copied too
    assert a[0, 0].item() == 1.0
    view = a.reshape(4)
    view[1] = 7.0  # views share device memory
    assert a[0, 1].item() == 7.0
    rs = strict.random.RandomState(0).standard_normal((3,))
    assert isinstance(rs, StrictArray)
    view_2x2 = strict.lib.stride_tricks.as_strided(a, shape=(2, 2), strides=a.strides)
    assert isinstance(view_2x2, StrictArray)


def test_asarray_moves_between_backends():
    mb.use("strict")
    a = backend.asarray(np.arange(3.0))
    mb.use("numpy")
    b = backend.asarray(a)  # device → host, explicitly, through the strict backend's to_host
    assert type(b) is np.ndarray and b.tolist() == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# The engine on the stand-in: same results as on NumPy, every mix-up caught
# ---------------------------------------------------------------------------------------------
def _small_cnn():
    mb.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 1), nn.Conv2d(12, 4, 3, padding=1),  # pointwise, then kn2row (M < C)
        nn.AvgPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(4 * 2 * 2, 10))


def _train_step_and_eval(backend_name: str):
    """One SGD step of a small CNN on ``backend_name``, then an evaluation: host copies of everything."""
    mb.use(backend_name)
    model = _small_cnn()
    rng = np.random.default_rng(11)
    images = rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 10, size=6)
    x, y = mb.tensor(images), mb.tensor(labels)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    with mb.count_mults() as counter:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    grads = {name: mb.to_numpy(p.grad) for name, p in model.named_parameters()}
    opt.step()
    model.eval()
    with mb.no_grad():
        logits = model(x)
    state = {k: mb.to_numpy(v) for k, v in model.state_dict().items()}
    return loss.item(), grads, state, mb.to_numpy(logits), counter.as_dict()


def test_small_cnn_step_is_identical_on_strict_and_numpy(serial_engine):
    # strict arrays always take the serial chunk loop; bitwise equality needs the same chunks on numpy
    reference = _train_step_and_eval("numpy")
    strict_run = _train_step_and_eval("strict")
    mb.use("numpy")
    assert strict_run[0] == reference[0]
    for got, want in zip(strict_run[1:4], reference[1:4]):
        if isinstance(want, dict):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
        else:
            np.testing.assert_array_equal(got, want)
    assert strict_run[4] == reference[4]
    assert reference[4]["conv"] > 0 and reference[4]["backward"]["conv"] > 0  # counting was on


def test_module_to_strict_moves_parameters_and_buffers():
    model = _small_cnn()
    model.to("strict")
    assert backend.current() == "numpy"  # Module.to moves the module only; minibasis.use is the switch
    assert all(isinstance(p.data, StrictArray) for p in model.parameters())
    assert all(isinstance(b, StrictArray) for _, b in model.named_buffers())
    mb.use("strict")
    out = model(mb.tensor(np.zeros((2, 3, 16, 16), dtype=np.float32)))
    assert isinstance(out.data, StrictArray)


def test_a_host_device_mix_up_in_user_code_is_caught():
    """A model left on the host fed device data, and the reverse: both raise instead of computing."""
    model = _small_cnn()  # parameters on NumPy
    mb.use("strict")
    x = mb.tensor(np.zeros((2, 3, 16, 16), dtype=np.float32))
    with pytest.raises(TypeError, match="host"):
        model(x)
    with pytest.raises(TypeError):
        F.conv2d(mb.tensor(np.zeros((1, 3, 5, 5), np.float32)), mb.Tensor(np.zeros((2, 3, 3, 3), np.float32)))


def test_gradcheck_runs_on_strict(strict):
    rng = np.random.default_rng(0)
    x = mb.tensor(device(rng.standard_normal((2, 2, 5, 5))), requires_grad=True)
    w = mb.tensor(device(rng.standard_normal((3, 2, 3, 3))), requires_grad=True)
    b = mb.tensor(device(rng.standard_normal(3)), requires_grad=True)
    assert mb.gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [x, w, b])
    assert mb.gradcheck(lambda x: F.max_pool2d(F.relu(x), 3, 2, 1), [x])


def _basisconv_run(backend_name: str):
    basisconv = pytest.importorskip("minibasis.nn.basisconv", reason="BasisConv2d not written yet")
    mb.use(backend_name)
    mb.manual_seed(5)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    layers = [basisconv.BasisConv2d.from_conv(conv, energy_threshold=0.9),
              basisconv.BasisConv2d.random(6, 10, 3, 7, stride=2, padding=1, seed=2, basis_bias=True)]
    rng = np.random.default_rng(4)
    x = mb.tensor(rng.standard_normal((3, 6, 8, 8)).astype(np.float32), requires_grad=True)
    with mb.count_mults() as counter:
        total = (layers[0](x).sum() + layers[1](x).sum() * 0.5)
        total.backward()
    grads = [mb.to_numpy(p.grad) for layer in layers for p in layer.parameters()]
    return [total.item(), mb.to_numpy(x.grad)] + grads, counter.as_dict()


def test_basisconv_is_identical_on_strict_and_numpy():
    reference, ref_counts = _basisconv_run("numpy")
    got, got_counts = _basisconv_run("strict")
    mb.use("numpy")
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        np.testing.assert_array_equal(a, b)
    assert got_counts == ref_counts and ref_counts["conv"] > 0


def test_compressed_model_counts_are_identical_on_strict_and_numpy():
    compress_module = pytest.importorskip("minibasis.compress", reason="minibasis.compress not written yet")
    results = []
    for name in ("numpy", "strict"):
        mb.use(name)
        mb.manual_seed(8)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        compressed = compress_module.compress(model, 0.9)
        compressed = compressed[0] if isinstance(compressed, tuple) else compressed
        x = mb.tensor(np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32))
        with mb.count_mults() as counter, mb.no_grad():
            out = compressed(x)
        results.append((mb.to_numpy(out), counter.as_dict()))
    mb.use("numpy")
    np.testing.assert_array_equal(results[1][0], results[0][0])
    assert results[1][1] == results[0][1]
