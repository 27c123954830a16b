"""Linear-algebra side of Theorem 2: the iteration matrix ``A`` of Eq. 15 and the SGD analogue.

In the infinite-width (linear) limit, the residual ``e = f - y`` evolves under a step on batch
``B`` as ``e <- e - G[:, B] P_B e_B``, with ``P_B = G_BB^{-1}`` for GGN (Eq. 10) and
``P_B = lr I`` for SGD on the loss ``1/2 sum_{i in B} e_i^2``. Chaining the ``k`` batches of one
epoch gives the per-epoch map: ``A = L^T (D - L)^{-1}`` for GGN (block Gauss-Seidel on
``G r = e_0``, written for its residual), the product of the SGD factors for SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _batches(n: int, batch_size: int) -> list[slice]:
    if batch_size <= 0 or n % batch_size:
        raise ValueError(f"n = {n} must be a positive multiple of the batch size {batch_size}")
    return [slice(i, i + batch_size) for i in range(0, n, batch_size)]


def block_split(gram: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """``D`` (block diagonal) and ``L`` with ``gram = D - L - L^T`` (``-L`` strictly block-lower).

    ``gram`` is ``(n, n)`` with ``n = b k``; both results are ``(n, n)``.
    """
    blocks = _batches(gram.shape[0], batch_size)
    diag = torch.zeros_like(gram)
    for s in blocks:
        diag[s, s] = gram[s, s]
    lower = torch.tril(gram) - torch.tril(diag)
    return diag, -lower


def iteration_matrix(gram: Tensor, batch_size: int) -> Tensor:
    """``A = L^T (D - L)^{-1}`` of Eq. 15, ``(n, n)``: one epoch of cyclic mini-batch GGN."""
    diag, low = block_split(gram, batch_size)
    # A^T = (D - L)^{-T} L: a solve, not an inverse.
    return torch.linalg.solve((diag - low).T, low).T


def sgd_epoch_matrix(gram: Tensor, batch_size: int, lr: float) -> Tensor:
    """Per-epoch residual map of cyclic SGD with step ``lr`` on ``1/2 sum_B e_i^2``, ``(n, n)``."""
    n = gram.shape[0]
    epoch = torch.eye(n, dtype=gram.dtype)
    for s in _batches(n, batch_size):
        # (I - lr G[:, B] E_B^T) @ epoch as a rank-b update.
        epoch = epoch - lr * gram[:, s] @ epoch[s, :]
    return epoch


def spectral_radius(mat: Tensor) -> float:
    """Largest modulus of the eigenvalues of a square matrix."""
    return float(torch.linalg.eigvals(mat).abs().max())


@dataclass(frozen=True)
class SgdRate:
    """Best constant learning rate of cyclic SGD on the linearised problem.

    Attributes:
        lr: learning rate minimising the per-epoch spectral radius (on the loss summed over the
            batch).
        rho: that spectral radius.
        lr_max: largest learning rate on the search grid that is still stable (``rho < 1``).
        lr_batch: ``1 / max_B lambda_max(G_BB)``, the usual per-batch step size, for reference.
        rho_batch: spectral radius at ``lr_batch``.
    """

    lr: float
    rho: float
    lr_max: float
    lr_batch: float
    rho_batch: float


# A spectral radius this close to 1 is 1 up to round-off: a singular ``G`` leaves its null
# directions untouched at every ``lr`` (radius exactly 1, computed as 1 -+ 2e-16).
CONTRACTION_ROUNDOFF = 1e-12


def best_sgd_rate(gram: Tensor, batch_size: int, grid: int = 400) -> SgdRate:
    """Scan ``lr`` over ``[1e-2, 4] / max_B lambda_max(G_BB)`` (log grid) for the fastest stable SGD.

    Raises ``ValueError`` when no ``lr`` of the grid contracts (radius ``< 1 - 1e-12``), as for a
    singular ``G`` (``M d < n``): the "best" rate was then picked by round-off, or the scan ended
    in ``min() arg is an empty sequence``.
    """
    top = max(float(torch.linalg.eigvalsh(gram[s, s])[-1]) for s in _batches(gram.shape[0], batch_size))
    lrs = torch.logspace(-2, float(torch.log10(torch.tensor(4.0))), grid, dtype=torch.float64) / top
    rhos = [spectral_radius(sgd_epoch_matrix(gram, batch_size, float(lr))) for lr in lrs]
    stable = [i for i, r in enumerate(rhos) if r < 1.0 - CONTRACTION_ROUNDOFF]
    if not stable:
        raise ValueError(
            f"cyclic SGD contracts at no learning rate in [{float(lrs[0]):.3g}, {float(lrs[-1]):.3g}]: the smallest "
            f"per-epoch spectral radius is {min(rhos):.16g} (lambda_min(G) = {float(torch.linalg.eigvalsh(gram)[0]):.2g}:"
            " a singular Gram matrix leaves its null directions untouched)"
        )
    best = min(stable, key=lambda i: rhos[i])
    return SgdRate(
        lr=float(lrs[best]),
        rho=rhos[best],
        lr_max=float(lrs[max(stable)]),
        lr_batch=1.0 / top,
        rho_batch=spectral_radius(sgd_epoch_matrix(gram, batch_size, 1.0 / top)),
    )
