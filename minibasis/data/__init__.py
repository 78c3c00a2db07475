"""Datasets, batching and augmentation (host-side NumPy)."""
from minibasis.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_NUM_CLASSES, synthetic, synthetic_class_names
