"""Adam, AdamW and the lr_scheduler namespace: PyTorch's update rules and lr sequences, and exact resume.

PyTorch (optional) is the oracle: the same float64 parameters and gradients go through both
optimizers step by step. Resuming is checked bit for bit against an uninterrupted run, through
the files a training checkpoint writes.
"""
import math

import numpy as np
import pytest

import minibasis as mb
from minibasis import io, nn, optim
from minibasis.data import DataLoader, ToFloat, synthetic
from minibasis.training import Trainer, load_checkpoint

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

ADAM_CONFIGS = {
    "defaults": {},
    "weight_decay": dict(lr=0.01, weight_decay=0.1),
    "betas_eps": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6),
    "amsgrad": dict(lr=0.02, amsgrad=True, weight_decay=0.05),
}


def _params(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 2)), rng.standard_normal(4)]


def _run(kind, config, steps, seed=0, compare=False):
    """``steps`` steps of minibasis and torch on the same float64 parameters and gradients, in
    two parameter groups (the second with its own lr); with ``compare``, checked after each step."""
    starts = _params(seed)
    ours = [nn.Parameter(s.copy()) for s in starts]
    theirs = [torch.tensor(s, requires_grad=True) for s in starts]
    lr = config.get("lr", 1e-3)
    opt = getattr(optim, kind)([{"params": ours[:1]}, {"params": ours[1:], "lr": lr / 3}], **config)
    topt = getattr(torch.optim, kind)([{"params": theirs[:1]}, {"params": theirs[1:], "lr": lr / 3}], **config)
    rng = np.random.default_rng(seed + 100)
    for step in range(steps):
        for p, tp in zip(ours, theirs):
            g = rng.standard_normal(p.shape) * (10.0 if step % 2 else 0.1)  # changing scales: the moments matter
            p.grad = mb.tensor(g.copy())
            tp.grad = torch.from_numpy(g)
        opt.step()
        topt.step()
        for i, (p, tp) in enumerate(zip(ours, theirs) if compare else ()):
            np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14,
                                       err_msg=f"{kind} {config}: parameter {i} after step {step + 1}")
            tstate = topt.state[tp]
            np.testing.assert_allclose(opt.state[id(p)]["exp_avg_sq"], tstate["exp_avg_sq"].numpy(), rtol=1e-12)
            assert opt.state[id(p)]["step"] == int(tstate["step"])
    return ours, opt


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("name", ADAM_CONFIGS)
def test_adam_matches_torch_step_by_step(kind, name):
    _run(kind, ADAM_CONFIGS[name], 6, seed=1, compare=True)


def test_adamw_decays_weights_apart_from_the_gradient():
    # With a zero gradient Adam's L2 term still moves p through the moments; AdamW only shrinks it.
    p = nn.Parameter(np.array([2.0]))
    opt = optim.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = mb.tensor(np.array([0.0]))
    opt.step()
    assert p.data[0] == 2.0 * (1 - 0.1 * 0.5)


def test_adam_skips_frozen_parameters_and_those_without_gradients():
    a, b, c = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    b.requires_grad_(False)
    opt = optim.Adam([a, b, c], lr=0.1)
    for p in (a, b):
        p.grad = mb.tensor(np.ones(2))
    opt.step()
    assert a.data[0] != 1.0 and b.data[0] == 1.0 and c.data[0] == 1.0
    assert set(opt.state) == {id(a)}


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(lr=-1.0), ValueError, "Adam needs a finite lr ≥ 0"),
    (dict(betas=(0.9, 1.0)), ValueError, r"finite betas\[1\] in \[0, 1\)"),
    (dict(betas=0.9), TypeError, "betas must be a pair"),
    (dict(eps="1e-8"), TypeError, "eps must be a real number"),
    (dict(amsgrad=1), TypeError, "amsgrad must be a bool"),
])
def test_adam_options_are_checked(kwargs, error, text):
    with pytest.raises(error, match=text):
        optim.Adam([nn.Parameter(np.zeros(1))], **kwargs)


@pytest.mark.parametrize("kind, config", [("Adam", ADAM_CONFIGS["amsgrad"]), ("AdamW", ADAM_CONFIGS["weight_decay"]),
                                          ("SGD", dict(lr=0.1, momentum=0.9))])
def test_optimizer_state_round_trips_through_a_checkpoint_file_exactly(tmp_path, kind, config):
    straight, _ = _run(kind, config, 6)
    first, opt = _run(kind, config, 3)
    io.save({"optimizer": opt.state_dict()}, tmp_path / "state.npz")
    # a new process would build fresh parameters and a fresh optimizer, then load
    params = [nn.Parameter(p.data.copy()) for p in first]
    fresh = getattr(optim, kind)([{"params": params[:1]}, {"params": params[1:], "lr": config["lr"] / 3}], **config)
    fresh.load_state_dict(io.load(tmp_path / "state.npz")["optimizer"])
    rng = np.random.default_rng(100)  # _run's gradients: steps 1-3 drawn and dropped, then 4-6
    for step in range(6):
        grads = [rng.standard_normal(p.shape) * (10.0 if step % 2 else 0.1) for p in params]
        if step >= 3:
            for p, g in zip(params, grads):
                p.grad = mb.tensor(g)
            fresh.step()
    for a, b in zip(straight, params):
        assert np.array_equal(a.data, b.data)


# ---------------------------------------------------------------------------
# lr_scheduler
# ---------------------------------------------------------------------------
SCHEDULES = {
    "StepLR": (dict(step_size=3, gamma=0.5), dict(step_size=3, gamma=0.5)),
    "MultiStepLR": (dict(milestones=[2, 5, 9], gamma=0.1), dict(milestones=[2, 5, 9], gamma=0.1)),
    "MultiStepLR repeated": (dict(milestones=[6, 3, 3], gamma=0.5), dict(milestones=[6, 3, 3], gamma=0.5)),
    "CosineAnnealingLR": (dict(T_max=5), dict(T_max=5)),
    "CosineAnnealingLR eta_min": (dict(T_max=4, eta_min=0.01), dict(T_max=4, eta_min=0.01)),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_torch_lr_sequence(name):
    kind = name.split()[0]
    ours_kwargs, theirs_kwargs = SCHEDULES[name]
    ours = optim.SGD([{"params": [nn.Parameter(np.zeros(1))]}, {"params": [nn.Parameter(np.zeros(1))], "lr": 0.03}],
                     lr=0.4, momentum=0.9)
    theirs = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                              {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.03}], lr=0.4, momentum=0.9)
    sched = getattr(optim.lr_scheduler, kind)(ours, **ours_kwargs)
    tsched = getattr(torch.optim.lr_scheduler, kind)(theirs, **theirs_kwargs)
    seen = []
    for epoch in range(14):  # past T_max and every milestone
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12, atol=1e-15,
                                   err_msg=f"epoch {epoch}")
        seen.append(sched.get_last_lr()[0])
        theirs.step()
        sched.step()
        tsched.step()
    assert len(set(seen)) > 2  # the schedule really changed the lr


def test_step_lr_keeps_its_short_name():
    assert optim.StepLR is optim.lr_scheduler.StepLR


def test_cosine_closed_form():
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=1.0)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.2)
    lrs = []
    for _ in range(4):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.2 + 0.8 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, 5)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-15)
    assert lrs[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("make, text", [
    (lambda o: optim.lr_scheduler.MultiStepLR(o, milestones=[2, -1]), "ints ≥ 0"),
    (lambda o: optim.lr_scheduler.MultiStepLR(o, milestones=3), "list of epochs"),
    (lambda o: optim.lr_scheduler.CosineAnnealingLR(o, T_max=0), "T_max must be an int ≥ 1"),
    (lambda o: optim.lr_scheduler.StepLR(o, step_size=2, gamma=0), "gamma must be a finite number > 0"),
])
def test_schedule_settings_are_checked(make, text):
    with pytest.raises((ValueError, TypeError), match=text):
        make(optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1))


def test_schedule_state_round_trips_and_old_step_lr_states_load(tmp_path):
    opt = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    sched = optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 3], gamma=0.5)
    for _ in range(2):
        sched.step()
    io.save({"scheduler": sched.state_dict()}, tmp_path / "s.npz")
    other = optim.lr_scheduler.MultiStepLR(optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1), milestones=[7], gamma=0.9)
    other.load_state_dict(io.load(tmp_path / "s.npz")["scheduler"])
    assert (other.milestones, other.gamma, other.last_epoch, other.base_lrs) == ([1, 3], 0.5, 2, [0.1])
    # the layout StepLR checkpoints have always had
    step = optim.StepLR(opt, step_size=9)
    step.load_state_dict({"step_size": 2, "gamma": 0.5, "base_lrs": [0.4], "last_epoch": 3})
    step.step()
    assert opt.param_groups[0]["lr"] == 0.4 * 0.5 ** 2
    with pytest.raises(KeyError, match="missing keys"):
        step.load_state_dict({"gamma": 0.5})


# ---------------------------------------------------------------------------
# Adam + a cosine schedule through the trainer's checkpoints
# ---------------------------------------------------------------------------
def _adam_run(folder, epochs=4, resume=False, naive=False):
    mb.manual_seed(3)
    (x, y), _ = synthetic(num_train=32, num_test=0, image_size=16, seed=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    optimizer = optim.AdamW(model.parameters(), lr=0.01, amsgrad=True)
    scheduler = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=1e-4)
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=2, transform=ToFloat())
    run = Trainer(model, optimizer, loader, epochs=epochs, scheduler=scheduler, folder=folder, seed=4, progress=False)
    if naive:  # the weights alone: fresh moments and schedule
        model.load_state_dict(load_checkpoint(run.checkpoint_path)["model"])
        run.epoch = 2
        loader.set_epoch(2)
    run.fit(resume=resume)
    return {k: mb.to_numpy(v).copy() for k, v in model.state_dict().items()}, optimizer.param_groups[0]["lr"]


def test_adam_and_cosine_schedule_resume_exactly_from_a_trainer_checkpoint(tmp_path):
    straight, lr = _adam_run(tmp_path / "a")
    _adam_run(tmp_path / "b", epochs=2)  # stops after epoch 2, as an interrupted run would
    assert load_checkpoint(tmp_path / "b" / "checkpoint-train.npz")["optimizer"]["state"][0]["step"] == 4
    resumed, resumed_lr = _adam_run(tmp_path / "b", resume=True)
    assert resumed_lr == lr
    for key in straight:
        assert np.array_equal(straight[key], resumed[key]), key
    _adam_run(tmp_path / "c", epochs=2)
    naive, _ = _adam_run(tmp_path / "c", naive=True)
    assert not all(np.array_equal(straight[k], naive[k]) for k in straight)  # so the check above can fail
