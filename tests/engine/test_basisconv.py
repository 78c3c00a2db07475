"""nn.BasisConv2d: exactness against the conv it replaces, measured counts against the paper's
formulas, gradients, the fixed basis, and bad input."""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import backend, formulas, nn, optim
from minibasis.basis import random_orthonormal_basis

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)


def _conv_with(weight, bias, stride, padding):
    """A Conv2d holding exactly ``weight`` (M, C, kh, kw) and ``bias`` (M,) (dtype kept)."""
    m, c, kh, kw = weight.shape
    conv = nn.Conv2d(c, m, (kh, kw), stride=stride, padding=padding, bias=bias is not None)
    conv.weight.data = backend.asarray(weight.copy())
    if bias is not None:
        conv.bias.data = backend.asarray(bias.copy())
    return conv


def _relative(a, b):
    scale = max(np.abs(b).max(), np.finfo(np.float64).tiny)
    return np.abs(a - b).max() / scale


def _out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


@st.composite
def conv_cases(draw, regime):
    """Shapes, weights and an input for one exactness case.

    regime "D<M": C·kh·kw below M; "D>M": above; "rank": a weight of rank r < min(D, M).
    """
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if regime == "D<M":
        c = draw(st.integers(1, 2))
        m = draw(st.integers(c * kh * kw + 1, c * kh * kw + 6))
    else:
        c = draw(st.integers(2, 4))
        m = draw(st.integers(2, 6))
    d = c * kh * kw
    if regime == "D>M":
        c = max(c, -(-(m + 1) // (kh * kw)))  # make sure D > M
        d = c * kh * kw
    if regime == "rank":
        rank = draw(st.integers(1, min(d, m) - 1)) if min(d, m) > 1 else None
        if rank is None:
            m, rank = m + 1, 1
        flat = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, d))
    else:
        rank = min(d, m)
        flat = rng.standard_normal((m, d))
    weight = flat.reshape(m, c, kh, kw)
    stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * padding), 8))
    w = draw(st.integers(max(1, kw - 2 * padding), 8))
    n = draw(st.integers(1, 3))
    use_bias = draw(st.booleans())
    return dict(weight=weight, bias=rng.standard_normal(m) if use_bias else None, rank=rank,
                stride=stride, padding=padding, x=rng.standard_normal((n, c, h, w)),
                upstream=rng.standard_normal((n, m, _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding))))


def _check_exact(case, dtype, tol):
    conv = _conv_with(case["weight"].astype(dtype), None if case["bias"] is None else case["bias"].astype(dtype),
                      case["stride"], case["padding"])
    layer = nn.BasisConv2d.from_conv(conv, energy_threshold=1.0)
    m, c, kh, kw = case["weight"].shape
    assert layer.num_basis <= min(m, c * kh * kw)
    if dtype == np.float64:
        assert layer.num_basis == case["rank"], "t = 1 keeps exactly the rank"
    assert layer.basis.dtype == dtype and layer.coeffs.dtype == dtype

    outputs, grads = [], []
    for module in (conv, layer):
        x = mb.tensor(case["x"].astype(dtype), requires_grad=True)
        y = module(x)
        y.backward(mb.tensor(case["upstream"].astype(dtype)))
        outputs.append(y.numpy())
        grads.append(x.grad.numpy())
    assert outputs[0].shape == outputs[1].shape == case["upstream"].shape
    assert _relative(outputs[1], outputs[0]) <= tol
    assert _relative(grads[1], grads[0]) <= tol


@pytest.mark.parametrize("regime", ["D<M", "D>M", "rank"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_from_conv_at_t1_reproduces_the_conv_float64(regime, data):
    _check_exact(data.draw(conv_cases(regime)), np.float64, 1e-10)


@pytest.mark.parametrize("regime", ["D<M", "D>M", "rank"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_from_conv_at_t1_reproduces_the_conv_float32(regime, data):
    _check_exact(data.draw(conv_cases(regime)), np.float32, 1e-4)


def test_regimes_cover_both_sides_of_m():
    # The strategies must really produce D < M, D > M and rank-deficient weights.
    seen = set()

    @settings(max_examples=10, deadline=None)
    @given(data=st.data())
    def probe(data):
        for regime in ("D<M", "D>M", "rank"):
            case = data.draw(conv_cases(regime))
            m, c, kh, kw = case["weight"].shape
            d = c * kh * kw
            seen.add(("D<M" if d < m else "D>M" if d > m else "D=M", regime))
            if regime == "rank":
                assert np.linalg.matrix_rank(case["weight"].reshape(m, d)) == case["rank"] < min(d, m)

    probe()
    assert ("D<M", "D<M") in seen and ("D>M", "D>M") in seen


# ---------------------------------------------------------------------------
# Measured multiplications equal the paper's formulas
# ---------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 4), m=st.integers(1, 8), kh=st.integers(1, 3), kw=st.integers(1, 3),
       stride=st.integers(1, 3), padding=st.integers(0, 2), h=st.integers(3, 9), w=st.integers(3, 9),
       n=st.integers(1, 3), q_fraction=st.floats(0.0, 1.0), bias=st.booleans(), basis_bias=st.booleans(),
       bn=st.booleans())
def test_measured_mults_equal_formula(c, m, kh, kw, stride, padding, h, w, n, q_fraction, bias, basis_bias, bn):
    d = c * kh * kw
    q = 1 + int(q_fraction * (d - 1))
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    layer = nn.BasisConv2d(c, m, (kh, kw), q, stride=stride, padding=padding, bias=bias, bn=bn,
                           basis_bias=basis_bias).eval()
    conv = nn.Conv2d(c, m, (kh, kw), stride=stride, padding=padding, bias=bias)
    x = mb.tensor(np.ones((n, c, h, w), dtype=np.float32))
    with mb.count_mults() as counted_basis:
        y = layer(x)
    with mb.count_mults() as counted_conv:
        conv(x)
    assert y.shape == (n, m, ho, wo)

    per_image_basis, remainder = divmod(counted_basis.conv, n)
    assert remainder == 0
    assert per_image_basis == q * d * ho * wo + m * q * ho * wo
    assert per_image_basis == formulas.basisconv_mults(m, q, c, (kh, kw), ho, wo)
    assert counted_conv.conv == n * m * d * ho * wo == n * formulas.conv_mults(m, c, (kh, kw), ho, wo)
    ratio = Fraction(counted_basis.conv, counted_conv.conv)
    assert ratio == Fraction(q, m) + Fraction(q, d) == formulas.mult_ratio(m, q, c, (kh, kw))
    # BatchNorm multiplications are not convolution multiplications.
    assert counted_basis.by_op.get("conv2d") == counted_basis.conv


def test_coefficient_stage_builds_no_column_buffer(monkeypatch, serial_engine):
    # The 1×1 stage must go through conv2d's pointwise path (a view, not an im2col copy).
    from minibasis.functions import conv as conv_module

    built = []
    original = conv_module.im2col

    def spy(x, kernel, stride, padding, dilation=(1, 1)):
        col = original(x, kernel, stride, padding, dilation)
        built.append((kernel, bool(backend.get_array_module(col).shares_memory(col, x))))
        return col

    monkeypatch.setattr(conv_module, "im2col", spy)
    layer = nn.BasisConv2d(3, 5, 3, 4, padding=1)
    layer(mb.tensor(np.ones((2, 3, 6, 6), dtype=np.float32)))
    assert built == [((3, 3), False), ((1, 1), True)]


# ---------------------------------------------------------------------------
# Gradients and the fixed basis
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bn", [False, True])
def test_gradcheck_input_coeffs_bias_and_basis_bias(bn):
    rng = np.random.default_rng(3)
    layer = nn.BasisConv2d.random(2, 3, 3, 4, stride=2, padding=1, bias=True, basis_bias=True, bn=bn, seed=5,
                                  dtype=np.float64)

    def forward(x, coeffs, bias, basis_bias):
        # Evaluate the layer with the checked leaves in place of its parameters.
        layer._parameters.update(coeffs=coeffs, bias=bias, basis_bias=basis_bias)
        return layer(x)

    inputs = [mb.tensor(rng.standard_normal((2, 2, 5, 4)), requires_grad=True),
              mb.tensor(rng.standard_normal((3, 4)), requires_grad=True),
              mb.tensor(rng.standard_normal(3), requires_grad=True),
              mb.tensor(rng.standard_normal(4), requires_grad=True)]
    assert mb.gradcheck(forward, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_basis_is_a_fixed_buffer_that_optimizers_never_touch():
    layer = nn.BasisConv2d.random(3, 6, 3, 5, padding=1, basis_bias=True, seed=11)
    names = [name for name, _ in layer.named_parameters()]
    assert "basis" not in names and all(p is not layer.basis for p in layer.parameters())
    assert sorted(names) == ["basis_bias", "bias", "bn.bias", "bn.weight", "coeffs"]
    assert "basis" in layer.state_dict() and "basis" in dict(layer.named_buffers())
    basis_before = layer.basis.copy()
    coeffs_before = layer.coeffs.numpy().copy()

    opt = optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x = mb.tensor(np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32))
    for _ in range(3):
        opt.zero_grad()
        loss = (layer(x) * layer(x)).mean()
        loss.backward()
        opt.step()
    assert np.array_equal(mb.to_numpy(layer.basis), mb.to_numpy(basis_before))
    assert not np.allclose(layer.coeffs.numpy(), coeffs_before)


def test_state_dict_round_trip_restores_basis_and_outputs():
    source = nn.BasisConv2d.random(3, 6, 3, 5, stride=2, padding=1, basis_bias=True, seed=1).eval()
    target = nn.BasisConv2d.random(3, 6, 3, 5, stride=2, padding=1, basis_bias=True, seed=2).eval()
    assert not np.allclose(mb.to_numpy(source.basis), mb.to_numpy(target.basis))
    state = source.state_dict()
    assert set(state) == {"coeffs", "bias", "basis_bias", "basis", "bn.weight", "bn.bias", "bn.running_mean",
                          "bn.running_var"}
    assert state["basis"].shape == (5, 3, 3, 3) and state["coeffs"].shape == (6, 5)
    target.load_state_dict(state)
    assert np.array_equal(mb.to_numpy(target.basis), mb.to_numpy(source.basis))
    assert target.basis is not source.basis
    x = mb.tensor(np.random.default_rng(1).standard_normal((2, 3, 7, 7)).astype(np.float32))
    np.testing.assert_array_equal(target(x).numpy(), source(x).numpy())
    with pytest.raises(ValueError, match=r"has shape \(6, 5\), the model expects \(6, 4\)"):
        nn.BasisConv2d.random(3, 6, 3, 4, basis_bias=True, seed=1).load_state_dict(state)


def test_random_basis_is_orthonormal_seeded_and_in_im2col_order():
    c, m, k, q, seed = 2, 4, 3, 4, 7
    layer = nn.BasisConv2d.random(c, m, k, q, bias=False, bn=False, seed=seed, dtype=np.float64)
    flat = mb.to_numpy(layer.basis).reshape(q, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(q), atol=1e-12)
    assert np.array_equal(mb.to_numpy(nn.BasisConv2d.random(c, m, k, q, seed=seed, dtype=np.float64).basis), flat.reshape(q, c, k, k))
    assert not np.allclose(mb.to_numpy(nn.BasisConv2d.random(c, m, k, q, seed=seed + 1, dtype=np.float64).basis), flat.reshape(q, c, k, k))
    assert nn.BasisConv2d.random(c, m, k, q).bn is not None, "from scratch: BN on by default"
    assert nn.BasisConv2d(c, m, k, q).bn is None

    # One output position: the basis stage computes Eᵀ·x with x flattened in (C, kh, kw) order.
    layer.coeffs.data = backend.asarray(np.eye(m, q))
    x = np.random.default_rng(0).standard_normal((1, c, k, k))
    y = layer(mb.tensor(x)).numpy().reshape(m)
    E = random_orthonormal_basis(c * k * k, q, seed=seed)
    np.testing.assert_allclose(y, E.T @ x.reshape(-1), rtol=1e-12, atol=1e-12)


def test_random_init_scale_and_manual_seed():
    mb.manual_seed(4)
    a = nn.BasisConv2d.random(8, 16, 3, 9, basis_bias=True)
    mb.manual_seed(4)
    b = nn.BasisConv2d.random(8, 16, 3, 9, basis_bias=True)
    for key, value in a.state_dict().items():
        assert np.array_equal(mb.to_numpy(value), mb.to_numpy(b.state_dict()[key])), key
    assert np.abs(a.coeffs.numpy()).max() <= 1 / np.sqrt(9) and np.abs(a.bias.numpy()).max() <= 1 / np.sqrt(9)
    assert np.abs(a.basis_bias.numpy()).max() <= 1 / np.sqrt(8 * 9)
    assert a.coeffs.numpy().std() > 0.5 / np.sqrt(3 * 9), "spread like U(-1/sqrt(Q), 1/sqrt(Q))"


def test_from_conv_keeps_dtype_bias_stride_and_energy():
    mb.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = nn.BasisConv2d.from_conv(conv, num_basis=3)
    assert (layer.stride, layer.padding, layer.num_basis) == ((2, 2), (1, 1), 3)
    assert layer.coeffs.dtype == np.float32 and layer.basis.dtype == np.float32
    assert layer.bn is None and layer.basis_bias is None
    np.testing.assert_array_equal(layer.bias.numpy(), conv.bias.numpy())
    assert layer.bias.data is not conv.bias.data
    # energy = retained fraction of the squared singular values of the filter matrix
    s = np.linalg.svd(conv.weight.numpy().astype(np.float64).reshape(6, -1), compute_uv=False)
    assert layer.energy == pytest.approx((s[:3] ** 2).sum() / (s ** 2).sum(), rel=1e-12)
    assert nn.BasisConv2d.random(2, 3, 3, 2).energy is None
    text = repr(layer)
    assert "num_basis=3" in text and "energy=" in text and "stride=(2, 2)" in text
    no_bias = nn.BasisConv2d.from_conv(nn.Conv2d(2, 3, 1, bias=False), energy_threshold=1.0)
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()
    conv64 = _conv_with(np.random.default_rng(0).standard_normal((3, 2, 3, 3)), None, 1, 0)
    assert nn.BasisConv2d.from_conv(conv64, energy_threshold=0.5).coeffs.dtype == np.float64


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, 1.0000001])
def test_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match=r"energy_threshold must be in \(0, 1\]"):
        nn.BasisConv2d.from_conv(nn.Conv2d(3, 4, 3), energy_threshold=threshold)


def test_both_or_neither_threshold_and_num_basis():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="exactly one"):
        nn.BasisConv2d.from_conv(conv)
    with pytest.raises(ValueError, match="exactly one"):
        nn.BasisConv2d.from_conv(conv, energy_threshold=0.9, num_basis=2)


def test_num_basis_above_min_d_m():
    with pytest.raises(ValueError, match=r"min\(D, M\)\] = \[1, 4\]"):
        nn.BasisConv2d.from_conv(nn.Conv2d(3, 4, 3), num_basis=5)  # D = 27, M = 4
    with pytest.raises(ValueError, match=r"min\(D, M\)\] = \[1, 3\]"):
        nn.BasisConv2d.from_conv(nn.Conv2d(3, 8, 1), num_basis=4)  # D = 3, M = 8


def test_non_4d_weight_and_non_conv():
    conv = nn.Conv2d(3, 4, 3)
    conv.weight = nn.Parameter(mb.tensor(np.ones((4, 27), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"4-D.*\(4, 27\)"):
        nn.BasisConv2d.from_conv(conv, energy_threshold=1.0)
    with pytest.raises(TypeError, match="Conv2d.*Linear"):
        nn.BasisConv2d.from_conv(nn.Linear(3, 4), energy_threshold=1.0)
    with pytest.raises(TypeError, match="Conv2d.*BasisConv2d"):
        nn.BasisConv2d.from_conv(nn.BasisConv2d(3, 4, 3, 2), energy_threshold=1.0)


def test_basis_of_wrong_shape_or_dtype_and_too_many_random_vectors():
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 3\).*\(2, 3, 3, 2\)"):
        nn.BasisConv2d(3, 4, 3, 2, basis=np.zeros((2, 3, 3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(2, 3, 3, 3\).*\(3, 3, 3, 3\)"):
        nn.BasisConv2d(3, 4, 3, 2, basis=np.zeros((3, 3, 3, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="floating"):
        nn.BasisConv2d(3, 4, 3, 2, basis=np.zeros((2, 3, 3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="D = C\\*kh\\*kw"):
        nn.BasisConv2d(1, 4, 2, 5)  # D = 4
    with pytest.raises(ValueError, match="D = C\\*kh\\*kw"):
        nn.BasisConv2d.random(1, 4, 2, 5)
    with pytest.raises(ValueError, match="num_basis"):
        nn.BasisConv2d(3, 4, 3, 0)
    with pytest.raises(ValueError, match=r"coeffs must have shape .*\(4, 2\)"):
        nn.BasisConv2d(3, 4, 3, 2, coeffs=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="channels"):
        nn.BasisConv2d(3, 4, 3, 2)(mb.tensor(np.zeros((1, 2, 5, 5), dtype=np.float32)))
