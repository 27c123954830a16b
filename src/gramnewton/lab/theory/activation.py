"""Derivative of an elementwise activation module, by autograd (no per-activation formulas)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def activation_derivative(act: nn.Module, z: Tensor) -> Tensor:
    """``sigma'(z)`` elementwise, same shape as ``z``; ``act`` must act elementwise."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(z).sum(), z)
    return grad
