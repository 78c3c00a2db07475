"""nn.Module's public surgery and observation API: get/set_submodule, forward hooks, empty parameter slots."""
import numpy as np
import pytest

import minibasis
from minibasis import nn


def _net():
    minibasis.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Flatten())


def test_get_submodule_walks_dotted_paths_and_names_the_missing_child():
    net = _net()
    assert net.get_submodule("") is net
    assert isinstance(net.get_submodule("2.1"), nn.BatchNorm2d)
    assert isinstance(net.get_submodule("2.0"), nn.Conv2d)
    with pytest.raises(AttributeError, match=r"has no submodule 'x'.*children: \['0', '1'\]"):
        net.get_submodule("2.x")


def test_set_submodule_keeps_position_and_state_dict_order():
    net = _net()
    keys_before = list(net.state_dict())
    replacement = nn.Conv2d(4, 4, 1)
    net.set_submodule("2.0", replacement)
    assert net.get_submodule("2.0") is replacement
    assert [name for name, _ in net.get_submodule("2").named_children()] == ["0", "1"]
    assert list(net.state_dict()) == keys_before  # same keys, same order
    with pytest.raises(AttributeError, match="no submodule '7'"):
        net.set_submodule("2.7", replacement)
    with pytest.raises(TypeError, match="must be a Module"):
        net.set_submodule("2.0", "conv")


def test_forward_hooks_observe_replace_and_are_removable():
    net = _net()
    x = minibasis.tensor(np.random.default_rng(0).random((2, 3, 5, 5), dtype=np.float32))
    seen = []
    handle = net.get_submodule("0").register_forward_hook(lambda m, args, out: seen.append(out.shape))
    reference = net(x).data.copy()
    assert seen == [(2, 4, 5, 5)]
    # a pre-hook that replaces the input, and a hook that replaces the output
    pre = net.get_submodule("1").register_forward_pre_hook(lambda m, args: args[0] * 0.0)
    out = net(x)
    pre.remove()
    assert np.all(out.data[:, :] == net.get_submodule("3")(net.get_submodule("2")(
        minibasis.tensor(np.zeros((2, 4, 5, 5), np.float32)))).data)
    handle.remove()
    net(x)
    assert len(seen) == 2  # removed hook no longer runs
    with net.get_submodule("3").register_forward_hook(lambda m, a, o: o * 2.0):
        np.testing.assert_array_equal(net(x).data, 2.0 * reference)
    np.testing.assert_array_equal(net(x).data, reference)
    with pytest.raises(TypeError, match="callable"):
        net.register_forward_hook(3)


def test_hooks_run_under_the_multiplication_counter_too():
    net = _net()
    calls = []
    net.get_submodule("2.0").register_forward_hook(lambda m, a, o: calls.append(1))
    with minibasis.count_mults():
        net(minibasis.tensor(np.ones((1, 3, 4, 4), np.float32)))
    assert calls == [1]


def test_register_parameter_none_declares_an_empty_slot():
    m = nn.Module()
    m.register_parameter("scale", None)
    assert list(m.state_dict()) == [] and list(m.parameters()) == []
    m.scale = nn.Parameter(np.ones(3, np.float32))
    assert list(m.state_dict()) == ["scale"]
    with pytest.raises(TypeError, match="Parameter or None"):
        m.register_parameter("w", np.ones(3))
    with pytest.raises(ValueError, match="no '.'"):
        m.register_parameter("a.b", None)
