"""Regression data sets: the embedded rotated-digit tasks and loaders for the paper's data."""

from . import rotated  # noqa: F401  (registers the builders)
from .base import TargetScale, TensorRegressionDataset
from .registry import get_dataset, list_datasets, register_dataset

__all__ = ["TargetScale", "TensorRegressionDataset", "get_dataset", "list_datasets", "register_dataset"]
