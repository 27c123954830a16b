"""The infinite-width Gram matrix of Eq. 13 and its least eigenvalue ``lambda_0``.

``K(x_i, x_j) = (x_i . x_j) E_w[sigma'(w . x_i) sigma'(w . x_j)]`` with ``w ~ N(0, I_d)``. For
unit inputs, ``(w . x_i, w . x_j)`` is a standard bivariate normal pair with correlation
``rho = x_i . x_j``, so the expectation is a two-dimensional Gaussian integral. Softplus has no
closed form (``sigma'`` is the logistic function), so it is computed by tensor-product
Gauss-Hermite quadrature, writing ``v = rho u + sqrt(1 - rho^2) z`` with ``u, z`` independent.
The logistic function is analytic in the strip ``|Im z| < pi``, so the quadrature converges
geometrically: deterministic and far more accurate than a Monte Carlo sample.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .activation import activation_derivative


def gaussian_pair_expectation(act: nn.Module, corr: Tensor, nodes: int = 120) -> Tensor:
    """``E[sigma'(u) sigma'(v)]`` for standard normal ``(u, v)`` with correlation ``corr``.

    Args:
        act: elementwise activation ``sigma``.
        corr: correlations of any shape, clamped to ``[-1, 1]``.
        nodes: Gauss-Hermite nodes per dimension.

    Returns:
        Tensor shaped like ``corr``, float64.
    """
    z_np, w_np = np.polynomial.hermite_e.hermegauss(nodes)
    z = torch.as_tensor(z_np, dtype=torch.float64)
    w = torch.as_tensor(w_np / np.sqrt(2.0 * np.pi), dtype=torch.float64)  # weights of N(0, 1)
    rho = corr.to(torch.float64).clamp(-1.0, 1.0).unsqueeze(-1)  # (..., 1)
    comp = torch.sqrt(1.0 - rho.square())
    slope_u = activation_derivative(act, z)
    total = torch.zeros_like(corr, dtype=torch.float64)
    # One outer node at a time keeps memory at (..., nodes) instead of (..., nodes, nodes).
    for u, wu, su in zip(z, w, slope_u):
        slope_v = activation_derivative(act, rho * u + comp * z)  # (..., nodes)
        total += wu * su * (slope_v @ w)
    return total


def ntk_limit(x: Tensor, act: nn.Module, nodes: int = 120) -> Tensor:
    """``K`` of Eq. 13 for unit-norm inputs ``x`` of shape ``(n, d)``; returns ``(n, n)`` float64."""
    x = x.to(torch.float64)
    norms = x.norm(dim=1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-12):
        raise ValueError("ntk_limit expects inputs on the unit sphere (||x_i|| = 1)")
    inner = x @ x.T
    return inner * gaussian_pair_expectation(act, inner, nodes)


def least_eigenvalue(sym: Tensor) -> float:
    """Smallest eigenvalue of a symmetric ``(n, n)`` matrix (symmetrised first)."""
    return float(torch.linalg.eigvalsh(0.5 * (sym + sym.T))[0])
