"""The shared pretrained akamaster ResNets on the shared CIFAR-10 test set, against PyTorch.

PyTorch (when installed) runs its own re-implementation of akamaster's ResNet
(tests/torch_zoo.py) with the checkpoint read by ``torch.load`` and the images
normalised here with torch; minibasis reads the same file without torch. The
shared images are JPEG re-encodings, so both score well below the published
accuracies (see docs/models.md); what must hold is that they agree.
"""
import json
import tracemalloc

import numpy as np
import pytest

import minibasis as mb
from minibasis.cli import main
from minibasis.data import IMAGENET_MEAN, IMAGENET_STD, Normalize, load_cifar10
from minibasis.training import evaluate
from minibasis.io import load_torch_checkpoint
from minibasis.models import resnet_cifar

# From shared/models/akamaster/README.md: keys per checkpoint and PyTorch 2.13's top-1 on the shared test set.
README_KEYS = {20: 97, 56: 277}
README_TORCH_ACCURACY = {20: 0.8103, 56: 0.8320}


def _checkpoint(akamaster_dir, depth):
    matches = sorted(akamaster_dir.glob(f"resnet{depth}-*.th"))
    if not matches:
        pytest.skip(f"resnet{depth}-*.th not found in {akamaster_dir}")
    return matches[0]


@pytest.fixture(scope="module")
def test_set(cifar10_dir):
    _, (images, labels) = load_cifar10(cifar10_dir)
    return images, labels


def _pretrained(akamaster_dir, depth):
    model = resnet_cifar(depth, num_classes=10, shortcut="A")
    state = load_torch_checkpoint(_checkpoint(akamaster_dir, depth))
    assert len(state) == README_KEYS[depth]
    model.load_state_dict(state, strict=True)
    return model


def _torch_reference(akamaster_dir, depth, images):
    """PyTorch's logits: its own loader, its own model code, its own normalisation."""
    torch = pytest.importorskip("torch")
    from torch_zoo import akamaster_from_checkpoint, torch_logits

    x = torch.from_numpy(images).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return torch_logits(akamaster_from_checkpoint(_checkpoint(akamaster_dir, depth), depth), x.numpy())


@pytest.mark.parametrize("depth", [20, 56])
def test_akamaster_checkpoints_load_strictly(akamaster_dir, depth):
    model = _pretrained(akamaster_dir, depth)
    state = load_torch_checkpoint(_checkpoint(akamaster_dir, depth))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(mb.to_numpy(value), state[key])


def test_checkpoint_for_another_depth_is_refused(akamaster_dir):
    with pytest.raises(KeyError, match="missing keys"):
        resnet_cifar(32, shortcut="A").load_state_dict(load_torch_checkpoint(_checkpoint(akamaster_dir, 20)))


def _compare(akamaster_dir, depth, images, labels):
    model = _pretrained(akamaster_dir, depth)
    ours = evaluate(model, images, labels, batch_size=256, transform=Normalize(IMAGENET_MEAN, IMAGENET_STD),
                    progress=False, return_logits=True)
    expected = _torch_reference(akamaster_dir, depth, images)
    np.testing.assert_allclose(ours.logits, expected, rtol=0, atol=1e-3)
    torch_accuracy = float((expected.argmax(axis=1) == labels).mean())
    assert abs(ours.accuracy - torch_accuracy) <= 0.0005
    return ours, torch_accuracy


def test_resnet20_first_images_match_torch(akamaster_dir, test_set):
    images, labels = test_set
    _compare(akamaster_dir, 20, images[:256], labels[:256])


@pytest.mark.slow
def test_resnet20_full_test_set_matches_torch(akamaster_dir, test_set):
    images, labels = test_set
    try:
        import torch  # noqa: F401
    except ImportError:
        model = _pretrained(akamaster_dir, 20)
        ours = evaluate(model, images, labels, batch_size=256, transform=Normalize(IMAGENET_MEAN, IMAGENET_STD),
                        progress=False)
        assert abs(ours.accuracy - README_TORCH_ACCURACY[20]) <= 0.0005
        return
    ours, torch_accuracy = _compare(akamaster_dir, 20, images, labels)
    assert ours.total == 10_000
    # And both agree with the README's measurement on these images.
    assert abs(torch_accuracy - README_TORCH_ACCURACY[20]) <= 0.0005


@pytest.mark.slow
def test_resnet56_slice_matches_torch(akamaster_dir, test_set):
    images, labels = test_set
    _compare(akamaster_dir, 56, images[:500], labels[:500])


@pytest.mark.slow
def test_resnet56_batch256_peak_memory(akamaster_dir, test_set):
    """Evaluation memory: one batch of 256 through ResNet-56 allocates well under 2 GiB."""
    images, labels = test_set
    model = _pretrained(akamaster_dir, 56)
    tracemalloc.start()
    try:
        evaluate(model, images[:512], labels[:512], batch_size=256,
                 transform=Normalize(IMAGENET_MEAN, IMAGENET_STD), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2 ** 30, f"peak {peak / 2 ** 20:.0f} MiB"


def test_eval_cli_writes_json(akamaster_dir, cifar10_dir, tmp_path, capsys, test_set):
    images, labels = test_set
    out = tmp_path / "result.json"
    argv = ["eval", "--model", "resnet_cifar", "--depth", "20", "--checkpoint", str(_checkpoint(akamaster_dir, 20)),
            "--data", str(cifar10_dir.parent), "--limit", "128", "--batch-size", "50", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["total"] == 128 and result["normalize"] == "imagenet"
    expected = _torch_reference(akamaster_dir, 20, images[:128])
    assert result["correct"] == int((expected.argmax(axis=1) == labels[:128]).sum())
    assert "top-1" in capsys.readouterr().out


def test_eval_cli_wrong_depth_is_a_one_line_error(akamaster_dir, cifar10_dir, capsys):
    argv = ["eval", "--depth", "32", "--checkpoint", str(_checkpoint(akamaster_dir, 20)),
            "--data", str(cifar10_dir.parent), "--limit", "8", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --depth 20" in err and len(err.splitlines()) == 1  # the file says its depth
