"""Data set registry: ``get_dataset(name, root=None, split="train", **kwargs)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
register_dataset = DATASETS.register
SPLITS = ("train", "test")


def get_dataset(name: str, root: str | None = None, split: str = "train", **kwargs: Any) -> Dataset:
    """Load split ``split`` (``"train"`` or ``"test"``) of data set ``name``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return DATASETS.get(name)(root=root, split=split, **kwargs)


def list_datasets() -> list[str]:
    """Names of all registered data sets, sorted."""
    return DATASETS.names()
