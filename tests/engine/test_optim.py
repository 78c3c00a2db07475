"""SGD and StepLR against the documented update rules (tests/reference.py), and their saved state."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minibasis as mb
from minibasis import nn, optim
from reference import sgd_reference

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)

configs = st.fixed_dictionaries(dict(
    lr=st.sampled_from([0.01, 0.1, 0.5]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
    nesterov=st.booleans(),
    dampening=st.sampled_from([0.0, 0.3]),
))


def parameter(values, requires_grad=True):
    """A Parameter on the backend under test (host values copied over)."""
    return nn.Parameter(mb.tensor(values), requires_grad=requires_grad)


def set_grad(p, g):
    p.grad = parameter(np.asarray(g, dtype=p.dtype), requires_grad=False)


@settings(max_examples=40, deadline=None)
@given(config=configs, seed=st.integers(0, 2 ** 31 - 1))
def test_sgd_matches_the_reference_rule_over_several_steps(config, seed):
    if config["nesterov"] and (config["momentum"] == 0 or config["dampening"] != 0):
        return  # invalid combination, tested below
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((3, 2))
    grads = [rng.standard_normal((3, 2)) for _ in range(5)]
    p = parameter(start.copy())
    opt = optim.SGD([p], **config)
    for g in grads:
        set_grad(p, g)
        opt.step()
    np.testing.assert_allclose(p.numpy(), sgd_reference(start, grads, **config), rtol=1e-12, atol=1e-12)


def test_sgd_single_step_by_hand():
    p = parameter(np.array([1.0, -2.0]))
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    set_grad(p, [0.2, 0.4])
    opt.step()  # d = g + 0.5 p = [0.7, -0.6]; buf = d; p -= 0.1 d
    np.testing.assert_allclose(p.numpy(), [0.93, -1.94])
    set_grad(p, [0.0, 0.0])
    opt.step()  # d = 0.5 p = [0.465, -0.97]; buf = 0.9 [0.7, -0.6] + d = [1.095, -1.51]
    np.testing.assert_allclose(p.numpy(), [0.93 - 0.1095, -1.94 + 0.151])


def test_sgd_skips_params_without_grad_and_zero_grad_clears():
    a, b = parameter(np.ones(2)), parameter(np.ones(2))
    opt = optim.SGD([a, b], lr=1.0, weight_decay=1.0)
    set_grad(a, [1.0, 1.0])
    opt.step()
    np.testing.assert_array_equal(a.numpy(), [-1.0, -1.0])
    np.testing.assert_array_equal(b.numpy(), [1.0, 1.0])  # no gradient: no weight decay either
    opt.zero_grad()
    assert a.grad is None


def test_sgd_state_dict_resumes_exactly():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(4) for _ in range(6)]
    config = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    p = parameter(np.zeros(4))
    opt = optim.SGD([p], **config)
    for g in grads[:3]:
        set_grad(p, g)
        opt.step()
    saved, saved_p = opt.state_dict(), p.numpy().copy()
    for g in grads[3:]:
        set_grad(p, g)
        opt.step()
    q = parameter(saved_p)
    resumed = optim.SGD([q], lr=1.0)  # hyper-parameters come from the saved state
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 0.1 and resumed.param_groups[0]["nesterov"] is True
    for g in grads[3:]:
        set_grad(q, g)
        resumed.step()
    np.testing.assert_array_equal(q.numpy(), p.numpy())


def test_sgd_load_state_dict_rejects_a_different_layout():
    opt = optim.SGD([parameter(np.zeros(2))], lr=0.1)
    other = optim.SGD([parameter(np.zeros(2)), parameter(np.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="groups"):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=0.1, momentum=-1.0), "momentum"),
    (dict(lr=0.1, nesterov=True), "Nesterov"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
])
def test_sgd_rejects_bad_hyper_parameters(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        optim.SGD([parameter(np.zeros(2))], **kwargs)


def test_sgd_rejects_bad_params():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="Parameter"):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer options"):
        optim.SGD([{"params": [parameter(np.zeros(2))], "learning_rate": 0.1}], lr=0.1)


@pytest.mark.parametrize("step_size, gamma", [(1, 0.5), (3, 0.1), (4, 0.2)])
def test_step_lr_schedule(step_size, gamma):
    opt = optim.SGD([{"params": [parameter(np.zeros(1))]},
                     {"params": [parameter(np.zeros(1))], "lr": 2.0}], lr=1.0)
    sched = optim.StepLR(opt, step_size=step_size, gamma=gamma)
    seen = []
    for epoch in range(10):
        seen.append(sched.get_last_lr())
        sched.step()
    # epoch e uses base · γ^⌊e / step_size⌋
    for epoch, lrs in enumerate(seen):
        decays = epoch // step_size
        np.testing.assert_allclose(lrs, [1.0 * gamma ** decays, 2.0 * gamma ** decays], rtol=1e-12)


def test_step_lr_state_dict_round_trip():
    opt = optim.SGD([parameter(np.zeros(1))], lr=1.0)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        sched.step()
    state = sched.state_dict()
    opt2 = optim.SGD([parameter(np.zeros(1))], lr=1.0)
    sched2 = optim.StepLR(opt2, step_size=7, gamma=0.9)
    sched2.load_state_dict(state)
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.25]
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(opt, step_size=0)
