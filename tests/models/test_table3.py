"""models.table3_cnn: the paper's Table 3 CIFAR-10 CNN and its BasisConv twin."""
import numpy as np
import pytest

import minibasis as mb
from minibasis import models, nn

# The paper's Table 3: learnable parameters of the conv layers.
PAPER_CONV_PARAMS, PAPER_TWIN_CONV_PARAMS = 79_328, 6_400
# fc 576→64 and 64→10 with biases
FC_PARAMS = 576 * 64 + 64 + 64 * 10 + 10


def _conv_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BasisConv2d))]


def _learnable_conv_params(model):
    """Scalars in the conv layers' parameters(), without the BatchNorm inside a BasisConv2d."""
    return sum(p.numel() for layer in _conv_layers(model) for name, p in layer.named_parameters()
               if p.requires_grad and not name.startswith("bn."))


def test_plain_net_has_the_papers_conv_parameter_count():
    model = models.table3_cnn()
    assert len(_conv_layers(model)) == 3
    assert _learnable_conv_params(model) == PAPER_CONV_PARAMS
    assert sum(p.numel() for p in model.parameters()) == PAPER_CONV_PARAMS + FC_PARAMS


def test_basis_twin_has_the_papers_conv_parameter_count():
    model = models.table3_cnn(basis=True, seed=0)
    layers = _conv_layers(model)
    assert [type(m) for m in layers] == [nn.BasisConv2d] * 3
    assert [(m.num_basis, m.out_channels) for m in layers] == [(32, 32), (32, 32), (64, 64)]
    assert all(m.basis_bias is not None and m.bias is not None and m.bn is not None for m in layers)
    assert _learnable_conv_params(model) == PAPER_TWIN_CONV_PARAMS
    bn_params = 2 * (32 + 32 + 64)
    assert sum(p.numel() for p in model.parameters()) == PAPER_TWIN_CONV_PARAMS + bn_params + FC_PARAMS
    for m in layers:
        flat = m.basis.reshape(m.num_basis, -1).astype(np.float64)
        np.testing.assert_allclose(flat @ flat.T, np.eye(m.num_basis), atol=1e-6)


@pytest.mark.parametrize("basis", [False, True])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_shapes(basis, num_classes):
    model = models.table3_cnn(num_classes=num_classes, basis=basis, seed=1)
    x = mb.tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    assert model(x).shape == (2, num_classes)
    h = x
    sides = []
    for module in model.features:
        h = module(h)
        if isinstance(module, nn.MaxPool2d):
            sides.append(h.shape[1:])
    assert sides == [(32, 15, 15), (32, 7, 7), (64, 3, 3)]
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\).*\(2, 3, 28, 28\)"):
        model(mb.tensor(np.zeros((2, 3, 28, 28), dtype=np.float32)))


def test_measured_conv_mults_per_image():
    x = mb.tensor(np.zeros((2, 3, 32, 32), dtype=np.float32))
    # (M, D, output side) of the three convs; the twin has Q = M.
    layers = [(32, 3 * 25, 32), (32, 32 * 25, 15), (64, 32 * 25, 7)]
    expected_plain = sum(m * d * s * s for m, d, s in layers)
    expected_twin = sum((m * d + m * m) * s * s for m, d, s in layers)
    assert expected_plain == 10_726_400
    for basis, expected in ((False, expected_plain), (True, expected_twin)):
        model = models.table3_cnn(basis=basis, seed=0).eval()
        with mb.no_grad(), mb.count_mults() as counter:
            model(x)
        assert counter.conv == 2 * expected


def test_twin_seed_and_state_dict_keys():
    a, b = models.table3_cnn(basis=True, seed=3), models.table3_cnn(basis=True, seed=3)
    assert np.array_equal(a.features[0].basis, b.features[0].basis)
    assert not np.allclose(a.features[0].basis, models.table3_cnn(basis=True, seed=4).features[0].basis)
    keys = list(a.state_dict())
    assert keys[:4] == ["features.0.coeffs", "features.0.bias", "features.0.basis_bias", "features.0.basis"]
    assert "features.0.bn.running_var" in keys and "classifier.2.weight" in keys
    assert not any(name.endswith(".basis") for name, _ in a.named_parameters())


def test_plain_net_matches_torch_layout_and_outputs():
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    reference = tnn.Sequential()
    reference.features = tnn.Sequential(
        tnn.Conv2d(3, 32, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(32, 32, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
        tnn.Conv2d(32, 64, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2))
    reference.flatten = tnn.Flatten()
    reference.classifier = tnn.Sequential(tnn.Linear(576, 64), tnn.ReLU(), tnn.Linear(64, 10))
    reference = reference.double()

    model = models.table3_cnn()
    ours = model.state_dict()
    theirs = reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in ours)
    model.load_state_dict({k: v.numpy() for k, v in theirs.items()})
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    expected = reference(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(model(mb.tensor(x)).numpy(), expected, rtol=1e-10, atol=1e-12)
