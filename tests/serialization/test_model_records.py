"""One model-file record for model files and training checkpoints: every zoo architecture (and a
registered custom one) reloads from both with all its constructor arguments, through
``load_model`` and through the verbs; files in the layout written before the record keep loading.

Each round trip compares the reloaded model's logits bit for bit with the live model that was
saved (the reference is the model in memory, not anything read back from the file).
"""
import json

import numpy as np
import pytest

import minibasis
from minibasis import models, nn
from minibasis.cli import main
from minibasis.model_files import MODEL_FORMAT, ModelFileError, basis_layout, checkpoint_meta
from minibasis.serialization import save
from minibasis.training import save_checkpoint


class TinyNet(nn.Module):
    """A model the zoo does not know: registered under a name by the user."""

    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.conv(x)).reshape(x.shape[0], -1))


@pytest.fixture
def tinynet_registered():
    models.register_model("tinynet", TinyNet)
    yield
    models.MODELS.pop("tinynet", None)


def _compressed_resnet8():
    return minibasis.compress(models.resnet_cifar(8, num_classes=10), energy_threshold=0.8)[0]


#: label → a model with non-default constructor arguments wherever the constructor has some.
ZOO = {
    "table3_cnn": lambda: models.table3_cnn(num_classes=7),
    "table3_cnn basis": lambda: models.table3_cnn(basis=True, seed=5),
    "alexnet": lambda: models.alexnet(num_classes=7),
    "vgg11": lambda: models.get_model("vgg", depth=11, num_classes=7),
    "vgg16_bn": lambda: models.get_model("vgg16_bn"),
    "resnet8 B": lambda: models.resnet_cifar(8, num_classes=7, shortcut="B"),
    "resnet8 compressed": _compressed_resnet8,
    "densenet_bc": lambda: models.densenet_bc(depth=10, growth_rate=4, num_classes=7),
    "mobilenet_v2": lambda: models.mobilenet_v2(num_classes=7),
    "demo_cnn": lambda: models.demo_cnn(num_classes=7, widths=[4, 8, 8]),
    "custom": lambda: models.get_model("tinynet", num_classes=7, width=6),
}


def _images(count=2):
    return np.random.default_rng(0).random((count, 3, 32, 32)).astype(np.float32)


def _logits(model):
    model.eval()
    with minibasis.no_grad():
        return minibasis.to_numpy(model(minibasis.tensor(_images())).data)


def _perturb_batch_norms(model):
    """Give running statistics non-default values, so a layer that lost them would show."""
    rng = np.random.default_rng(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
            module.running_mean[...] = rng.standard_normal(module.running_mean.shape) * 0.1
    return model


def _write(kind, model, path):
    if kind == "model file":
        minibasis.save_model(model, path, normalization="cifar10", dataset="synthetic")
    else:
        save_checkpoint(path, model=model, meta={**checkpoint_meta(model, normalization="cifar10",
                                                                   dataset="synthetic"),
                                                 "stage": "train", "epoch": 1})


@pytest.mark.parametrize("kind", ["model file", "training checkpoint"])
@pytest.mark.parametrize("label", list(ZOO))
def test_every_zoo_architecture_reloads_from_both_file_kinds(label, kind, tmp_path, tinynet_registered):
    minibasis.manual_seed(3)
    model = _perturb_batch_norms(ZOO[label]())
    path = tmp_path / "saved.npz"
    _write(kind, model, path)
    loaded, meta = minibasis.load_model(path)
    assert meta.format == MODEL_FORMAT
    assert json.dumps(loaded.architecture, sort_keys=True) == json.dumps(
        {"name": model.architecture["name"],
         "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in model.architecture["kwargs"].items()}},
        sort_keys=True)
    assert basis_layout(loaded) == basis_layout(model)
    assert meta.normalization == "cifar10" and meta.dataset == "synthetic"
    assert np.array_equal(_logits(loaded), _logits(model)), label


def test_table3_basis_twin_checkpoint_comes_back_as_the_twin(tmp_path):
    model = models.table3_cnn(basis=True, seed=2)
    _write("training checkpoint", model, tmp_path / "checkpoint-train.npz")
    loaded, _ = minibasis.load_model(tmp_path / "checkpoint-train.npz")
    assert loaded.architecture["kwargs"]["basis"] is True and loaded.is_basis_twin


def test_checkpoints_in_the_layout_before_the_record_keep_loading(tmp_path):
    """Checkpoints written before the record stored ``{"model": name, **every constructor argument}``
    under ``meta["architecture"]``; the reader once kept only depth and class count (vgg16_bn came
    back without its BatchNorms)."""
    model = _perturb_batch_norms(models.get_model("vgg16_bn", num_classes=7))
    record = {"model": "vgg", **model.architecture["kwargs"]}
    save_checkpoint(tmp_path / "checkpoint-train.npz", model=model,
                    meta={"architecture": record, "basisconv": {}, "stage": "train", "epoch": 1})
    loaded, meta = minibasis.load_model(tmp_path / "checkpoint-train.npz")
    assert meta.format == "legacy"
    assert loaded.architecture == {"name": "vgg", "kwargs": {"depth": 16, "num_classes": 7, "batch_norm": True}}
    assert np.array_equal(_logits(loaded), _logits(model))


def test_contradicting_argument_is_reported_in_fields(tmp_path):
    minibasis.save_model(models.resnet_cifar(8), tmp_path / "m.npz")
    with pytest.raises(ModelFileError) as info:
        minibasis.load_model(tmp_path / "m.npz", depth=20)
    error = info.value
    assert (error.argument, error.given, error.recorded) == ("depth", 20, 8)
    assert error.source == str(tmp_path / "m.npz")


@pytest.mark.parametrize("build", [lambda: models.get_model("vgg", depth=11, batch_norm=True), lambda: models.table3_cnn(basis=True),
                                   lambda: models.demo_cnn(widths=[4, 8, 8]), _compressed_resnet8],
                         ids=["vgg11_bn", "table3_cnn basis", "demo_cnn", "resnet8 compressed"])
def test_a_training_checkpoint_feeds_every_verb_that_takes_a_model(build, tmp_path, capsys):
    minibasis.manual_seed(0)
    model = build()
    checkpoint = tmp_path / "checkpoint-train.npz"
    _write("training checkpoint", model, checkpoint)
    assert main(["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--limit", "8",
                 "--output", str(tmp_path / "eval.json"), "--quiet"]) == 0
    assert main(["count", str(checkpoint), "--json", str(tmp_path / "count.json")]) == 0
    counted = json.loads((tmp_path / "count.json").read_text())["models"][0]
    assert counted["conv_mults_measured"] == counted["conv_mults_formula"]
    assert main(["verify", "counts", str(checkpoint), "--thresholds", "1"]) == 0


def test_the_demos_checkpoint_and_model_evaluate(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--num-train", "32", "--num-test", "16", "--thresholds", "1",
                 "--output", str(out), "--quiet"]) == 0
    model, meta = minibasis.load_model(out / "checkpoint-train.npz")
    assert model.architecture["name"] == "demo_cnn" and meta.normalization == "none"
    assert main(["eval", "--checkpoint", str(out / "checkpoint-train.npz"), "--dataset", "synthetic",
                 "--limit", "8", "--output", str(tmp_path / "eval.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == "demo_cnn"
