"""PyTorch as an independent oracle (float64): ops forward and backward, a whole model, SGD and StepLR.

Skipped where torch is not installed; torch is never a runtime dependency.
"""
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
TF = torch.nn.functional
torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine

import minibasis as mb  # noqa: E402
from minibasis import backend, nn, optim  # noqa: E402
from minibasis import functions as F  # noqa: E402
from reference import distinct_values, window_geometry  # noqa: E402

seeds = st.integers(0, 2 ** 31 - 1)
TOL = dict(rtol=1e-10, atol=1e-10)


def both(array):
    """The same float64 values as a minibasis leaf and a torch leaf, both requiring grad."""
    array = np.asarray(array, dtype=np.float64)
    return mb.tensor(array.copy(), requires_grad=True), torch.tensor(array, requires_grad=True)


def check_pair(ours_out, theirs_out, ours_inputs, theirs_inputs, grad_seed=0):
    """Same forward; same gradients for a random upstream gradient."""
    np.testing.assert_allclose(ours_out.data, theirs_out.detach().numpy(), **TOL)
    g = np.random.default_rng(grad_seed).standard_normal(theirs_out.shape)
    ours_out.backward(g)
    theirs_out.backward(torch.from_numpy(g))
    for i, (a, b) in enumerate(zip(ours_inputs, theirs_inputs)):
        np.testing.assert_allclose(a.grad.data, b.grad.numpy(), err_msg=f"input {i}", **TOL)


@settings(max_examples=25, deadline=None)
@given(window_geometry(max_batch=3, max_channels=3, max_out_channels=3), st.booleans())
def test_conv2d(g, bias):
    rng = np.random.default_rng(g["seed"])
    x, tx = both(rng.standard_normal((g["batch"], g["channels"], g["height"], g["width"])))
    w, tw = both(rng.standard_normal((g["out_channels"], g["channels"], g["kernel"], g["kernel"])))
    b, tb = both(rng.standard_normal(g["out_channels"])) if bias else (None, None)
    s, p = g["stride"], g["padding"]
    check_pair(F.conv2d(x, w, b, stride=s, padding=p), TF.conv2d(tx, tw, tb, stride=s, padding=p),
               [x, w] + ([b] if bias else []), [tx, tw] + ([tb] if bias else []))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), fan_in=st.integers(1, 6), fan_out=st.integers(1, 6), seed=seeds)
def test_linear(n, fan_in, fan_out, seed):
    rng = np.random.default_rng(seed)
    x, tx = both(rng.standard_normal((n, fan_in)))
    w, tw = both(rng.standard_normal((fan_out, fan_in)))
    b, tb = both(rng.standard_normal(fan_out))
    check_pair(F.linear(x, w, b), TF.linear(tx, tw, tb), [x, w, b], [tx, tw, tb])


@settings(max_examples=25, deadline=None)
@given(window_geometry(max_batch=2, max_channels=3, pooling=True), st.booleans())
def test_pooling(g, use_max):
    rng = np.random.default_rng(g["seed"])
    values = distinct_values(rng, (g["batch"], g["channels"], g["height"], g["width"]))
    x, tx = both(values)
    k, s, p = g["kernel"], g["stride"], g["padding"]
    if use_max:
        check_pair(F.max_pool2d(x, k, s, p), TF.max_pool2d(tx, k, s, p), [x], [tx])
    else:
        check_pair(F.avg_pool2d(x, k, s, p), TF.avg_pool2d(tx, k, s, p), [x], [tx])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 4), c=st.integers(1, 3), hw=st.sampled_from([None, (1, 1), (2, 3)]),
       momentum=st.sampled_from([0.1, 0.5]), seed=seeds)
def test_batch_norm_training_and_evaluation(n, c, hw, momentum, seed):
    rng = np.random.default_rng(seed)
    shape = (n, c) if hw is None else (n, c) + hw
    x_values = rng.standard_normal(shape) * 2 + 0.5
    gamma_values, beta_values = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    mean0, var0 = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    for training in (True, False):
        x, tx = both(x_values)
        gamma, tgamma = both(gamma_values)
        beta, tbeta = both(beta_values)
        rm, rv = mean0.copy(), var0.copy()
        trm, trv = torch.tensor(mean0), torch.tensor(var0)
        out = F.batch_norm(x, rm, rv, gamma, beta, training=training, momentum=momentum, eps=1e-5)
        tout = TF.batch_norm(tx, trm, trv, tgamma, tbeta, training=training, momentum=momentum, eps=1e-5)
        check_pair(out, tout, [x, gamma, beta], [tx, tgamma, tbeta], grad_seed=seed)
        np.testing.assert_allclose(rm, trm.numpy(), **TOL)
        np.testing.assert_allclose(rv, trv.numpy(), **TOL)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(2, 7), scale=st.sampled_from([1.0, 20.0]),
       reduction=st.sampled_from(["mean", "sum"]), seed=seeds)
def test_cross_entropy(n, k, scale, reduction, seed):
    rng = np.random.default_rng(seed)
    z, tz = both(rng.standard_normal((n, k)) * scale)
    labels = rng.integers(0, k, n)
    check_pair(F.cross_entropy(z, labels, reduction=reduction),
               TF.cross_entropy(tz, torch.from_numpy(labels), reduction=reduction), [z], [tz])


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), k=st.integers(1, 6), seed=seeds)
def test_log_softmax(n, k, seed):
    z, tz = both(np.random.default_rng(seed).standard_normal((n, k)))
    check_pair(F.log_softmax(z), TF.log_softmax(tz, dim=1), [z], [tz])


# ---------------------------------------------------------------------------
# A whole model: same weights, same outputs, same gradients, same running statistics
# ---------------------------------------------------------------------------
def build_models():
    ours = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 4, 3, padding=1), bn1=nn.BatchNorm2d(4), relu1=nn.ReLU(), pool1=nn.MaxPool2d(3, 2, 1),
        conv2=nn.Conv2d(4, 6, 3, stride=2, bias=False), bn2=nn.BatchNorm2d(6), relu2=nn.ReLU(),
        pool2=nn.AvgPool2d(2), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 5)))
    tnn = torch.nn
    theirs = tnn.Sequential(OrderedDict(
        conv1=tnn.Conv2d(3, 4, 3, padding=1), bn1=tnn.BatchNorm2d(4), relu1=tnn.ReLU(), pool1=tnn.MaxPool2d(3, 2, 1),
        conv2=tnn.Conv2d(4, 6, 3, stride=2, bias=False), bn2=tnn.BatchNorm2d(6), relu2=tnn.ReLU(),
        pool2=tnn.AvgPool2d(2), gap=tnn.AdaptiveAvgPool2d(1), flat=tnn.Flatten(), fc=tnn.Linear(6, 5))).double()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


def test_whole_model_training_steps_match(monkeypatch):
    monkeypatch.setattr(backend, "default_dtype", np.float64)
    ours, theirs = build_models()
    opt = optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    topt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.standard_normal((4, 3, 11, 11))
        y = rng.integers(0, 5, 4)
        opt.zero_grad()
        topt.zero_grad()
        loss = F.cross_entropy(ours(mb.tensor(x)), y)
        tloss = TF.cross_entropy(theirs(torch.from_numpy(x)), torch.from_numpy(y))
        np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-10)
        loss.backward()
        tloss.backward()
        for (name, p), tp in zip(ours.named_parameters(), theirs.parameters()):
            np.testing.assert_allclose(p.grad.data, tp.grad.numpy(), rtol=1e-8, atol=1e-10, err_msg=name)
        opt.step()
        topt.step()
    theirs_state = theirs.state_dict()
    for key, value in ours.state_dict().items():
        np.testing.assert_allclose(value, theirs_state[key].numpy(), rtol=1e-8, atol=1e-10, err_msg=key)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal((2, 3, 11, 11))
    np.testing.assert_allclose(ours(mb.tensor(x)).data, theirs(torch.from_numpy(x)).detach().numpy(), rtol=1e-8)


# ---------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(lr=st.sampled_from([0.01, 0.3]), momentum=st.sampled_from([0.0, 0.9]), nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.01]), dampening=st.sampled_from([0.0, 0.2]), seed=seeds)
def test_sgd_against_torch(lr, momentum, nesterov, weight_decay, dampening, seed):
    if nesterov and (momentum == 0 or dampening != 0):
        return
    rng = np.random.default_rng(seed)
    starts = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ours = [nn.Parameter(s.copy()) for s in starts]
    theirs = [torch.tensor(s, requires_grad=True) for s in starts]
    config = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, dampening=dampening)
    # two groups, the second with its own learning rate
    opt = optim.SGD([{"params": ours[:1]}, {"params": ours[1:], "lr": lr / 3}], **config)
    topt = torch.optim.SGD([{"params": theirs[:1]}, {"params": theirs[1:], "lr": lr / 3}], **config)
    for _ in range(5):
        for p, tp in zip(ours, theirs):
            g = rng.standard_normal(p.shape)
            p.grad = mb.tensor(g.copy())
            tp.grad = torch.from_numpy(g)
        opt.step()
        topt.step()
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("step_size, gamma", [(1, 0.5), (3, 0.1), (5, 0.7)])
def test_step_lr_against_torch(step_size, gamma):
    ours = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.4)
    theirs = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = optim.StepLR(ours, step_size=step_size, gamma=gamma)
    tsched = torch.optim.lr_scheduler.StepLR(theirs, step_size=step_size, gamma=gamma)
    for _ in range(12):
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12)
        theirs.step()
        sched.step()
        tsched.step()
