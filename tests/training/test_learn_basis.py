"""A learnable basis (beyond the paper): ``BasisConv2d.learnable_basis`` and ``fine_tune(learn_basis=True)``.

The paper keeps the bases fixed; training them too fine-tunes both factors of each low-rank conv.
What must hold: the same function and the same forward multiplications, the same state_dict keys,
a correct gradient (float64 finite differences, on every conv path a basis stage takes), the bases
trained in step 1 only, at their own rate, and an exact resume.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis
from minibasis import nn
from minibasis.autograd import tensor
from minibasis.data import DataLoader, ToFloat, synthetic
from minibasis.functions import conv as conv_module
from minibasis.training import basis_parameters, fine_tune, learnable_bases, non_conv_parameters
from minibasis.training import trainer as trainer_module


def _state(model) -> dict:
    return {k: minibasis.to_numpy(v).copy() for k, v in model.state_dict().items()}


def _bases(model) -> dict:
    return {name: minibasis.to_numpy(m.basis_filters()).copy() for name, m in model.named_modules()
            if isinstance(m, nn.BasisConv2d)}


# ---------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------
def test_learnable_basis_is_a_parameter_under_the_same_key_computing_the_same():
    layer = nn.BasisConv2d.random(3, 6, 3, 5, padding=1, basis_bias=True, seed=11).eval()
    x = tensor(np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32))
    before, state_before = layer(x).numpy().copy(), _state(layer)
    assert not layer.basis_is_learnable and "basis" in dict(layer.named_buffers())

    assert layer.learnable_basis(True) is layer and layer.basis_is_learnable
    names = [name for name, _ in layer.named_parameters(recurse=False)]
    assert names == ["coeffs", "bias", "basis_bias", "basis"] and "basis" not in dict(layer.named_buffers())
    assert isinstance(layer.basis, nn.Parameter) and layer.basis.requires_grad
    state = _state(layer)
    assert state.keys() == state_before.keys()
    for key in state:
        assert np.array_equal(state[key], state_before[key]), key
    np.testing.assert_array_equal(layer(x).numpy(), before)
    assert "learnable_basis=True" in repr(layer)

    # Trained values go back into a buffer, and a fixed-basis layer loads the learnable one's file.
    layer.basis.data = layer.basis.data * 2
    fixed = nn.BasisConv2d.random(3, 6, 3, 5, padding=1, basis_bias=True, seed=12).eval()
    fixed.load_state_dict(layer.state_dict())
    assert not fixed.basis_is_learnable
    np.testing.assert_array_equal(fixed(x).numpy(), layer(x).numpy())
    layer.learnable_basis(False)
    assert not layer.basis_is_learnable and "basis" not in [n for n, _ in layer.named_parameters()]
    np.testing.assert_array_equal(minibasis.to_numpy(layer.basis), minibasis.to_numpy(fixed.basis))


@pytest.mark.parametrize("geometry, path", [
    (dict(c=2, m=3, q=4, stride=2, padding=1, bn=True), "strided"),
    (dict(c=2, m=3, q=4, stride=1, padding=1, bn=True), "same-runs"),
    (dict(c=2, m=3, q=4, stride=1, padding=0, bn=False), "im2col"),
    (dict(c=8, m=5, q=3, stride=1, padding=1, bn=False), "kn2row"),   # a "same" basis stage with Q < 0.75·C
])
def test_gradcheck_of_the_basis_float64(geometry, path):
    rng = np.random.default_rng(3)
    g = geometry
    layer = nn.BasisConv2d.random(g["c"], g["m"], 3, g["q"], stride=g["stride"], padding=g["padding"], bias=True,
                                  bn=g["bn"], seed=5, dtype=np.float64).learnable_basis()
    with conv_module.trace_paths() as paths:
        layer(tensor(rng.standard_normal((1, g["c"], 5, 5))))
    assert paths[0] == path

    def forward(x, basis):
        layer._parameters["basis"] = basis   # the checked leaf in place of the parameter
        return layer(x)

    inputs = [tensor(rng.standard_normal((2, g["c"], 5, 5)), requires_grad=True),
              tensor(rng.standard_normal((g["q"], g["c"], 3, 3)), requires_grad=True)]
    assert minibasis.gradcheck(forward, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 7])
def test_forward_mults_unchanged_backward_adds_the_basis_gradient_exactly(n):
    c, m, q, k, h = 6, 10, 4, 3, 9
    x = np.random.default_rng(1).standard_normal((n, c, h, h)).astype(np.float32)
    tallies = []
    for learnable in (False, True):
        layer = nn.BasisConv2d.random(c, m, k, q, padding=1, bn=False, seed=2).learnable_basis(learnable)
        xt = tensor(x, requires_grad=True)
        with minibasis.count_mults() as counter:
            (layer(xt) * 1.0).sum().backward()
        tallies.append(counter)
    fixed, learned = tallies
    assert learned.forward.conv == fixed.forward.conv == n * h * h * (q * c * k * k + m * q)
    # The basis stage's weight gradient: one product per (filter, window value, output position, image).
    assert learned.backward.conv - fixed.backward.conv == n * q * (c * k * k) * h * h


# ---------------------------------------------------------------------------
# in fine_tune
# ---------------------------------------------------------------------------
def _compressed():
    minibasis.manual_seed(3)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return minibasis.compress(original, energy_threshold=0.7, input_shape=(1, 3, 16, 16),
                              skip_unprofitable=False)[0]


def _loader(batch_size=16):
    (x, y), _ = synthetic(num_train=32, num_test=0, image_size=16, seed=1)
    return DataLoader((x, y), batch_size=batch_size, shuffle=True, seed=0, transform=ToFloat())


def test_bases_train_in_step_1_only_and_count_as_learnable():
    plain = _compressed()
    start = _bases(plain)
    fine_tune(plain, _loader(), epochs1=1, epochs2=1, lr2=0.05, progress=False)
    assert all(np.array_equal(start[k], v) for k, v in _bases(plain).items())   # the paper's: fixed

    model = _compressed()
    layers = [m for m in model.modules() if isinstance(m, nn.BasisConv2d)]
    assert len(layers) == 2
    fixed_count = model.num_parameters()
    snapshots = {}
    fine_tune(model, _loader(), epochs1=1, epochs2=1, lr2=0.05, progress=False, learn_basis=True,
              on_step_end=lambda stage, m: snapshots.update({stage: (_bases(m), _state(m))}))
    after1, state1 = snapshots["step1"]
    after2, state2 = snapshots["step2"]
    assert all(not np.array_equal(start[k], after1[k]) for k in start)          # trained in step 1
    assert all(np.array_equal(after1[k], after2[k]) for k in start)             # frozen in step 2
    assert any(not np.array_equal(state1[k], state2[k]) for k in state1 if k.endswith("coeffs"))
    assert all(layer.basis_is_learnable and not layer.basis.requires_grad for layer in layers)
    expected_extra = sum(layer.num_basis * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
                         for layer in layers)
    assert model.num_parameters() == fixed_count + expected_extra
    assert {id(p) for p in basis_parameters(model)}.isdisjoint(id(p) for p in non_conv_parameters(model))


@pytest.mark.parametrize("scale", [0.25, 1.0])
def test_the_bases_first_step_is_scale_times_the_rate(scale):
    """One SGD step (one batch, no momentum history, no weight decay): Δbasis = −lr·scale·grad, so
    doubling the scale doubles every basis change, and the coefficients' change does not move."""
    changes = []
    for s in (scale, 2 * scale):
        model = _compressed()
        start, coeffs0 = _bases(model), _state(model)
        fine_tune(model, _loader(batch_size=32), epochs1=1, lr1=0.05, epochs2=0, weight_decay=0.0,
                  progress=False, learn_basis=True, basis_lr_scale=s)
        end = _state(model)
        changes.append(({k: _bases(model)[k].astype(np.float64) - start[k] for k in start},
                        {k: end[k] - coeffs0[k] for k in end if k.endswith("coeffs")}))
    (bases_a, coeffs_a), (bases_b, coeffs_b) = changes
    for k in bases_a:
        assert np.abs(bases_a[k]).max() > 0
        np.testing.assert_allclose(bases_b[k], 2 * bases_a[k], rtol=1e-3, atol=1e-7)
    for k in coeffs_a:
        assert np.array_equal(coeffs_a[k], coeffs_b[k]), k


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(learn_basis=True, basis_lr_scale=0.0), "basis_lr_scale must be a positive number"),
    (dict(learn_basis=True, basis_lr_scale=True), "basis_lr_scale must be a positive number"),
])
def test_bad_basis_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        fine_tune(_compressed(), _loader(), epochs1=1, epochs2=0, progress=False, **kwargs)


def test_a_model_without_basisconv_has_no_basis_to_learn():
    with pytest.raises(ValueError, match="no BasisConv2d layer"):
        learnable_bases(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))


class _Interrupted(Exception):
    pass


def test_a_learn_basis_run_resumes_bit_exactly(tmp_path, monkeypatch):
    full = _compressed()
    fine_tune(full, _loader(), epochs1=2, epochs2=1, lr2=0.05, progress=False, learn_basis=True,
              folder=tmp_path / "full")

    save = trainer_module.Trainer.save

    def save_then_stop(self):
        save(self)
        if self.stage == "step1" and self.epoch == 1:
            raise _Interrupted

    monkeypatch.setattr(trainer_module.Trainer, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        fine_tune(_compressed(), _loader(), epochs1=2, epochs2=1, lr2=0.05, progress=False, learn_basis=True,
                  folder=tmp_path / "cut")
    monkeypatch.setattr(trainer_module.Trainer, "save", save)
    resumed = _compressed()
    fine_tune(resumed, _loader(), epochs1=2, epochs2=1, lr2=0.05, progress=False, learn_basis=True,
              folder=tmp_path / "cut", resume=True)
    expected, got = _state(full), _state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key


def test_a_model_with_learnable_bases_deploys_saves_and_loads(tmp_path):
    from minibasis.models import table3_cnn

    minibasis.manual_seed(0)
    model = minibasis.compress(table3_cnn(), energy_threshold=0.8, input_shape=(1, 3, 32, 32))[0]
    bases = learnable_bases(model)
    for p in bases:   # trained values: no longer the orthonormal eigen basis
        p.data = p.data * 1.5 + 0.01
    model.eval()
    x = tensor(np.random.default_rng(4).standard_normal((3, 3, 32, 32)).astype(np.float32))
    with minibasis.no_grad():
        expected = model(x).numpy()
        np.testing.assert_allclose(minibasis.deploy(model)(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    minibasis.save_model(model, tmp_path / "m.npz")
    loaded = minibasis.load_model(tmp_path / "m.npz")[0].eval()
    assert not any(m.basis_is_learnable for m in loaded.modules() if isinstance(m, nn.BasisConv2d))
    with minibasis.no_grad():
        np.testing.assert_array_equal(loaded(x).numpy(), expected)
