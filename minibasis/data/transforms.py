"""Batch-level image transforms on NumPy arrays of shape (N, C, H, W).

Every transform is a callable ``transform(images, rng)`` that returns a new array and never
modifies its input. Random transforms draw everything from the ``numpy.random.Generator`` they
are given (nothing from global state), so a ``DataLoader`` that derives that generator from
(seed, epoch, batch) makes augmentation reproducible, including after a resume. Deterministic
transforms accept and ignore ``rng``.

Per-image randomness is vectorised: one call draws the parameters for the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from minibasis.checks import non_negative_int, positive_pair, probability

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ToFloat",
    "eval_transform",
    "train_transform",
]

# Per-channel statistics on the [0, 1] scale, as torchvision's Normalize expects them.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The akamaster pretrained CIFAR ResNets were trained with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: name → (mean, std) per channel: the input normalizations model files record by name.
NORMALIZATIONS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}

Transform = Callable[[np.ndarray, "np.random.Generator | None"], np.ndarray]


def _check_batch(images, who: str) -> np.ndarray:
    """The batch as given, after checking it is a 4-D numeric array (N, C, H, W)."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{who}: expected a numpy array (N, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{who}: expected images of shape (N, C, H, W), got shape {images.shape}")
    if images.dtype != np.uint8 and images.dtype.kind != "f":
        raise ValueError(f"{who}: expected uint8 or floating images, got dtype {images.dtype}")
    return images


def _check_rng(rng, who: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{who}: expected a numpy.random.Generator for its randomness, got {type(rng).__name__}"
        )
    return rng


class ToFloat:
    """uint8 in [0, 255] → float32 in [0, 1]; floating input is taken as already on that scale
    and only cast to float32. Shape (N, C, H, W) is kept."""

    def __call__(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        images = _check_batch(images, "ToFloat")
        if images.dtype == np.uint8:
            return images.astype(np.float32) / np.float32(255.0)
        return images.astype(np.float32)  # astype copies, so the caller's array stays untouched

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """``(x - mean[c]) / std[c]`` per channel, float32 out.

    ``mean`` and ``std`` are per-channel values on the [0, 1] scale (as in torchvision), or one
    number for all channels. uint8 input is first converted with ``ToFloat`` (divided by 255).
    """

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float):
        try:
            self.mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
            self.std = np.atleast_1d(np.asarray(std, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError("Normalize: mean and std must be numbers or sequences of numbers, "
                            f"got mean={mean!r}, std={std!r}") from None
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values.ndim != 1 or not np.all(np.isfinite(values)):
                raise ValueError(
                    f"Normalize: {name} must be a finite number or a 1-D sequence, got {values!r}"
                )
        if self.mean.shape != self.std.shape and 1 not in (self.mean.size, self.std.size):
            raise ValueError(
                f"Normalize: mean and std need the same length, got {self.mean.size} and {self.std.size}"
            )
        if np.any(self.std <= 0):
            raise ValueError(f"Normalize: std must be > 0, got {self.std.tolist()}")
        self._to_float = ToFloat()

    def __call__(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        images = self._to_float(images)
        channels = images.shape[1]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values.size not in (1, channels):
                raise ValueError(
                    f"Normalize: {name} has {values.size} values but the images have "
                    f"{channels} channels (shape {images.shape})"
                )
        mean = self.mean.astype(np.float32)[:, None, None]
        std = self.std.astype(np.float32)[:, None, None]
        images -= mean  # in place on the fresh float32 copy
        images /= std
        return images

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class RandomCrop:
    """Zero-pad each image by ``padding`` on all four sides, then cut a ``size`` crop at an
    offset drawn independently per image (uniform over all valid offsets).

    ``size`` is an int (square) or (height, width). Input (N, C, H, W) → (N, C, size_h, size_w),
    dtype kept.
    """

    def __init__(self, size: int | tuple[int, int] = 32, padding: int = 4):
        self.size = positive_pair("RandomCrop: size", size)
        self.padding = non_negative_int("RandomCrop: padding", padding)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        images = _check_batch(images, "RandomCrop")
        rng = _check_rng(rng, "RandomCrop")
        n, _, height, width = images.shape
        crop_h, crop_w = self.size
        pad = self.padding
        padded_h, padded_w = height + 2 * pad, width + 2 * pad
        if crop_h > padded_h or crop_w > padded_w:
            raise ValueError(
                f"RandomCrop: crop {self.size} does not fit images of {height}x{width} "
                f"padded by {pad} ({padded_h}x{padded_w})"
            )
        offset_y = rng.integers(0, padded_h - crop_h + 1, size=n)
        offset_x = rng.integers(0, padded_w - crop_w + 1, size=n)
        padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        # windows[i, c, y, x] is the crop whose top-left corner is (y, x): a view, no copy.
        windows = sliding_window_view(padded, (crop_h, crop_w), axis=(2, 3))
        # Advanced indices split by a slice put the batch axis first: (N, C, crop_h, crop_w).
        return windows[np.arange(n), :, offset_y, offset_x]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``, independently per image."""

    def __init__(self, p: float = 0.5):
        self.p = probability("RandomHorizontalFlip: p", p)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        images = _check_batch(images, "RandomHorizontalFlip")
        rng = _check_rng(rng, "RandomHorizontalFlip")
        flip = rng.random(images.shape[0]) < self.p
        out = images.copy()
        out[flip] = images[flip, :, :, ::-1]
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order, handing the same generator to each (so together they consume
    one reproducible stream)."""

    def __init__(self, transforms: Sequence[Transform]):
        if not isinstance(transforms, (list, tuple)):
            raise TypeError(f"Compose: expected a sequence (list or tuple) of transforms, "
                            f"got {type(transforms).__name__}")
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"Compose: every transform must be callable, got {type(t).__name__}")

    def __call__(self, images: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        for t in self.transforms:
            images = t(images, rng)
        return images

    def __repr__(self) -> str:
        return "Compose([" + ", ".join(repr(t) for t in self.transforms) + "])"


def _normalize_step(normalization: str) -> list:
    if normalization == "none":
        return []
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of "
                         f"{', '.join([*NORMALIZATIONS, 'none'])}")
    return [Normalize(*NORMALIZATIONS[normalization])]


def eval_transform(normalization: str = "cifar10") -> Compose:
    """The test-time recipe: uint8 → float32 in [0, 1] → per-channel ``normalization`` (a key of
    :data:`NORMALIZATIONS`, or "none")."""
    return Compose([ToFloat(), *_normalize_step(normalization)])


def train_transform(normalization: str = "cifar10", augment: bool = True, image_size: int = 32) -> Compose:
    """The training recipe: random crop (padding 4) and horizontal flip (unless ``augment`` is
    False), then :func:`eval_transform`'s steps."""
    steps = [RandomCrop(image_size, padding=4), RandomHorizontalFlip()] if augment else []
    return Compose([*steps, ToFloat(), *_normalize_step(normalization)])
