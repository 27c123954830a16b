"""Datasets of ``(input, target)`` pairs with float targets and their normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass(frozen=True)
class TargetScale:
    """Maps model targets to the original unit: ``original = mean + std * target``."""

    mean: float = 0.0
    std: float = 1.0
    unit: str = ""

    def to_original(self, target: Tensor) -> Tensor:
        return self.mean + self.std * target

    def rmse_in_unit(self, mse: float) -> float:
        """Root mean squared error in the original unit, from an MSE on normalised targets."""
        return float(mse) ** 0.5 * abs(self.std)


def fit_scale(train_values: Tensor, unit: str, name: str = "") -> TargetScale:
    """Normalisation from training targets ``(n,)``: their mean and (population) standard deviation.

    Raises:
        ValueError: there is no target; the message starts with the data set's ``name``.
    """
    if train_values.numel() == 0:
        raise ValueError(f"{name or 'data set'}: no training targets to normalise with: every item was bad or missing")
    values = train_values.double()
    std = float(values.std(unbiased=False)) if values.numel() > 1 else 0.0
    return TargetScale(mean=float(values.mean()), std=std if std > 0 else 1.0, unit=unit)


def permuted_parts(n: int, seed: int, train_fraction: float = 0.8) -> tuple[Tensor, Tensor]:
    """A ``seed``-ed permutation of ``range(n)`` cut after its first ``round(train_fraction * n)``
    items: ``(first, rest)``, each in the permutation's order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * n))
    return order[:n_train], order[n_train:]


def split_indices(n: int, split: str, seed: int, train_fraction: float = 0.8) -> Tensor:
    """Indices ``(n_split,)`` of ``split`` in a seeded permutation of ``range(n)``, sorted.

    The first ``round(train_fraction * n)`` permuted items are ``"train"``, the rest ``"test"``
    (:func:`permuted_parts`).
    """
    first, rest = permuted_parts(n, seed, train_fraction)
    return (first if split == "train" else rest).sort().values


class TensorRegressionDataset(Dataset):
    """In-memory regression data: ``inputs`` ``(n, ...)``, ``targets`` ``(n,)`` or ``(n, k)`` float.

    ``inputs`` are float, or ``uint8`` images ``(n, C, H, W)`` kept compact (AFAD at 64x64 is
    0.7 GB as bytes, 2.9 GB as floats) and returned by ``__getitem__`` as floats in [0, 1].

    Attributes:
        scale: how the (normalised) targets map back to the original unit.
        name: data set name, for logs and figure titles.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, scale: TargetScale = TargetScale(), name: str = ""):
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
        if not bool(torch.isfinite(targets).all()):
            raise ValueError(f"{name or 'dataset'}: targets contain NaN or Inf")
        self.inputs = inputs if inputs.dtype == torch.uint8 else inputs.float()
        self.targets = targets.float()
        self.scale = scale
        self.name = name

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.inputs[index]
        return (x.float() / 255.0 if x.dtype == torch.uint8 else x), self.targets[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])


def standardise_images(images: Tensor, train_images: Tensor) -> Tensor:
    """``images`` ``(n, C, H, W)`` minus the per-channel mean of ``train_images`` ``(n_train, C, H, W)``,
    divided by its per-channel (population) standard deviation (1 where that is 0)."""
    train = train_images.double()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((images.double() - mean) / std).to(images.dtype)
