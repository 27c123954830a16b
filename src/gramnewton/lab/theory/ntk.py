"""The infinite-width Gram matrix of Eq. 13 and its least eigenvalue ``lambda_0``.

``K(x_i, x_j) = (x_i . x_j) E_w[sigma'(w . x_i) sigma'(w . x_j)]`` with ``w ~ N(0, I_d)``. For
unit inputs, ``(w . x_i, w . x_j)`` is a standard bivariate normal pair with correlation
``rho = x_i . x_j``, so the expectation is a two-dimensional Gaussian integral. Softplus has no
closed form (``sigma'`` is the logistic function), so it is computed by tensor-product
Gauss-Hermite quadrature, writing ``v = rho u + sqrt(1 - rho^2) z`` with ``u, z`` independent.
The logistic function is analytic in the strip ``|Im z| < pi``, so the quadrature converges
geometrically: deterministic and far more accurate than a Monte Carlo sample. ReLU's
``sigma'`` is a step, on which the quadrature converges slowly (entries 1.4e-2 off at 120 nodes,
``lambda_0`` 10% low at ``n = 64, d = 10``); its expectation is an orthant probability,
``(pi - arccos rho) / (2 pi)``, used exactly instead (``K`` is then the ``H^infty`` of Du et al.).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .activation import activation_derivative


def gaussian_pair_expectation(act: nn.Module, corr: Tensor, nodes: int = 120) -> Tensor:
    """``E[sigma'(u) sigma'(v)]`` for standard normal ``(u, v)`` with correlation ``corr``.

    Args:
        act: elementwise activation ``sigma``, smooth (the quadrature converges geometrically for
            ``sigma'`` analytic near the real axis), or ``nn.ReLU``, computed in closed form.
        corr: correlations of any shape, clamped to ``[-1, 1]``.
        nodes: Gauss-Hermite nodes per dimension.

    Returns:
        Tensor shaped like ``corr``, float64.
    """
    if type(act) is nn.ReLU:
        # P(u > 0, v > 0) for a standard normal pair with correlation rho (Sheppard's formula).
        return (math.pi - torch.arccos(corr.to(torch.float64).clamp(-1.0, 1.0))) / (2.0 * math.pi)
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
    """``K`` of Eq. 13 for unit-norm inputs ``x`` of shape ``(n, d)``; returns ``(n, n)`` float64.

    A norm off 1 by more than ``max(1e-12, 8 eps)`` of ``x``'s dtype (a normalisation's round-off
    measured at most 2.5 eps, ``d <= 1000``) is refused: the formula is that of unit inputs, and
    ``allclose``'s default ``rtol`` let norms of ``1 +- 1e-5`` through.
    """
    eps = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
    x = x.to(torch.float64)
    norms = x.norm(dim=1)
    off = float((norms - 1).abs().max())
    if not off <= max(1e-12, 8 * eps):
        raise ValueError(f"ntk_limit expects inputs on the unit sphere (||x_i|| = 1); a norm is off 1 by {off:.2g}")
    inner = x @ x.T
    return inner * gaussian_pair_expectation(act, inner, nodes)


def least_eigenvalue(sym: Tensor) -> float:
    """Smallest eigenvalue of a symmetric ``(n, n)`` matrix (symmetrised first)."""
    return float(torch.linalg.eigvalsh(0.5 * (sym + sym.T))[0])


def positive_lambda_0(kernel: Tensor, x: Tensor) -> float:
    """``lambda_0 = lambda_min(K)`` of ``kernel`` ``(n, n)`` on inputs ``x`` ``(n, d)``, checked positive.

    Theorems 1 and 2 assume ``lambda_0 > 0``. Raises ``ValueError`` when it is not above float64
    round-off, ``n * eps * lambda_max`` (the cut-off under which :mod:`gramnewton.solve` treats an
    eigenvalue as zero), naming two equal inputs if there are any: with ``d = 1`` every input is
    ``+1`` or ``-1``, and with ``d = 2`` the softplus ``K`` of 64 distinct points is already
    singular in float64 (``lambda_min = -1.6e-15``). A study run on such a ``K`` reported
    ``lambda_0 = -2.7e-16`` and constants ``C_t`` of 20-30 that mean nothing.
    """
    eigs = torch.linalg.eigvalsh(0.5 * (kernel + kernel.T))
    n = kernel.shape[0]
    cutoff = n * torch.finfo(torch.float64).eps * float(eigs[-1].abs())
    least = float(eigs[0])
    if least > cutoff:
        return least
    equal = (x[:, None, :] == x[None, :, :]).all(-1).triu(1).nonzero()
    why = f"inputs {int(equal[0, 0])} and {int(equal[0, 1])} are equal" if len(equal) else "the inputs are too close"
    raise ValueError(
        f"lambda_0 = lambda_min(K) = {least:.3g} is not above round-off ({n} * eps * lambda_max = {cutoff:.2g}): "
        f"K is singular ({why}), and Theorems 1 and 2 need lambda_0 > 0; use more input dimensions or fewer samples"
    )
