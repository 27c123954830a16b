"""Regression data sets: the embedded rotated-digit tasks, the rotated Fashion-MNIST stand-in,
loaders for local copies of AFAD-Lite and RSNA Bone Age, and tabular sets; classification data
sets: digits, mnist, fashion-mnist (:mod:`.classification`)."""

from . import afad, classification, fashion, rotated, rsna, tabular  # noqa: F401  (registers the builders)
from .bad import BadDataError
from .base import TargetScale, TensorRegressionDataset
from .cache import default_cache_dir
from .classification import TensorClassificationDataset, accuracy, is_classification
from .idx import IDXError, read_idx
from .registry import get_dataset, list_datasets, register_dataset

__all__ = [
    "BadDataError",
    "IDXError",
    "TargetScale",
    "TensorClassificationDataset",
    "TensorRegressionDataset",
    "accuracy",
    "default_cache_dir",
    "get_dataset",
    "is_classification",
    "list_datasets",
    "read_idx",
    "register_dataset",
]
