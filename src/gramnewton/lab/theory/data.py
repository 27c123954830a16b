"""Seeded regression data on the unit sphere, as Theorems 1 and 2 assume (||x|| = 1, |y| = O(1))."""

from __future__ import annotations

import torch
from torch import Tensor


def sphere_data(n: int, d: int, seed: int, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """``n`` points uniform on the unit sphere of ``R^d`` and targets ``sin(3 u.x) + noise * N(0, 1)``.

    ``u`` is a fixed random unit vector; the smooth part keeps ``|y| <= 1`` up to the noise.

    Drawn on the CPU (a CPU generator cannot draw a tensor on a GPU default device), the same
    data for a seed on every device, then moved to torch's default device.

    Returns:
        ``x`` of shape ``(n, d)`` and ``y`` of shape ``(n,)``, float64, on the default device.
    """
    cpu = {"generator": torch.Generator().manual_seed(seed), "dtype": torch.float64, "device": "cpu"}
    x = torch.randn(n, d, **cpu)
    x = x / x.norm(dim=1, keepdim=True)
    u = torch.randn(d, **cpu)
    u = u / u.norm()
    y = torch.sin(3.0 * (x @ u)) + noise * torch.randn(n, **cpu)
    device = torch.get_default_device()
    return x.to(device), y.to(device)
