"""DataLoader, transforms and the synthetic dataset, checked against independent references
(plain per-image loops, manual arithmetic, numpy classifiers) rather than against themselves."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minibasis.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_CLASSES,
    SYNTHETIC_NUM_CLASSES,
    ArrayDataset,
    Compose,
    DataLoader,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToFloat,
    augmentation_generator,
    epoch_permutation,
    synthetic,
    synthetic_class_names,
)


def identifiable_dataset(n, channels=1, size=4):
    """Images whose every pixel equals the sample's index, and labels equal to the index, so a
    batch tells exactly which samples it holds and that images and labels stayed paired."""
    ids = np.arange(n, dtype=np.int64)
    images = np.broadcast_to(ids[:, None, None, None], (n, channels, size, size)).astype(np.float32)
    return images, ids


def collect(loader):
    batches = list(loader)
    return [x for x, _ in batches], [y for _, y in batches]


# ----------------------------------------------------------------------------- DataLoader


def test_unshuffled_batches_keep_order_and_partial_last_batch():
    images, labels = identifiable_dataset(10)
    loader = DataLoader((images, labels), batch_size=4)
    xs, ys = collect(loader)
    assert len(loader) == 3
    assert [len(y) for y in ys] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(ys), np.arange(10))
    np.testing.assert_array_equal(np.concatenate(xs), images)
    assert all(y.dtype == np.int64 for y in ys)


def test_drop_last_drops_only_the_partial_batch():
    images, labels = identifiable_dataset(10)
    loader = DataLoader((images, labels), batch_size=4, drop_last=True)
    _, ys = collect(loader)
    assert len(loader) == 2
    assert [len(y) for y in ys] == [4, 4]
    # With an exact multiple nothing is dropped.
    assert len(DataLoader(identifiable_dataset(8), batch_size=4, drop_last=True)) == 2


@settings(max_examples=40, deadline=None)
@given(
    num_samples=st.integers(0, 60),
    batch_size=st.integers(1, 17),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
)
def test_every_sample_exactly_once_per_epoch(num_samples, batch_size, shuffle, seed, epoch):
    images, labels = identifiable_dataset(num_samples)
    loader = DataLoader((images, labels), batch_size=batch_size, shuffle=shuffle, seed=seed)
    loader.set_epoch(epoch)
    xs, ys = collect(loader)
    assert len(ys) == len(loader) == -(-num_samples // batch_size)
    seen = np.concatenate(ys) if ys else np.empty(0, dtype=np.int64)
    np.testing.assert_array_equal(np.sort(seen), np.arange(num_samples))
    for x, y in zip(xs, ys):  # images travel with their labels
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)
    assert all(len(y) == batch_size for y in ys[:-1])


def test_shuffle_is_deterministic_per_seed_and_epoch():
    images, labels = identifiable_dataset(200)

    def order(seed, epoch):
        loader = DataLoader((images, labels), batch_size=32, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return np.concatenate(collect(loader)[1])

    np.testing.assert_array_equal(order(7, 0), order(7, 0))
    np.testing.assert_array_equal(order(7, 3), order(7, 3))
    assert not np.array_equal(order(7, 0), order(7, 1))
    assert not np.array_equal(order(7, 0), order(8, 0))
    assert not np.array_equal(order(7, 0), np.arange(200))
    np.testing.assert_array_equal(order(7, 2), epoch_permutation(200, 7, 2))


def test_epoch_advances_after_a_full_pass_only():
    loader = DataLoader(identifiable_dataset(20), batch_size=8, shuffle=True, seed=0)
    first = np.concatenate(collect(loader)[1])
    assert loader.epoch == 1
    second = np.concatenate(collect(loader)[1])
    assert loader.epoch == 2
    assert not np.array_equal(first, second)
    # An abandoned pass does not count: the next pass repeats that epoch's order.
    next(iter(loader))
    assert loader.epoch == 2
    np.testing.assert_array_equal(np.concatenate(collect(loader)[1]), epoch_permutation(20, 0, 2))


def augmenting_loader(seed=None):
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(50)
    transform = Compose([RandomCrop(8, padding=2), RandomHorizontalFlip(), Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return DataLoader((images, labels), batch_size=16, shuffle=True, seed=seed, transform=transform)


def test_set_epoch_and_state_dict_reproduce_an_uninterrupted_run_bit_for_bit():
    reference = augmenting_loader(seed=11)
    epochs = [collect(reference) for _ in range(3)]  # epochs 0, 1, 2
    # Augmentation differs across epochs too, not only the order.
    assert not all(np.array_equal(a, b) for a, b in zip(epochs[0][0], epochs[1][0]))

    resumed = augmenting_loader(seed=11)
    resumed.set_epoch(2)
    xs, ys = collect(resumed)
    for got, want in zip(xs + ys, epochs[2][0] + epochs[2][1]):
        np.testing.assert_array_equal(got, want)

    # A loader seeded at random restores the seed and epoch from a state dict.
    run = augmenting_loader(seed=None)
    collect(run)
    state = run.state_dict()
    expected = collect(run)
    restored = augmenting_loader(seed=None)
    # As after a round trip through an .npz checkpoint: 0-d integer arrays.
    restored.load_state_dict({key: np.array(value, dtype=np.int64) for key, value in state.items()})
    assert restored.epoch == 1
    for got, want in zip(sum(collect(restored), []), sum(expected, [])):
        np.testing.assert_array_equal(got, want)
    assert np.iinfo(np.int64).min <= state["seed"] <= np.iinfo(np.int64).max


def test_augmentation_is_fixed_per_seed_epoch_and_batch_and_varies_across_them():
    # Identical images and no shuffling: any difference between batches comes from augmentation.
    image = np.random.default_rng(0).integers(1, 256, (1, 3, 8, 8), dtype=np.uint8)
    images, labels = np.repeat(image, 64, axis=0), np.zeros(64, np.int64)

    def epoch_batches(seed, epoch):
        loader = DataLoader((images, labels), batch_size=32, seed=seed, transform=RandomCrop(8, padding=3))
        loader.set_epoch(epoch)
        return collect(loader)[0]

    first, second = epoch_batches(seed=1, epoch=0)
    assert not np.array_equal(first, second)  # batches of one epoch get different draws
    again = epoch_batches(seed=1, epoch=0)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    assert not np.array_equal(epoch_batches(seed=1, epoch=1)[0], first)
    assert not np.array_equal(epoch_batches(seed=2, epoch=0)[0], first)


def test_loader_accepts_a_dataset_object_with_index_arrays():
    class Squares:
        def __len__(self):
            return 9

        def __getitem__(self, index):
            index = np.asarray(index)
            return (index.astype(np.float32) ** 2)[:, None], index

    xs, ys = collect(DataLoader(Squares(), batch_size=4, shuffle=True, seed=3))
    np.testing.assert_array_equal(np.sort(np.concatenate(ys)), np.arange(9))
    for x, y in zip(xs, ys):
        np.testing.assert_array_equal(x[:, 0], y.astype(np.float32) ** 2)


def test_batches_are_copies_not_views_of_the_dataset():
    images, labels = identifiable_dataset(6)
    before = images.copy()
    for x, _ in DataLoader((images, labels), batch_size=4):
        x.data[...] = -1  # the array the yielded Tensor wraps
    for x, _ in DataLoader((images, labels), batch_size=4, as_tensors=False):
        x[...] = -1
    np.testing.assert_array_equal(images, before)


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((5, 1, 2, 2), np.uint8), np.zeros(4, np.int64), r"5 images.*4 labels"),
        (np.zeros(5, np.uint8), np.zeros(5, np.int64), r"\(N, \.\.\.\).*\(5,\)"),
        (np.zeros((5, 1, 2, 2), np.int32), np.zeros(5, np.int64), r"uint8 or floating.*int32"),
        (np.zeros((5, 1, 2, 2), np.uint8), np.zeros((5, 1), np.int64), r"\(N,\).*\(5, 1\)"),
        (np.zeros((5, 1, 2, 2), np.uint8), np.zeros(5, np.float32), r"integer.*float32"),
        (np.zeros((5, 1, 2, 2), np.uint8), -np.ones(5, np.int64), r">= 0.*-1"),
    ],
)
def test_bad_datasets_raise_value_error_naming_expected_and_actual(images, labels, match):
    with pytest.raises(ValueError, match=match):
        DataLoader((images, labels), batch_size=2)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_non_positive_batch_size_is_rejected(batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {batch_size}"):
        DataLoader(identifiable_dataset(4), batch_size=batch_size)


def test_other_bad_arguments():
    with pytest.raises(TypeError, match="batch_size must be a positive integer, got 2.0"):
        DataLoader(identifiable_dataset(4), batch_size=2.0)
    with pytest.raises(ValueError, match=r"tuple of 3"):
        DataLoader((1, 2, 3), batch_size=2)
    with pytest.raises(TypeError, match="__len__"):
        DataLoader(42, batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(identifiable_dataset(4), batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        DataLoader(identifiable_dataset(4), batch_size=2).set_epoch(-1)
    with pytest.raises(ValueError, match=r"epoch must be a non-negative integer, got 1.5"):
        DataLoader(identifiable_dataset(4), batch_size=2).set_epoch(1.5)
    with pytest.raises(TypeError, match="numpy arrays"):
        ArrayDataset([[0]], np.zeros(1, np.int64))


def test_epoch_permutation_is_a_permutation_that_depends_on_seed_and_epoch():
    perm = epoch_permutation(1000, seed=5, epoch=0)
    assert perm.dtype == np.int64
    np.testing.assert_array_equal(np.sort(perm), np.arange(1000))
    np.testing.assert_array_equal(perm, epoch_permutation(1000, 5, 0))
    assert not np.array_equal(perm, epoch_permutation(1000, 5, 1))
    assert not np.array_equal(perm, epoch_permutation(1000, 6, 0))
    assert epoch_permutation(0, 0, 0).shape == (0,)


def test_augmentation_generator_is_the_stream_the_loader_hands_its_transform():
    seen = []

    def record(x, rng):
        seen.append(rng.integers(0, 2**62, 4))
        return x

    loader = DataLoader(identifiable_dataset(10), batch_size=4, shuffle=True, seed=3, transform=record)
    loader.set_epoch(2)
    list(loader)
    assert len(seen) == 3
    for batch_index, draws in enumerate(seen):
        np.testing.assert_array_equal(draws, augmentation_generator(3, 2, batch_index).integers(0, 2**62, 4))
    # Another seed, epoch, batch or shard is another stream.
    others = [(4, 2, 0), (3, 1, 0), (3, 2, 1), (3, 2, 0, 0), (3, 2, 0, 1)]
    for key in others:
        assert not np.array_equal(augmentation_generator(*key).integers(0, 2**62, 4), seen[0])
    with pytest.raises(ValueError, match="batch_index must be a non-negative integer, got -1"):
        augmentation_generator(0, 0, -1)
    with pytest.raises(ValueError, match="shard must be a non-negative integer, got 1.5"):
        augmentation_generator(0, 0, 0, 1.5)


# ----------------------------------------------------------------------------- transforms


def reference_crop(image, top, left, size_h, size_w, padding):
    """One image (C, H, W), zero-padded by hand, cropped at (top, left) of the padded image."""
    channels, height, width = image.shape
    padded = np.zeros((channels, height + 2 * padding, width + 2 * padding), dtype=image.dtype)
    padded[:, padding : padding + height, padding : padding + width] = image
    return padded[:, top : top + size_h, left : left + size_w]


@pytest.mark.parametrize("size, padding, hw", [(8, 2, (8, 8)), ((5, 7), 0, (6, 9)), ((6, 4), 3, (5, 4))])
def test_random_crop_matches_per_image_reference(size, padding, hw):
    size_h, size_w = (size, size) if isinstance(size, int) else size
    n = 300
    # Unique positive pixel values: every crop position gives a different crop.
    images = (np.arange(n * 2 * hw[0] * hw[1], dtype=np.float32) + 1).reshape(n, 2, *hw)
    out = RandomCrop(size, padding)(images, np.random.default_rng(0))
    assert out.shape == (n, 2, size_h, size_w) and out.dtype == images.dtype
    offsets = [
        (top, left)
        for top in range(hw[0] + 2 * padding - size_h + 1)
        for left in range(hw[1] + 2 * padding - size_w + 1)
    ]
    used = set()
    for i in range(n):
        matches = [o for o in offsets if np.array_equal(out[i], reference_crop(images[i], *o, size_h, size_w, padding))]
        assert len(matches) == 1, f"image {i}: crop matches {len(matches)} reference positions"
        used.add(matches[0])
    # Offsets are drawn per image and reach every valid position (300 draws over <= 63 cells).
    assert used == set(offsets)


def test_random_crop_keeps_uint8_and_is_reproducible_per_generator():
    images = np.random.default_rng(1).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    crop = RandomCrop(32, padding=4)
    first = crop(images, np.random.default_rng(5))
    assert first.dtype == np.uint8 and first.shape == images.shape
    np.testing.assert_array_equal(first, crop(images, np.random.default_rng(5)))
    assert not np.array_equal(first, crop(images, np.random.default_rng(6)))
    with pytest.raises(ValueError, match=r"does not fit"):
        RandomCrop(41, padding=4)(images, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        crop(images, None)


def test_horizontal_flip_mirrors_some_images_and_leaves_the_rest():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2000, 2, 3, 5), dtype=np.uint8)
    before = images.copy()
    out = RandomHorizontalFlip(0.5)(images, np.random.default_rng(0))
    np.testing.assert_array_equal(images, before)  # input untouched
    flipped = np.array([np.array_equal(out[i], images[i, :, :, ::-1]) for i in range(len(images))])
    kept = np.array([np.array_equal(out[i], images[i]) for i in range(len(images))])
    assert np.all(flipped ^ kept)  # each image is exactly one of the two (none is symmetric)
    assert 0.45 < flipped.mean() < 0.55
    np.testing.assert_array_equal(RandomHorizontalFlip(0.0)(images, rng), images)
    np.testing.assert_array_equal(RandomHorizontalFlip(1.0)(images, rng), images[..., ::-1])
    with pytest.raises(ValueError, match="p must be in"):
        RandomHorizontalFlip(1.5)


def test_normalize_matches_manual_computation():
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    out = Normalize(IMAGENET_MEAN, IMAGENET_STD)(images)
    expected = np.empty(images.shape, dtype=np.float64)
    for c in range(3):
        expected[:, c] = (images[:, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # Float input is taken to be on the [0, 1] scale already.
    floats = images / 255.0
    np.testing.assert_allclose(Normalize(IMAGENET_MEAN, IMAGENET_STD)(floats), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(floats, images / 255.0)  # input untouched
    np.testing.assert_allclose(ToFloat()(images), images / 255.0, rtol=1e-7, atol=1e-7)


def test_normalize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"3 values.*1 channels"):
        Normalize(CIFAR10_MEAN, CIFAR10_STD)(np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"std must be > 0"):
        Normalize(0.5, 0.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(4, 4\)"):
        Normalize(0.5, 0.5)(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"uint8 or floating.*int64"):
        ToFloat()(np.zeros((1, 1, 2, 2), np.int64))


def test_compose_applies_in_order_with_one_generator():
    images = np.random.default_rng(4).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    crop, flip, norm = RandomCrop(8, 2), RandomHorizontalFlip(), Normalize(0.5, 0.25)
    got = Compose([crop, flip, norm])(images, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    want = norm(flip(crop(images, rng), rng))
    np.testing.assert_array_equal(got, want)


def test_normalization_constants():
    # torchvision's / the akamaster training scripts' published values.
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_determinism():
    (x_train, y_train), (x_test, y_test) = synthetic(num_train=300, num_test=120, seed=3)
    assert x_train.shape == (300, 3, 32, 32) and x_train.dtype == np.uint8
    assert x_test.shape == (120, 3, 32, 32) and y_test.dtype == np.int64 and y_train.dtype == np.int64
    (again_x, again_y), (again_xt, _) = synthetic(num_train=300, num_test=120, seed=3)
    np.testing.assert_array_equal(again_x, x_train)
    np.testing.assert_array_equal(again_y, y_train)
    np.testing.assert_array_equal(again_xt, x_test)
    (other_x, _), _ = synthetic(num_train=300, num_test=120, seed=4)
    assert not np.array_equal(other_x, x_train)
    # The training split does not depend on the size of the test split.
    (same_x, _), _ = synthetic(num_train=300, num_test=7, seed=3)
    np.testing.assert_array_equal(same_x, x_train)
    # Pixels use the whole intensity range rather than a constant.
    assert x_train.min() < 40 and x_train.max() > 215


def test_synthetic_class_balance_and_options():
    (_, y_train), (_, y_test) = synthetic(num_train=1003, num_test=97, seed=0)
    for labels in (y_train, y_test):
        counts = np.bincount(labels, minlength=SYNTHETIC_NUM_CLASSES)
        assert len(counts) == SYNTHETIC_NUM_CLASSES and counts.max() - counts.min() <= 1
    assert not np.array_equal(y_train[:20], np.arange(20) % 10)  # shuffled, not cyclic
    (x, y), _ = synthetic(num_train=40, num_test=0, num_classes=4, image_size=16, channels=1, seed=0)
    assert x.shape == (40, 1, 16, 16) and set(y.tolist()) == {0, 1, 2, 3}
    assert len(SYNTHETIC_CLASSES) == SYNTHETIC_NUM_CLASSES == 10
    assert synthetic_class_names(4) == SYNTHETIC_CLASSES[:4]
    assert synthetic(num_train=4, num_test=0, num_classes=3).label_names == SYNTHETIC_CLASSES[:3]
    assert len(set(SYNTHETIC_CLASSES)) == len(SYNTHETIC_CLASSES)
    for bad in (dict(num_classes=11), dict(num_classes=1), dict(image_size=8), dict(noise=-0.1), dict(num_train=-1)):
        with pytest.raises(ValueError):
            synthetic(**bad)


def softmax_regression_accuracy(train_features, train_labels, test_features, test_labels, epochs=10):
    """Held-out accuracy of a plain multinomial logistic regression (minibatch SGD, numpy)."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    a, b = (train_features - mean) / std, (test_features - mean) / std
    k = int(train_labels.max()) + 1
    weights, bias = np.zeros((a.shape[1], k), np.float32), np.zeros(k, np.float32)
    onehot = np.eye(k, dtype=np.float32)[train_labels]
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(a))
        for start in range(0, len(a), 128):
            idx = order[start : start + 128]
            logits = a[idx] @ weights + bias
            prob = np.exp(logits - logits.max(1, keepdims=True))
            prob /= prob.sum(1, keepdims=True)
            grad = (prob - onehot[idx]) / len(idx)
            weights -= 0.5 * (a[idx].T @ grad + 1e-4 * weights)
            bias -= 0.5 * grad.sum(0)
    return float(((b @ weights + bias).argmax(1) == test_labels).mean())


def test_synthetic_classes_live_in_spatial_structure_not_in_pixels():
    """A linear model on the pixels stays near chance, while the same linear model on a
    translation- and phase-invariant spatial feature (the power spectrum) separates the classes:
    the label is in oriented spatial structure, which is what convolutions detect."""
    (x_train, y_train), (x_test, y_test) = synthetic(num_train=1500, num_test=500, seed=1)

    def pixels(x):
        return x.reshape(len(x), -1).astype(np.float32) / 255.0

    def log_power_spectrum(x):
        x = x.astype(np.float32) / 255.0
        x = x - x.mean(axis=(2, 3), keepdims=True)
        power = (np.abs(np.fft.rfft2(x)) ** 2).sum(axis=1)  # summed over colour channels
        return np.log1p(power).reshape(len(x), -1).astype(np.float32)

    pixel_accuracy = softmax_regression_accuracy(pixels(x_train), y_train, pixels(x_test), y_test)
    spectrum_accuracy = softmax_regression_accuracy(
        log_power_spectrum(x_train), y_train, log_power_spectrum(x_test), y_test
    )
    assert pixel_accuracy < 0.25, pixel_accuracy  # chance is 0.10
    assert spectrum_accuracy > 0.9, spectrum_accuracy


@pytest.mark.slow
def test_synthetic_is_learned_by_a_small_cnn_within_two_epochs():
    """The dataset's promise, checked with PyTorch as an independent engine: a 2-conv CNN with
    about 10k parameters passes 95% held-out accuracy after two epochs of 10k images."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = synthetic(num_train=10_000, num_test=2_000, seed=0)
    normalize = Normalize(0.5, 0.25)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    assert 9_000 < sum(p.numel() for p in net.parameters()) < 11_000
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader((x_train, y_train), batch_size=64, shuffle=True, seed=0, transform=normalize, as_tensors=False)
    for _ in range(2):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = net(torch.from_numpy(normalize(x_test))).argmax(1).numpy()
    assert (predictions == y_test).mean() >= 0.95
