"""The model zoo: parameter counts against the paper's Table 1, key names, output shapes, and
logits against PyTorch re-implementations of the source architectures (tests/torch_zoo.py)."""
import numpy as np
import pytest

import minibasis as mb
from minibasis import models
from minibasis.models import alexnet, densenet_bc, get_model, resnet_cifar, vgg16


def _forward(model, batch=2, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    model.eval()
    with mb.no_grad():
        return model(mb.tensor(x)).numpy()


# -- parameter counts ------------------------------------------------------------------
# The paper's Table 1 (CIFAR-100 nets, all parameters including BatchNorm's) and the
# akamaster README's counts for its CIFAR-10 ResNets: facts from outside this code base.
@pytest.mark.parametrize("build, expected", [
    (lambda: alexnet(num_classes=100), 2_495_396),
    (lambda: vgg16(num_classes=100, batch_norm=False), 14_765_988),
    (lambda: resnet_cifar(110, num_classes=100, shortcut="B"), 1_736_564),
    (lambda: densenet_bc(depth=190, growth_rate=40, num_classes=100), 25_821_620),
    (lambda: resnet_cifar(20, num_classes=10, shortcut="A"), 269_722),
    (lambda: resnet_cifar(56, num_classes=10, shortcut="A"), 853_018),
], ids=["alexnet-table1", "vgg16-table1", "resnet110B-table1", "densenet190-table1",
        "resnet20A-akamaster", "resnet56A-akamaster"])
def test_parameter_counts(build, expected):
    model = build()
    assert model.num_parameters() == expected
    # Every parameter is learnable in a freshly built net.
    assert model.num_parameters(learnable_only=True) == expected


def test_vgg16_bn_adds_two_parameters_per_conv_channel():
    plain, with_bn = vgg16(100), vgg16(100, batch_norm=True)
    conv_channels = sum(m.out_channels for _, m in plain.named_modules() if isinstance(m, mb.nn.Conv2d))
    assert conv_channels == 4224  # 2·64 + 2·128 + 3·256 + 6·512
    assert with_bn.num_parameters() == plain.num_parameters() + 2 * conv_channels


# -- structure and keys ----------------------------------------------------------------
def test_option_a_keys_follow_akamaster_readme():
    # The README's key pattern: conv1, bn1, layer{L}.{i}.conv{1,2}/bn{1,2}, linear; 97 keys for ResNet-20
    # (it lists no num_batches_tracked entries).
    expected = {"conv1.weight", "linear.weight", "linear.bias"}
    expected |= {f"bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
    for layer in (1, 2, 3):
        for i in range(3):
            for j in (1, 2):
                expected.add(f"layer{layer}.{i}.conv{j}.weight")
                expected |= {f"layer{layer}.{i}.bn{j}.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
    keys = set(resnet_cifar(20, shortcut="A").state_dict())
    assert len(expected) == 97
    assert keys == expected


def test_option_b_has_projection_shortcuts_and_fc_head():
    keys = set(resnet_cifar(20, shortcut="B").state_dict())
    assert {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var",
            "layer3.0.downsample.0.weight", "fc.weight", "fc.bias"} <= keys
    assert not any(k.startswith("linear") or "layer1.0.downsample" in k for k in keys)
    state = resnet_cifar(20, shortcut="B").state_dict()
    assert state["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert state["layer3.0.downsample.0.weight"].shape == (64, 32, 1, 1)


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = resnet_cifar(20, shortcut="A").layer2[0]
    x = np.random.default_rng(1).standard_normal((2, 16, 32, 32)).astype(np.float32)
    out = block.shortcut(mb.tensor(x)).numpy()
    assert out.shape == (2, 32, 16, 16)
    np.testing.assert_array_equal(out[:, :8], 0)
    np.testing.assert_array_equal(out[:, 24:], 0)
    # Channel c of the input lands at 8 + c, sampled at even rows and columns.
    np.testing.assert_array_equal(out[:, 8:24, 3, 5], x[:, :, 6, 10])


def test_densenet_keys_follow_bearpaw():
    keys = set(densenet_bc(depth=40, growth_rate=12).state_dict())
    for key in ("conv1.weight", "dense1.0.bn1.running_mean", "dense1.0.conv1.weight", "dense1.5.conv2.weight",
                "trans1.bn1.weight", "trans1.conv1.weight", "trans2.conv1.weight", "dense3.5.bn2.bias",
                "bn.running_var", "fc.weight", "fc.bias"):
        assert key in keys, key
    state = densenet_bc(depth=40, growth_rate=12).state_dict()
    # 24 stem channels + 6 layers × 12 = 96 → transition to 48.
    assert state["trans1.conv1.weight"].shape == (48, 96, 1, 1)
    assert state["dense1.5.conv1.weight"].shape == (48, 24 + 5 * 12, 1, 1)


@pytest.mark.parametrize("name", ["resnet_cifar", "densenet_bc"])
def test_bad_depth_is_a_clear_error(name):
    with pytest.raises(ValueError, match="depth"):
        get_model(name, depth=21)


def test_unknown_model_and_shortcut():
    with pytest.raises(ValueError, match="known models"):
        get_model("resnet21")
    with pytest.raises(ValueError, match="shortcut"):
        resnet_cifar(20, shortcut="C")


def test_registry_names():
    for name in ("table3_cnn", "alexnet", "vgg16", "vgg16_bn", "resnet20", "resnet32", "resnet44", "resnet56",
                 "resnet110", "resnet1202", "densenet190", "resnet_cifar", "densenet_bc"):
        assert name in models.MODELS
    assert get_model("resnet56", num_classes=100).num_classes == 100


def test_alexnet_rejects_other_input_sizes():
    with pytest.raises(ValueError, match="32"):
        alexnet().eval()(mb.tensor(np.zeros((1, 3, 64, 64), np.float32)))


# -- forward shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("table3_cnn", {}), ("alexnet", {}), ("vgg16", {}), ("vgg16_bn", {"num_classes": 100}),
    ("resnet20", {}), ("resnet20", {"shortcut": "B", "num_classes": 100}), ("resnet32", {}), ("resnet44", {}),
    ("resnet56", {}), ("resnet110", {"shortcut": "B", "num_classes": 100}),
    ("densenet_bc", {"depth": 40, "growth_rate": 12}),
])
def test_forward_shape(name, kwargs):
    model = get_model(name, **kwargs)
    out = _forward(model, batch=2)
    assert out.shape == (2, kwargs.get("num_classes", 10))
    assert np.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet1202", "densenet190"])
def test_forward_shape_big_nets(name):
    # Train mode (batch statistics, no graph): at initialization the running statistics are
    # the identity, and 600 residual additions without normalization overflow float32 in eval
    # mode, in PyTorch as here.
    model = get_model(name, num_classes=100).train()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with mb.no_grad():
        out = model(mb.tensor(x)).numpy()
    assert out.shape == (2, 100)
    assert np.isfinite(out).all()


def test_training_step_runs_backward_through_the_shortcuts():
    model = resnet_cifar(20, shortcut="A")
    model.train()
    x = mb.tensor(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    loss = mb.functions.cross_entropy(model(x), mb.backend.asarray(np.array([0, 1, 2, 3])))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert np.abs(model.conv1.weight.grad.numpy()).sum() > 0


# -- against PyTorch re-implementations ---------------------------------------------------
def _compare_with_torch(torch_model, our_model, atol, batch=4, seed=0):
    """Same weights in both; logits agree to ``atol`` times the logits' scale (at least 1)."""
    torch = pytest.importorskip("torch")
    from torch_zoo import numpy_state, randomize

    randomize(torch_model, seed)
    torch_model.eval()
    # Strict loading also checks that every key name is the source's.
    our_model.load_state_dict(numpy_state(torch_model), strict=True)
    x = np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    ours = _forward_given(our_model, x)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=atol * scale)
    # Not a vacuous match: the logits vary across the batch well beyond the tolerance.
    assert np.ptp(expected, axis=0).max() > 100 * atol * scale


def _forward_given(model, x):
    model.eval()
    with mb.no_grad():
        return model(mb.tensor(x)).numpy()


def test_resnet20_option_a_matches_akamaster_in_torch():
    pytest.importorskip("torch")
    from torch_zoo import AkamasterResNet
    _compare_with_torch(AkamasterResNet(20), resnet_cifar(20, shortcut="A"), atol=1e-4)


def test_resnet20_option_b_matches_bearpaw_in_torch():
    pytest.importorskip("torch")
    from torch_zoo import BearpawResNet
    _compare_with_torch(BearpawResNet(20, num_classes=100), resnet_cifar(20, num_classes=100, shortcut="B"),
                        atol=1e-4)


def test_densenet_bc_matches_bearpaw_in_torch():
    pytest.importorskip("torch")
    from torch_zoo import BearpawDenseNet
    _compare_with_torch(BearpawDenseNet(40, 12, num_classes=10), densenet_bc(40, 12, num_classes=10), atol=1e-4)


def test_alexnet_matches_bearpaw_in_torch():
    pytest.importorskip("torch")
    from torch_zoo import BearpawAlexNet
    _compare_with_torch(BearpawAlexNet(100), alexnet(100), atol=1e-4)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_matches_bearpaw_in_torch(batch_norm):
    pytest.importorskip("torch")
    from torch_zoo import BearpawVGG16
    _compare_with_torch(BearpawVGG16(10, batch_norm), vgg16(10, batch_norm=batch_norm), atol=1e-4, batch=2)


@pytest.mark.parametrize("depth", [110, 1202])
def test_deep_resnet_parameter_counts_match_torch(depth):
    pytest.importorskip("torch")
    from torch_zoo import AkamasterResNet, BearpawResNet
    for shortcut, reference in (("A", AkamasterResNet), ("B", BearpawResNet)):
        expected = sum(p.numel() for p in reference(depth, num_classes=100).parameters())
        assert resnet_cifar(depth, 100, shortcut).num_parameters() == expected
