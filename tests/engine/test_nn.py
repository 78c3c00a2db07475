"""nn: Module bookkeeping (names, state_dict, modes, freezing), layer initialization, BatchNorm statistics."""
from collections import OrderedDict

import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F
from minibasis import backend, nn, optim
from reference import batch_norm_numpy

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                      Block(4, 6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(OrderedDict(fc=nn.Linear(6, 5), drop=nn.Dropout(0.5), bn=nn.BatchNorm1d(5)))

    def forward(self, x):
        return self.head(F.flatten(self.pool(self.features(x))))


EXPECTED_KEYS = [
    "features.0.weight", "features.0.bias",
    "features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var",
    "features.4.conv.weight",
    "features.4.bn.weight", "features.4.bn.bias", "features.4.bn.running_mean", "features.4.bn.running_var",
    "head.fc.weight", "head.fc.bias",
    "head.bn.weight", "head.bn.bias", "head.bn.running_mean", "head.bn.running_var",
]


def torch_small_net(torch):
    tnn = torch.nn

    class TBlock(tnn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv = tnn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            self.bn = tnn.BatchNorm2d(c_out)

    class TNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.features = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(),
                                           tnn.MaxPool2d(2), TBlock(4, 6))
            self.pool = tnn.AdaptiveAvgPool2d(1)
            self.head = tnn.Sequential(OrderedDict(fc=tnn.Linear(6, 5), drop=tnn.Dropout(0.5),
                                                   bn=tnn.BatchNorm1d(5)))

    return TNet()


def test_state_dict_keys_and_shapes_follow_pytorch_names():
    net = SmallNet()
    state = net.state_dict()
    assert list(state) == EXPECTED_KEYS
    assert state["features.4.conv.weight"].shape == (6, 4, 3, 3)
    assert state["head.fc.weight"].shape == (5, 6)
    assert [name for name, _ in net.named_parameters()] == [k for k in EXPECTED_KEYS if "running" not in k]
    assert net.num_parameters() == sum(int(np.prod(v.shape)) for k, v in state.items() if "running" not in k)


def test_state_dict_keys_equal_torch_state_dict_keys():
    torch = pytest.importorskip("torch")
    theirs = {k: tuple(v.shape) for k, v in torch_small_net(torch).state_dict().items()
              if not k.endswith("num_batches_tracked")}
    ours = {k: tuple(v.shape) for k, v in SmallNet().state_dict().items()}
    assert ours == theirs
    # ... so a torch state_dict (with num_batches_tracked) loads as is
    net = SmallNet()
    torch_state = {k: v.numpy() for k, v in torch_small_net(torch).state_dict().items()}
    net.load_state_dict(torch_state)
    np.testing.assert_array_equal(net.features[0].weight.numpy(), torch_state["features.0.weight"])


def test_load_state_dict_round_trip_copies_values():
    source, target = SmallNet(), SmallNet()
    source.features[1]._buffers["running_mean"][:] = 7.0
    params_before = list(target.parameters())
    target.load_state_dict(source.state_dict())
    assert all(a is b for a, b in zip(target.parameters(), params_before))  # an optimizer's references stay valid
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        np.testing.assert_array_equal(mb.to_numpy(a), mb.to_numpy(b), err_msg=key)
        assert a is not b  # copied, not aliased
    # Tensors are accepted as values too
    target.load_state_dict({k: mb.tensor(v) for k, v in source.state_dict().items()})


def test_load_state_dict_strict_key_checks_name_the_keys():
    net = SmallNet()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    state = {k: backend.xp.zeros_like(v) for k, v in net.state_dict().items()}
    del state["head.fc.bias"]
    state["head.fc.extra"] = np.zeros(3, np.float32)
    with pytest.raises(KeyError, match=r"head\.fc\.bias") as info:
        net.load_state_dict(state)
    assert "head.fc.extra" in str(info.value)
    for k, v in net.state_dict().items():  # nothing was changed
        np.testing.assert_array_equal(mb.to_numpy(v), mb.to_numpy(before[k]))
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == ["head.fc.bias"] and unexpected == ["head.fc.extra"]
    assert not net.features[0].weight.numpy().any()  # the matching keys were loaded


def test_load_state_dict_shape_check_names_key_and_shapes():
    net = SmallNet()
    state = dict(net.state_dict())
    state["features.0.weight"] = np.zeros((4, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"features\.0\.weight.*\(4, 3, 5, 5\).*\(4, 3, 3, 3\)"):
        net.load_state_dict(state)


def test_train_eval_propagate_to_every_submodule():
    net = SmallNet()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_eval_mode_changes_dropout_and_batch_norm_behaviour():
    mb.manual_seed(0)
    net = SmallNet()
    x = mb.tensor(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    net.eval()
    a, b = net(x).numpy(), net(x).numpy()
    np.testing.assert_array_equal(a, b)  # deterministic in evaluation
    stats = net.features[1]._buffers["running_mean"].copy()
    net(x)
    np.testing.assert_array_equal(mb.to_numpy(net.features[1]._buffers["running_mean"]), mb.to_numpy(stats))  # frozen in eval
    net.train()
    net(x)
    assert not np.array_equal(mb.to_numpy(net.features[1]._buffers["running_mean"]), mb.to_numpy(stats))  # updated in training


def test_frozen_parameters_are_not_updated_bit_for_bit():
    mb.manual_seed(1)
    net = SmallNet()
    net.features.requires_grad_(False)
    frozen = {k: p.numpy().copy() for k, p in net.features.named_parameters()}
    opt = optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    head_before = net.head.fc.weight.numpy().copy()
    x = mb.tensor(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), np.array([0, 1, 2, 3])).backward()
        assert net.features[0].weight.grad is None
        opt.step()
    for k, p in net.features.named_parameters():
        assert p.numpy().tobytes() == frozen[k].tobytes(), k
    assert not np.array_equal(net.head.fc.weight.numpy(), head_before)


def test_parameter_frozen_after_it_got_a_gradient_is_skipped():
    p = nn.Parameter(mb.tensor(np.ones(3, np.float32)))
    (p * 2.0).sum().backward()
    p.requires_grad_(False)
    opt = optim.SGD([p], lr=1.0, weight_decay=0.5)
    opt.step()
    np.testing.assert_array_equal(p.numpy(), np.ones(3, np.float32))


def test_parameter_groups_with_different_learning_rates():
    net = SmallNet()
    body = list(net.features.parameters())
    head = list(net.head.parameters())
    opt = optim.SGD([{"params": body}, {"params": head, "lr": 0.0}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]
    before_body = [p.numpy().copy() for p in body]
    before_head = [p.numpy().copy() for p in head]
    x = mb.tensor(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    F.cross_entropy(net(x), np.array([0, 1, 2, 3])).backward()
    grads = [p.grad.numpy().copy() for p in body]
    opt.step()
    for p, b, g in zip(body, before_body, grads):
        np.testing.assert_allclose(p.numpy(), b - np.float32(0.1) * g, rtol=1e-6, atol=1e-7)
    for p, b in zip(head, before_head):
        np.testing.assert_array_equal(p.numpy(), b)
    with pytest.raises(ValueError, match="more than one"):
        optim.SGD([{"params": body}, {"params": body[:1]}], lr=0.1)


@pytest.mark.parametrize("make, fan_in", [
    (lambda: nn.Conv2d(7, 20, 3), 7 * 9),
    (lambda: nn.Conv2d(3, 40, (1, 5)), 3 * 5),
    (lambda: nn.Linear(50, 30), 50),
])
def test_default_init_lies_within_one_over_sqrt_fan_in(make, fan_in):
    mb.manual_seed(0)
    layer = make()
    bound = 1 / np.sqrt(fan_in)
    for p in (layer.weight, layer.bias):
        assert p.dtype == np.float32 and p.requires_grad
        assert np.abs(p.numpy()).max() <= bound
    w = layer.weight.numpy()
    assert np.abs(w).max() > 0.9 * bound and abs(w.mean()) < 0.2 * bound  # uniform over the range, not all tiny
    mb.manual_seed(0)
    np.testing.assert_array_equal(make().weight.numpy(), w)  # the seed decides the initial weights


def test_batch_norm_layer_defaults():
    bn = nn.BatchNorm2d(3)
    np.testing.assert_array_equal(bn.weight.numpy(), np.ones(3))
    np.testing.assert_array_equal(bn.bias.numpy(), np.zeros(3))
    np.testing.assert_array_equal(mb.to_numpy(bn._buffers["running_mean"]), np.zeros(3))
    np.testing.assert_array_equal(mb.to_numpy(bn._buffers["running_var"]), np.ones(3))
    assert bn.momentum == 0.1 and bn.eps == 1e-5


def test_batch_norm_running_stats_after_training_steps_match_reference():
    rng = np.random.default_rng(0)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(4):
        x = rng.standard_normal((5, 3, 4, 4)) * 2 + 3
        bn(mb.tensor(x.astype(np.float32)))
        _, mean, var = batch_norm_numpy(x, mean, var, np.ones(3), np.zeros(3), True, momentum=0.3)
    np.testing.assert_allclose(mb.to_numpy(bn._buffers["running_mean"]), mean, rtol=1e-5)
    np.testing.assert_allclose(mb.to_numpy(bn._buffers["running_var"]), var, rtol=1e-5)


def test_batch_norm_running_stats_match_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    ours, theirs = nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4).double()
    ours1d, theirs1d = nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4).double()
    for _ in range(5):
        x = rng.standard_normal((3, 4, 5, 2)) * 1.5 - 2
        ours(mb.tensor(x.astype(np.float32)))
        theirs(torch.from_numpy(x))
        z = rng.standard_normal((6, 4)) + 1
        ours1d(mb.tensor(z.astype(np.float32)))
        theirs1d(torch.from_numpy(z))
    for a, b in ((ours, theirs), (ours1d, theirs1d)):
        np.testing.assert_allclose(mb.to_numpy(a._buffers["running_mean"]), b.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mb.to_numpy(a._buffers["running_var"]), b.running_var.numpy(), rtol=1e-5, atol=1e-6)


def test_non_persistent_buffer_is_not_saved():
    m = nn.Module()
    m.register_buffer("kept", np.zeros(2, np.float32))
    m.register_buffer("scratch", np.zeros(2, np.float32), persistent=False)
    assert list(m.state_dict()) == ["kept"]
    assert [k for k, _ in m.named_buffers()] == ["kept", "scratch"]


def test_module_must_call_super_init():
    class Broken(nn.Module):
        def __init__(self):
            self.layer = nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="super"):
        Broken()


def test_sequential_indexing_zero_grad_and_repr():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert len(model) == 3 and isinstance(model[2], nn.Linear) and len(model[:2]) == 2
    out = model(mb.tensor(np.ones((2, 3), np.float32)))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "Linear" in repr(model) and "(2): Linear" in repr(model)
    with pytest.raises(TypeError, match="Modules"):
        nn.Sequential(nn.ReLU(), "relu")


def test_shared_module_parameters_listed_once():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert len(list(model.parameters())) == 2
