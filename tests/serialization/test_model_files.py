"""minibasis.save_model / load_model: self-describing model files, the verbs' older files and
PyTorch checkpoints, rebuilt with nothing restated.

Round trips compare logits bit for bit with the model that was saved (an independent
reference: the live model, not anything read back). The pretrained akamaster ResNet-20 is
checked against PyTorch running its own model code on the same images (tests/torch_zoo.py).
"""
import json
import pickle
import zipfile

import numpy as np
import pytest

import minibasis
from minibasis import functions as F
from minibasis import models, nn
from minibasis.data import NORMALIZATIONS, load_cifar10
from minibasis.serialization import CheckpointError
from minibasis.model_files import ModelFileError, ModelMetadata, apply_basis_layout, basis_layout
from minibasis.serialization import UnsafePickleError


def _images(count=4, seed=0):
    return np.random.default_rng(seed).random((count, 3, 32, 32)).astype(np.float32)


def _logits(model, images):
    model.eval()
    with minibasis.no_grad():
        return minibasis.to_numpy(model(minibasis.tensor(images)).data)


def _train_a_few_steps(model, steps=3, seed=0):
    rng = np.random.default_rng(seed)
    optimizer = minibasis.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = minibasis.tensor(rng.random((8, 3, 32, 32)).astype(np.float32))
        y = rng.integers(0, 10, size=8)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _assert_same_state(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert np.array_equal(minibasis.to_numpy(state_a[key]), minibasis.to_numpy(state_b[key])), key


# ---------------------------------------------------------------------------
# Architecture records
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("build, expected", [
    (lambda: models.resnet_cifar(20), {"name": "resnet_cifar", "kwargs": {"depth": 20, "num_classes": 10, "shortcut": "A"}}),
    (lambda: models.resnet56(num_classes=100), {"name": "resnet_cifar", "kwargs": {"depth": 56, "num_classes": 100, "shortcut": "A"}}),
    (lambda: models.get_model("resnet32"), {"name": "resnet_cifar", "kwargs": {"depth": 32, "num_classes": 10, "shortcut": "A"}}),
    (lambda: models.table3_cnn(basis=True), {"name": "table3_cnn", "kwargs": {"num_classes": 10, "basis": True, "seed": None}}),
    (lambda: models.get_model("vgg16_bn"), {"name": "vgg", "kwargs": {"depth": 16, "num_classes": 10, "batch_norm": True}}),
    (lambda: models.vgg11(num_classes=100), {"name": "vgg", "kwargs": {"depth": 11, "num_classes": 100, "batch_norm": False}}),
    (lambda: models.alexnet(), {"name": "alexnet", "kwargs": {"num_classes": 10}}),
])
def test_zoo_models_record_their_architecture(build, expected):
    model = build()
    assert model.architecture == expected
    json.dumps(model.architecture)  # plain JSON values
    rebuilt = models.get_model(expected["name"], **expected["kwargs"])
    assert rebuilt.architecture == expected
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_normalizations_are_the_documented_statistics():
    assert set(NORMALIZATIONS) == {"cifar10", "imagenet"}
    assert NORMALIZATIONS["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert NORMALIZATIONS["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------
def test_trained_model_round_trip_is_bit_exact(tmp_path):
    minibasis.manual_seed(0)
    model = _train_a_few_steps(models.table3_cnn())
    expected = _logits(model, _images())
    path = tmp_path / "model.npz"
    minibasis.save_model(model, path, normalization="cifar10", dataset="cifar10", epochs=3, note="three steps")

    minibasis.manual_seed(123)  # a different init, so nothing but the file can make them equal
    loaded, meta = minibasis.load_model(path)
    assert isinstance(meta, ModelMetadata)
    assert np.array_equal(_logits(loaded, _images()), expected)
    _assert_same_state(model, loaded)
    assert meta.architecture == {"name": "table3_cnn", "kwargs": {"num_classes": 10, "basis": False, "seed": None}}
    assert meta.num_classes == 10 and meta.dataset == "cifar10"
    assert (meta.normalization, meta.mean, meta.std) == ("cifar10", *NORMALIZATIONS["cifar10"])
    assert meta.format == "minibasis-model-1" and meta.minibasis_version == minibasis.__version__
    assert meta.extra == {"epochs": 3, "note": "three steps"} and meta.basis_layout == {}
    assert not loaded.training  # returned ready to evaluate


def test_compressed_model_round_trip_keeps_logits_state_and_layout(tmp_path):
    minibasis.manual_seed(1)
    original = models.resnet_cifar(20)
    compressed, _ = minibasis.compress(original, energy_threshold=0.8)
    layout = basis_layout(compressed)
    assert layout and all(spec["num_basis"] >= 1 for spec in layout.values())
    expected = _logits(compressed, _images())
    path = tmp_path / "compressed.npz"
    minibasis.save_model(compressed, path, normalization="imagenet")

    loaded, meta = minibasis.load_model(path)
    assert np.array_equal(_logits(loaded, _images()), expected)
    _assert_same_state(compressed, loaded)
    assert basis_layout(loaded) == layout == meta.basis_layout
    assert [type(m).__name__ for _, m in loaded.named_modules()] == \
        [type(m).__name__ for _, m in compressed.named_modules()]
    assert [p for p, _ in loaded.named_modules()] == [p for p, _ in compressed.named_modules()]  # order kept


def test_random_basis_twin_round_trip(tmp_path):
    minibasis.manual_seed(2)
    twin = _train_a_few_steps(models.table3_cnn(basis=True), steps=2)  # BatchNorm statistics move too
    expected = _logits(twin, _images())
    path = tmp_path / "twin.npz"
    minibasis.save_model(twin, path)
    loaded, meta = minibasis.load_model(path)
    assert np.array_equal(_logits(loaded, _images()), expected)
    _assert_same_state(twin, loaded)
    assert basis_layout(loaded) == basis_layout(twin)
    assert meta.architecture["kwargs"]["basis"] is True and meta.normalization is None


def test_save_model_needs_an_architecture(tmp_path):
    plain = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="architecture="):
        minibasis.save_model(plain, tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
    with pytest.raises(ValueError, match="unknown normalization 'mnist'"):
        minibasis.save_model(models.table3_cnn(), tmp_path / "m.npz", normalization="mnist")


def test_normalization_pair_is_recorded_and_named_when_known(tmp_path):
    model = models.table3_cnn()
    minibasis.save_model(model, tmp_path / "a.npz", normalization=NORMALIZATIONS["imagenet"])
    minibasis.save_model(model, tmp_path / "b.npz", normalization=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]))
    _, known = minibasis.load_model(tmp_path / "a.npz")
    _, custom = minibasis.load_model(tmp_path / "b.npz")
    assert known.normalization == "imagenet"
    assert (custom.normalization, custom.mean, custom.std) == (None, (0.5,) * 3, (0.25,) * 3)


# ---------------------------------------------------------------------------
# PyTorch checkpoints
# ---------------------------------------------------------------------------
def _akamaster(akamaster_dir, depth):
    matches = sorted(akamaster_dir.glob(f"resnet{depth}-*.th"))
    if not matches:
        pytest.skip(f"resnet{depth}-*.th not found in {akamaster_dir}")
    return matches[0]


def test_akamaster_checkpoint_loads_with_nothing_restated(akamaster_dir, cifar10_dir):
    path = _akamaster(akamaster_dir, 20)
    model, meta = minibasis.load_model(path)
    assert meta.format == "torch"
    assert meta.architecture == {"name": "resnet_cifar", "kwargs": {"depth": 20, "num_classes": 10, "shortcut": "A"}}
    assert meta.normalization == "imagenet"

    _, (images, labels) = load_cifar10(cifar10_dir)
    images, labels = images[:500], labels[:500]
    mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)
    x = ((images.astype(np.float32) / 255.0) - mean) / std
    ours = np.concatenate([_logits(model, x[i:i + 250]) for i in range(0, 500, 250)])
    accuracy = float((ours.argmax(1) == labels).mean())
    try:
        import torch
    except ImportError:
        assert accuracy > 0.7  # the shared JPEG-re-encoded images: ~81 % on all 10,000
        return
    from torch_zoo import akamaster_from_checkpoint, torch_logits

    tx = torch.from_numpy(images).float() / 255.0
    tx = (tx - torch.tensor(NORMALIZATIONS["imagenet"][0]).view(1, 3, 1, 1)) \
        / torch.tensor(NORMALIZATIONS["imagenet"][1]).view(1, 3, 1, 1)
    reference = torch_logits(akamaster_from_checkpoint(path, 20), tx.numpy())
    torch_accuracy = float((reference.argmax(1) == labels).mean())
    # Rounding may flip one near-tie among 500 images; the accuracies must otherwise agree.
    assert abs(accuracy - torch_accuracy) <= 1 / 500, (accuracy, torch_accuracy)
    assert (ours.argmax(1) == reference.argmax(1)).mean() >= 499 / 500


def test_akamaster_checkpoint_of_another_depth_names_the_right_one(akamaster_dir):
    path = _akamaster(akamaster_dir, 56)
    with pytest.raises(ModelFileError, match=r"depth=20 was given.*depth 56.*pass depth=56"):
        minibasis.load_model(path, architecture="resnet_cifar", depth=20)
    with pytest.raises(ModelFileError, match=r"depth=20 was given.*depth=56"):
        minibasis.load_model(path, architecture="resnet20")


def _torch_state_file(tmp_path, state):
    torch = pytest.importorskip("torch")
    path = tmp_path / "net.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return path


def test_torch_checkpoint_of_an_unknown_layout_asks_for_the_architecture(tmp_path):
    model = models.table3_cnn()
    path = _torch_state_file(tmp_path, {k: minibasis.to_numpy(v) for k, v in model.state_dict().items()})
    with pytest.raises(ModelFileError, match=r'architecture="resnet_cifar", depth='):
        minibasis.load_model(path)
    loaded, meta = minibasis.load_model(path, architecture="table3_cnn")
    assert meta.format == "torch" and meta.architecture["name"] == "table3_cnn"
    assert np.array_equal(_logits(loaded, _images()), _logits(model, _images()))
    with pytest.raises(ModelFileError, match="does not fit alexnet"):
        minibasis.load_model(path, architecture="alexnet")


def test_bearpaw_resnet_keys_infer_shortcut_b(tmp_path):
    model = models.resnet_cifar(14, num_classes=100, shortcut="B")
    path = _torch_state_file(tmp_path, {f"module.{k}": minibasis.to_numpy(v) for k, v in model.state_dict().items()})
    loaded, meta = minibasis.load_model(path)
    assert meta.architecture["kwargs"] == {"depth": 14, "num_classes": 100, "shortcut": "B"}
    assert meta.normalization is None  # bearpaw's statistics are not assumed
    assert np.array_equal(_logits(loaded, _images(2)), _logits(model, _images(2)))


# ---------------------------------------------------------------------------
# Contradictions
# ---------------------------------------------------------------------------
def test_explicit_architecture_that_contradicts_the_file_names_both(tmp_path):
    path = tmp_path / "table3.npz"
    minibasis.save_model(models.table3_cnn(), path)
    with pytest.raises(ModelFileError, match=r"architecture='alexnet' was given.*'table3_cnn'"):
        minibasis.load_model(path, architecture="alexnet")
    with pytest.raises(ModelFileError, match=r"num_classes=100 was given.*num_classes=10"):
        minibasis.load_model(path, num_classes=100)
    model, _ = minibasis.load_model(path, architecture="table3_cnn", num_classes=10)  # agreeing is fine
    assert model.architecture["name"] == "table3_cnn"


def test_plain_state_needs_an_architecture(tmp_path):
    path = tmp_path / "state.npz"
    minibasis.io.save(models.table3_cnn(), path)
    with pytest.raises(ModelFileError, match="does not record its architecture.*architecture="):
        minibasis.load_model(path)
    _, meta = minibasis.load_model(path, architecture="table3_cnn")
    assert meta.format == "legacy"


def test_layout_at_a_path_without_a_conv_is_refused():
    model = models.table3_cnn()
    with pytest.raises(ModelFileError, match=r"'features.1', where the model has ReLU"):
        apply_basis_layout(model, {"features.1": {"num_basis": 4}}, source="test")
    with pytest.raises(ModelFileError, match=r"'nowhere', where the model has nothing"):
        apply_basis_layout(model, {"nowhere": {"num_basis": 4}}, source="test")
    with pytest.raises(ModelFileError, match=r"BasisConv2d at 'features.0' does not fit the model"):
        apply_basis_layout(model, {"features.0": {"num_basis": 0}}, source="test")
    grouped = models.table3_cnn()
    object.__setattr__(grouped.features[3], "groups", 2)  # as a grouped conv of the conv work reports itself
    with pytest.raises(ModelFileError, match=r"grouped conv \(groups=2\)"):
        apply_basis_layout(grouped, {"features.3": {"num_basis": 4}}, source="test")


# ---------------------------------------------------------------------------
# Files written by the verbs before this format
# ---------------------------------------------------------------------------
def test_files_of_the_earlier_verbs_keep_loading(tmp_path):
    from minibasis import io
    from minibasis.training import save_checkpoint

    minibasis.manual_seed(3)
    model, _ = minibasis.compress(models.resnet_cifar(8, num_classes=10), energy_threshold=0.8)
    expected = _logits(model, _images(2))
    record = {"model": "resnet_cifar", "depth": 8, "num_classes": 10}
    # What experiments/options.save_model_file wrote before save_model existed (written out here).
    io.save({"format": "minibasis-model/1", "architecture": record, "basisconv": basis_layout(model),
             "state_dict": {k: minibasis.to_numpy(v) for k, v in model.state_dict().items()}}, tmp_path / "model.npz")
    save_checkpoint(tmp_path / "checkpoint-step1.npz", model=model,
                    meta={"architecture": record, "basisconv": basis_layout(model), "epoch": 2,
                          "stage": "step1"})
    for name in ("model.npz", "checkpoint-step1.npz"):
        loaded, meta = minibasis.load_model(tmp_path / name)
        assert meta.format == "legacy"
        assert meta.architecture == {"name": "resnet_cifar", "kwargs": {"depth": 8, "num_classes": 10, "shortcut": "A"}}
        assert np.array_equal(_logits(loaded, _images(2)), expected), name
        assert basis_layout(loaded).keys() == basis_layout(model).keys()
    with pytest.raises(ModelFileError, match="depth=20 was given.*depth=8"):
        minibasis.load_model(tmp_path / "model.npz", depth=20)


# ---------------------------------------------------------------------------
# Hostile and corrupt files
# ---------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_hostile_torch_checkpoint_is_refused_by_the_restricted_unpickler(tmp_path):
    path = tmp_path / "evil.th"
    # A legacy torch.save stream: magic, protocol, sys_info, then the object.
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2)
                     + pickle.dumps({"little_endian": True}, 2) + pickle.dumps({"w": _Evil()}, 2))
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|os)\.system"):
        minibasis.load_model(path, architecture="table3_cnn")


def test_corrupt_and_hostile_npz_files_are_refused(tmp_path):
    good = tmp_path / "good.npz"
    minibasis.save_model(models.table3_cnn(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        minibasis.load_model(truncated)

    climbing = tmp_path / "climbing.npz"
    with zipfile.ZipFile(climbing, "w") as zf:
        zf.writestr("../outside.npy", b"\x93NUMPY")
    with pytest.raises(CheckpointError, match="unsafe member name"):
        minibasis.load_model(climbing)

    objects = tmp_path / "objects.npz"
    np.savez(objects, w=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="Python objects"):
        minibasis.load_model(objects, architecture="table3_cnn")

    not_a_model = tmp_path / "other.npz"
    minibasis.io.save({"format": "something-else/1", "x": 1}, not_a_model)
    with pytest.raises(ModelFileError, match="unknown file format 'something-else/1'"):
        minibasis.load_model(not_a_model)
