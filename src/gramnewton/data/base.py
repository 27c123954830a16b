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


class TensorRegressionDataset(Dataset):
    """In-memory regression data: ``inputs`` ``(n, ...)`` float, ``targets`` ``(n,)`` or ``(n, k)`` float.

    Attributes:
        scale: how the (normalised) targets map back to the original unit.
        name: data set name, for logs and figure titles.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, scale: TargetScale = TargetScale(), name: str = ""):
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
        if not bool(torch.isfinite(targets).all()):
            raise ValueError(f"{name or 'dataset'}: targets contain NaN or Inf")
        self.inputs = inputs.float()
        self.targets = targets.float()
        self.scale = scale
        self.name = name

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])
