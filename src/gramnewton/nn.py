"""Small parameterised modules that the engines see as layers of their own."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ScalarBias(nn.Module):
    """``x + b`` with one learned scalar ``b`` (Fixup's scalar biases), initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class ScalarScale(nn.Module):
    """``s * x`` with one learned scalar ``s`` (Fixup's branch multiplier), initialised to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale
