"""The wide two-layer network of the paper's theory (Eq. 12)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .mlp import activation
from .registry import check_sizes, register_model


class TwoLayerNet(nn.Module):
    """``f(x) = (1/sqrt(M)) sum_r a_r sigma(w_r . x)`` (Eq. 12).

    ``W`` (``hidden.weight``, ``(M, d)``) has i.i.d. ``N(0, 1)`` entries and is the only trained
    parameter; ``a`` (``(M,)`` buffer) is uniform on ``{-1, +1}`` and fixed.
    Input ``(b, d)`` (or any shape flattening to ``d``), output ``(b, num_outputs)``; with
    several outputs each has its own fixed ``a``. Raises ``ValueError`` for a size that is not a
    positive integer (``width = 0`` gave NaN outputs, ``0 / sqrt(0)``).
    """

    def __init__(self, in_channels: int, width: int = 4096, act: str = "softplus", num_outputs: int = 1):
        check_sizes(in_channels=in_channels, width=width, num_outputs=num_outputs)
        super().__init__()
        self.width = width
        self.hidden = nn.Linear(in_channels, width, bias=False)
        nn.init.normal_(self.hidden.weight, 0.0, 1.0)
        self.act = activation(act)
        signs = torch.randint(0, 2, (width, num_outputs)).float() * 2 - 1
        self.register_buffer("a", signs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.hidden(x.flatten(1)))
        return h @ self.a.to(h.dtype) / math.sqrt(self.width)


@register_model("two_layer")
def two_layer(in_channels: int, num_outputs: int = 1, width: int = 4096, act: str = "softplus") -> TwoLayerNet:
    """Eq. 12's network; ``in_channels`` is the input dimension ``d``."""
    return TwoLayerNet(in_channels, width=width, act=act, num_outputs=num_outputs)
