"""Datasets, batching and augmentation (host-side NumPy)."""
from minibasis.data.loader import ArrayDataset, DataLoader, augmentation_generator, epoch_permutation
from minibasis.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_NUM_CLASSES, synthetic, synthetic_class_names
from minibasis.data.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToFloat,
)
from minibasis.data.files import DatasetError, DatasetSplits, load_cifar10, load_cifar100, load_svhn
