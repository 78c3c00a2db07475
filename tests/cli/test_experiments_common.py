"""experiments.common: the progress bar and batched evaluation."""
import io

import numpy as np
import pytest

import minibasis as mb
from minibasis import nn
from minibasis.training import ProgressBar, evaluate, format_duration


def test_progress_bar_log_lines():
    stream = io.StringIO()  # not a terminal: whole lines, the final one on close()
    bar = ProgressBar(10, desc="eval", stream=stream, log_interval=0.0)
    bar.update(4, acc=0.5)
    bar.update(6, acc=0.75)
    bar.close()
    bar.close()  # idempotent
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("eval [") and "4/10" in lines[0] and "ETA" in lines[0] and "acc=0.5" in lines[0]
    assert "10/10 100%" in lines[-1] and "img/s" in lines[-1] and " in " in lines[-1] and "acc=0.75" in lines[-1]
    assert len(lines) == 2  # no separate "100%, ETA 0:00" line before the final one
    assert bar.done == 10


def test_disabled_bar_is_silent_but_counts():
    stream = io.StringIO()
    with ProgressBar(3, stream=stream, enabled=False) as bar:
        bar.update(3)
    assert stream.getvalue() == "" and bar.done == 3 and bar.elapsed >= 0


def test_progress_bar_rejects_bad_total():
    with pytest.raises(ValueError, match="total"):
        ProgressBar(-1)


def test_format_duration():
    assert format_duration(75.2) == "1:15"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("inf")) == "?"


class _Linear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data = mb.backend.asarray(weight)

    def forward(self, x):
        return self.fc(mb.functions.flatten(x))


def test_evaluate_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(23, 1, 2, 2), dtype=np.uint8)
    labels = rng.integers(0, 3, size=23)
    weight = rng.standard_normal((3, 4)).astype(np.float32)
    model = _Linear(weight).train()

    def scale(batch):
        return batch.astype(np.float32) / 255.0

    result = evaluate(model, images, labels, batch_size=5, transform=scale, progress=False, return_logits=True)
    expected_logits = (images.reshape(23, 4).astype(np.float32) / 255.0) @ weight.T
    np.testing.assert_allclose(result.logits, expected_logits, rtol=1e-6, atol=1e-6)
    expected_correct = int((expected_logits.argmax(axis=1) == labels).sum())
    assert (result.correct, result.total) == (expected_correct, 23)
    assert result.accuracy == pytest.approx(expected_correct / 23)
    z = expected_logits.astype(np.float64)
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    assert result.loss == pytest.approx(-log_p[np.arange(23), labels].mean(), rel=1e-6)
    assert model.training  # the mode is put back


@pytest.mark.parametrize("labels, message", [
    (np.zeros(5, dtype=np.int64), "labels must be integers of shape"),
    (np.zeros(4, dtype=np.float32), "labels must be integers"),
    (np.array([0, 1, 2, 3]), "labels must lie in"),
])
def test_evaluate_rejects_bad_labels(labels, message):
    model = _Linear(np.ones((3, 4), np.float32))
    images = np.zeros((4, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=message):
        evaluate(model, images, labels, progress=False)


def test_evaluate_needs_floating_input():
    model = _Linear(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="floating"):
        evaluate(model, np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 1]), progress=False)
