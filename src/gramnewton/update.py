"""One Gram-Gauss-Newton update as separate units: curvature, solve, apply.

``gram_gauss_newton_direction`` computes ``-J^T (lam G + alpha I)^{-1} (f - y)`` for a closure;
``apply_direction`` writes it into the parameters all at once, or not at all.
``full_batch_step`` is Eq. 9 of the paper (and Eq. 11 with ``alpha > 0``) as a plain function.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .engines import Closure, GramEngine, ReferenceEngine
from .engines.reference import split_like
from .solve import SingularGramError, SolveInfo, check_damping, damped_solve, jacobian_solve


@dataclass(frozen=True)
class GramGaussNewtonStep:
    """A computed, not yet applied, update.

    Attributes:
        direction: one tensor per parameter, ``-J^T (lam G + alpha I)^{-1} (f - y)``.
        residuals: ``(b, k)`` residuals before the update.
        gram: ``(b*k, b*k)`` Gram matrix ``J J^T``.
        coefficients: ``(b*k,)`` solution ``(lam G + alpha I)^{-1} (f - y)``.
        solve_info: how the damped system was solved.
        mean_loss: the batch's mean loss before the update when the step is that of a general
            loss (:mod:`gramnewton.generalized`; ``residuals`` then hold the pseudo-residuals
            ``u``), else ``None``.
    """

    direction: list[Tensor]
    residuals: Tensor
    gram: Tensor
    coefficients: Tensor
    solve_info: SolveInfo
    mean_loss: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """Mean loss before the update (a detached scalar): the mean squared residual, or
        ``mean_loss`` for a general loss."""
        return self.residuals.pow(2).mean() if self.mean_loss is None else self.mean_loss


def gram_gauss_newton_direction(
    engine: GramEngine,
    closure: Closure,
    *,
    lam: float,
    alpha: float,
    solve_dtype: torch.dtype | None = None,
) -> GramGaussNewtonStep:
    """Compute the update of Eq. 11 for the residuals returned by ``closure``.

    Raises:
        ValueError: ``lam`` or ``alpha`` out of range, or bad residuals (nothing applied).
        SingularGramError: the loss, Gram matrix, coefficients or direction is not finite
            (parameters are untouched: nothing applied).
    """
    check_damping(lam, alpha)
    system = engine.compute(closure)
    rhs = system.residuals.reshape(-1)
    if not bool(torch.isfinite(rhs.pow(2).sum())):  # finite residuals whose squares overflow
        raise SingularGramError(
            f"the squared residuals overflow {rhs.dtype} (loss not finite; largest |residual| "
            f"{float(rhs.abs().max()):.3g}); rescale the targets or use a float64 model; no parameter was changed"
        )
    if alpha == 0 and system.jacobian is not None:  # undamped: G would square cond(J) (see solve.py)
        jt_c, coefficients, info = jacobian_solve(system.jacobian, rhs, lam, alpha, dtype=solve_dtype)
        direction = [-d for d in split_like(jt_c, engine.params)]
    else:
        coefficients, info = damped_solve(system.gram, rhs, lam, alpha, dtype=solve_dtype)
        direction = [-d for d in system.jt_times(coefficients)]
    if not all(bool(torch.isfinite(d).all()) for d in direction):
        raise SingularGramError(
            "the Gram-Gauss-Newton step is not finite (overflow in J^T r); increase alpha or use "
            "solve_dtype=torch.float64; no parameter was changed"
        )
    return GramGaussNewtonStep(direction, system.residuals, system.gram, coefficients, info)


@torch.no_grad()
def apply_direction(params: Sequence[Tensor], direction: Sequence[Tensor], weight_decay: float = 0.0) -> None:
    """``w <- (1 - weight_decay) * w + d`` for every parameter, after every ``d`` was checked."""
    for p, d in zip(params, direction):
        if weight_decay:
            p.mul_(1.0 - weight_decay)
        p.add_(d.to(p.dtype))


def full_batch_step(
    params: Iterable[Tensor],
    closure: Closure,
    *,
    lam: float = 1.0,
    alpha: float = 0.0,
    engine: GramEngine | None = None,
    solve_dtype: torch.dtype | None = None,
) -> GramGaussNewtonStep:
    """Full-batch GGN, Eq. 9: ``w <- w - J^T G^{-1} (f - y)`` over the whole data set.

    ``closure`` must return the residuals of *all* ``n`` samples; ``alpha = 0`` (the paper's
    full-batch method) is the default. With ``alpha = 0`` and the default reference engine the
    step is solved from ``J`` by a rank-revealing SVD (``-(1/lam) J^+ (f - y)``, the minimum-norm
    least-squares step; cut-off in :mod:`gramnewton.solve`), not from ``G``, whose condition
    number is squared. The parameters are updated in place.

    Returns:
        The applied :class:`GramGaussNewtonStep` (its ``gram`` is ``G_t``, its ``residuals``
        are ``f_t - y``).
    """
    params = list(params)
    step = gram_gauss_newton_direction(
        engine or ReferenceEngine(params), closure, lam=lam, alpha=alpha, solve_dtype=solve_dtype
    )
    apply_direction(params, step.direction)
    return step
