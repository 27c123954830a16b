"""Data set registry: ``get_dataset(name, root=None, split="train", **kwargs)``."""

from __future__ import annotations

from typing import Any, Callable

from torch.utils.data import Dataset

DatasetBuilder = Callable[..., Dataset]
_BUILDERS: dict[str, DatasetBuilder] = {}
SPLITS = ("train", "test")


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator registering a builder ``(root, split, **kwargs) -> Dataset``; duplicates raise."""

    def decorator(builder: DatasetBuilder) -> DatasetBuilder:
        if name in _BUILDERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def get_dataset(name: str, root: str | None = None, split: str = "train", **kwargs: Any) -> Dataset:
    """Load split ``split`` (``"train"`` or ``"test"``) of data set ``name``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}") from None
    return builder(root=root, split=split, **kwargs)


def list_datasets() -> list[str]:
    """Names of all registered data sets, sorted."""
    return sorted(_BUILDERS)
