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
    eval_transform,
    train_transform,
)
from minibasis.data.datasets import DatasetError, DatasetSplits, load_cifar10, load_cifar100, load_svhn
from minibasis.data.catalog import DATASET_CLASSES, DATASETS, load_dataset, take_subset
