"""Learning for real: a small CNN trained with the engine generalizes on a procedural image task.

The dataset (minibasis.data.synthetic) hides the class in oriented/periodic
structure at a random position, colour and phase, so only a network whose
convolutions, batch norm, pooling, autograd and optimizer all work reaches high
held-out accuracy. Early stopping looks at a validation split, never at the
test split that the assertion uses.
"""
import time

import numpy as np
import pytest

import minibasis as mb
from minibasis import functions as F
from minibasis import nn, optim

pytestmark = pytest.mark.engine  # runs on --backend (tests/conftest.py)

NUM_CLASSES, IMAGE_SIZE = 8, 16


def dataset():
    from minibasis.data import synthetic

    (x_train, y_train), (x_test, y_test) = synthetic(num_train=3500, num_test=1000, num_classes=NUM_CLASSES,
                                                     image_size=IMAGE_SIZE, seed=0)
    return (x_train[:3000], y_train[:3000]), (x_train[3000:], y_train[3000:]), (x_test, y_test)


def prepare(images):
    """uint8 (N, 3, S, S) → float32, each channel of each image centred (the background colour carries no class)."""
    x = images.astype(np.float32) / 255.0
    return (x - x.mean(axis=(2, 3), keepdims=True)) / 0.1


def small_cnn(width=8):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (IMAGE_SIZE // 4) ** 2, NUM_CLASSES))


def accuracy(model, x, y):
    model.eval()
    with mb.no_grad():
        predictions = np.concatenate([model(mb.tensor(x[i:i + 500])).numpy().argmax(axis=1)
                                      for i in range(0, len(x), 500)])
    model.train()
    return float((predictions == y).mean())


def test_small_cnn_learns_the_synthetic_task():
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = dataset()
    assert len(np.unique(y_test)) == NUM_CLASSES
    x_train, x_val, x_test = prepare(x_train), prepare(x_val), prepare(x_test)
    mb.manual_seed(0)
    model = small_cnn()
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    chance = accuracy(model, x_test, y_test)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    batch = 64
    for epoch in range(5):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - batch + 1, batch):
            index = order[i:i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(mb.tensor(x_train[index])), y_train[index])
            loss.backward()
            opt.step()
        if accuracy(model, x_val, y_val) >= 0.98:
            break
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, x_test, y_test)
    print(f"\nsynthetic {NUM_CLASSES} classes {IMAGE_SIZE}x{IMAGE_SIZE}: test accuracy {test_accuracy:.3f} "
          f"after {epoch + 1} epochs, {seconds:.1f} s of training (untrained: {chance:.3f})")
    assert chance < 0.3
    assert test_accuracy >= 0.95, f"held-out accuracy {test_accuracy:.3f} after {epoch + 1} epochs"
