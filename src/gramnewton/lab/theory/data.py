"""Seeded regression data on the unit sphere, as Theorems 1 and 2 assume (||x|| = 1, |y| = O(1))."""

from __future__ import annotations

import torch
from torch import Tensor


def sphere_data(n: int, d: int, seed: int, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """``n`` points uniform on the unit sphere of ``R^d`` and targets ``sin(3 u.x) + noise * N(0, 1)``.

    ``u`` is a fixed random unit vector; the smooth part keeps ``|y| <= 1`` up to the noise.

    Returns:
        ``x`` of shape ``(n, d)`` and ``y`` of shape ``(n,)``, float64.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    y = torch.sin(3.0 * (x @ u)) + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y
