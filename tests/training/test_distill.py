"""Distillation in the paper's fine-tuning: the soft-target KL op, the loss, and what the teacher may do.

The loss is (1 − w)·CE + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)); the teacher runs in
eval mode under no_grad, never changes, and its multiplications are counted apart.
"""
from __future__ import annotations

import numpy as np
import pytest

import minibasis
from minibasis import functions as F, nn
from minibasis.autograd import tensor
from minibasis.compress import copy_module
from minibasis.data import DataLoader, ToFloat, synthetic
from minibasis.training import fine_tune
from minibasis.training.distill import Distillation


def _state(model) -> dict:
    return {k: minibasis.to_numpy(v).copy() for k, v in model.state_dict().items()}


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_soft_target_kl_gradcheck_float64(temperature):
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((5, 7)) * 3, rng.standard_normal((5, 7)) * 3
    assert minibasis.gradcheck(lambda z: F.soft_target_kl(z, targets, temperature).reshape((1,)), [logits])


def test_soft_target_kl_forward_is_the_written_out_divergence():
    rng = np.random.default_rng(1)
    z, t, temperature = rng.standard_normal((4, 6)), rng.standard_normal((4, 6)), 3.0
    p, q = _softmax(t / temperature), _softmax(z / temperature)
    expected = sum(p[n, k] * np.log(p[n, k] / q[n, k]) for n in range(4) for k in range(6)) / 4
    assert float(F.soft_target_kl(tensor(z), t, temperature).data) == pytest.approx(expected, rel=1e-12)
    assert float(F.soft_target_kl(tensor(z), z, temperature).data) == pytest.approx(0.0, abs=1e-15)


def test_distillation_loss_and_gradient_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    z, t = rng.standard_normal((8, 10)) * 2, rng.standard_normal((8, 10)) * 2
    y = rng.integers(0, 10, size=8)
    w, temperature = 0.7, 4.0

    class Constant(nn.Module):   # a "teacher" whose logits are t, whatever the input
        def forward(self, x):
            return tensor(t)

    student = tensor(z, requires_grad=True)
    loss = Distillation(Constant(), w, temperature)(student, y, tensor(np.zeros((8, 1))))
    loss.backward()

    zt = torch.tensor(z, requires_grad=True)
    kl = torch.nn.functional.kl_div(torch.log_softmax(zt / temperature, dim=1),
                                    torch.softmax(torch.tensor(t) / temperature, dim=1), reduction="batchmean")
    reference = (1 - w) * torch.nn.functional.cross_entropy(zt, torch.tensor(y)) + w * temperature ** 2 * kl
    reference.backward()
    assert float(loss.data) == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(student.grad.data, zt.grad.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(distill_weight=0.5), "needs a teacher"),
    (dict(teacher="self", distill_weight=0.5), "separate model"),
    (dict(teacher="other", distill_weight=1.5), "distill_weight must be in"),
    (dict(teacher="other", distill_weight=0.5, temperature=0.0), "temperature must be a positive"),
])
def test_bad_distillation_settings_are_refused(kwargs, fragment):
    model = minibasis.compress(_net(), energy_threshold=0.7, input_shape=(1, 3, 16, 16))[0]
    teacher = {"self": model, "other": _net()}.get(kwargs.pop("teacher", None))
    loader = DataLoader(synthetic(num_train=8, num_test=0, image_size=16, seed=1)[0], batch_size=4, transform=ToFloat())
    with pytest.raises(ValueError, match=fragment):
        fine_tune(model, loader, epochs1=1, epochs2=0, progress=False, teacher=teacher, **kwargs)


# ---------------------------------------------------------------------------
# in fine_tune
# ---------------------------------------------------------------------------
def _run(teacher=None, count=False, **kwargs):
    """Compress a seeded net, fine-tune it one epoch per step on 32 synthetic images."""
    minibasis.manual_seed(3)
    original = _net()
    student, _ = minibasis.compress(original, energy_threshold=0.7, layers=["3"], input_shape=(1, 3, 16, 16))
    (x, y), _ = synthetic(num_train=32, num_test=0, image_size=16, seed=1)
    loader = DataLoader((x, y), batch_size=16, shuffle=True, seed=0, transform=ToFloat())
    teacher = copy_module(original) if teacher == "original" else teacher
    with minibasis.count_mults() as counter:
        history = fine_tune(student, loader, epochs1=1, lr1=0.1, epochs2=1, lr2=0.05, progress=False,
                            teacher=teacher, **kwargs)
    return student, history, counter, teacher


def _without_timing(history):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in history]


def test_weight_zero_or_no_teacher_is_bit_identical_to_plain_fine_tune():
    plain, plain_history, _, _ = _run()
    zero, zero_history, _, _ = _run(teacher="original", distill_weight=0.0)
    distilled, _, _, _ = _run(teacher="original", distill_weight=0.5)
    for key, value in _state(plain).items():
        assert np.array_equal(value, _state(zero)[key]), key
    assert _without_timing(plain_history) == _without_timing(zero_history)
    assert "teacher_mults" not in plain_history[0]
    # ... while a positive weight does change the run (so the comparison above can fail).
    assert any(not np.array_equal(v, _state(distilled)[k]) for k, v in _state(plain).items())


def test_the_teacher_is_unchanged_and_its_mode_restored():
    minibasis.manual_seed(5)
    teacher = _net()
    teacher.train()   # BatchNorm in train mode would update its running statistics if it ran so
    before = _state(teacher)
    _run(teacher=teacher, distill_weight=0.5, temperature=2.0)
    after = _state(teacher)
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    assert all(m.training for m in teacher.modules())
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teachers_multiplications_are_counted_apart():
    _, plain_history, plain, _ = _run()
    _, history, distilled, teacher = _run(teacher="original", distill_weight=0.5)
    # The student's convolutions are the same work either way: not one teacher product among them.
    assert distilled.conv == plain.conv > 0
    assert "conv2d" in distilled.by_op
    # The teacher's own count: per epoch, two batches of 16 through the teacher in eval mode.
    teacher.eval()
    with minibasis.count_mults() as one_batch, minibasis.autograd.no_grad():
        teacher(tensor(np.zeros((16, 3, 16, 16), dtype=np.float32)))
    assert [row["teacher_mults"] for row in history] == [2 * one_batch.total] * 2
    # What the student's counter gained is the soft loss's own products (a few per logit), far
    # less than one teacher pass.
    assert 0 < distilled.total - plain.total < one_batch.total
