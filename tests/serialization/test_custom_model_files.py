"""A model class of the user's saves and reloads: save_model(model, path, architecture=TheClass)."""
import numpy as np
import pytest

import minibasis as mb
from minibasis import nn
from minibasis.models.registry import MODELS


class TinyCustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(mb.functions.relu(self.conv(x)).reshape(x.shape[0], -1))


def test_a_model_class_saves_and_reloads_with_the_same_logits(tmp_path):
    model = TinyCustomNet()
    x = mb.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    path = tmp_path / "custom.npz"
    try:
        mb.save_model(model, path, architecture=TinyCustomNet)
        loaded, _ = mb.load_model(path)
    finally:
        MODELS.pop("TinyCustomNet", None)
    assert type(loaded) is TinyCustomNet
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_a_custom_model_without_architecture_is_refused_naming_the_ways_to_save_it(tmp_path):
    with pytest.raises(ValueError, match="architecture=YourModelClass.*register_model"):
        mb.save_model(TinyCustomNet(), tmp_path / "custom.npz")
    assert not list(tmp_path.iterdir())


def test_a_name_registered_for_another_constructor_is_refused(tmp_path):
    def TinyCustomNet_():  # noqa: N802 (a factory named like a class)
        return TinyCustomNet()
    TinyCustomNet_.__name__ = "resnet_cifar"
    with pytest.raises(ValueError, match="already registered"):
        mb.save_model(TinyCustomNet(), tmp_path / "custom.npz", architecture=TinyCustomNet_)
