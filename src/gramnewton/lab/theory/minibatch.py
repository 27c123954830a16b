"""Theorem 2 measured: cyclic mini-batch GGN against the spectral radius of ``A`` (Eq. 15).

At each width the initial Gram matrix ``G_0`` gives ``A = L^T (D - L)^{-1}`` and ``rho(A)``;
mini-batch GGN (``lam = 1``, ``alpha = 0``) runs for some epochs, and its per-epoch contraction
``||f_{(t+1)k} - y|| / ||f_{tk} - y||`` is compared with ``rho(A)`` and with the linear
prediction ``||A^t (f_0 - y)||``. The same is done for cyclic SGD at the constant learning rate
that minimises the per-epoch spectral radius of its own linearised map (see
:func:`gramnewton.lab.theory.gauss_seidel.best_sgd_rate`), the fastest stable SGD on this problem.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from torch import Tensor

from .closed_form import make_engine
from .gauss_seidel import SgdRate, best_sgd_rate, iteration_matrix, sgd_epoch_matrix, spectral_radius
from .quadratic import RESIDUAL_FLOOR, seeded_two_layer
from .runs import ggn_batch_step, residual, run_epochs, sgd_batch_step


def tail_contraction(norms: list[float]) -> float:
    """Geometric-mean per-epoch contraction over the second half of the epochs above round-off.

    ``norms`` are per-epoch residual norms; the first half is left out because fast modes
    dominate early epochs, and the mean smooths the oscillation of complex eigenvalue pairs.
    """
    valid = [r for r in norms if r > RESIDUAL_FLOOR]
    if len(valid) < 3:
        return float("nan")
    start = len(valid) // 2
    return (valid[-1] / valid[start]) ** (1.0 / (len(valid) - 1 - start))


def predicted_norms(epoch_map: Tensor, e0: Tensor, epochs: int) -> list[float]:
    """``||M^t e0||`` for ``t = 0..epochs``: the infinite-width (linear) prediction."""
    out, e = [float(e0.norm())], e0
    for _ in range(epochs):
        e = epoch_map @ e
        out.append(float(e.norm()))
    return out


@dataclass(frozen=True)
class MinibatchRun:
    """One width. Norm lists have ``epochs + 1`` entries, one per epoch boundary.

    Attributes:
        rho_a: ``rho(A)`` from this network's ``G_0``.
        ggn_norms / ggn_predicted: measured / ``||A^t e_0||``.
        ggn_contraction / ggn_predicted_contraction: :func:`tail_contraction` of those.
        sgd_lr, rho_sgd: best SGD learning rate from ``G_0`` and its per-epoch spectral radius.
        sgd_norms / sgd_predicted, sgd_contraction / sgd_predicted_contraction: the same for SGD.
    """

    width: int
    rho_a: float
    ggn_norms: list[float]
    ggn_predicted: list[float]
    ggn_contraction: float
    ggn_predicted_contraction: float
    sgd_lr: float
    rho_sgd: float
    sgd_norms: list[float]
    sgd_predicted: list[float]
    sgd_contraction: float
    sgd_predicted_contraction: float


def minibatch_run(
    x: Tensor,
    y: Tensor,
    width: int,
    batch_size: int,
    epochs: int,
    seed: int,
    act: str = "softplus",
    engine: str = "closed_form",
) -> MinibatchRun:
    """GGN and SGD from the same initialisation at width ``width``; ``x`` ``(n, d)``, ``y`` ``(n,)``."""
    model = seeded_two_layer(x.shape[1], width, act, seed)
    twin = copy.deepcopy(model)
    e0 = residual(model, x, y)
    g0 = make_engine(engine, model, x).compute(lambda: model(x).squeeze(1) - y).gram
    a_mat = iteration_matrix(g0, batch_size)
    sgd = best_sgd_rate(g0, batch_size)
    ggn_norms = [float(r.norm()) for r in run_epochs(model, x, y, batch_size, epochs, ggn_batch_step(model, engine))]
    sgd_norms = [float(r.norm()) for r in run_epochs(twin, x, y, batch_size, epochs, sgd_batch_step(twin, sgd.lr))]
    ggn_pred = predicted_norms(a_mat, e0, epochs)
    sgd_pred = predicted_norms(sgd_epoch_matrix(g0, batch_size, sgd.lr), e0, epochs)
    return MinibatchRun(
        width=width,
        rho_a=spectral_radius(a_mat),
        ggn_norms=ggn_norms,
        ggn_predicted=ggn_pred,
        ggn_contraction=tail_contraction(ggn_norms),
        ggn_predicted_contraction=tail_contraction(ggn_pred),
        sgd_lr=sgd.lr,
        rho_sgd=sgd.rho,
        sgd_norms=sgd_norms,
        sgd_predicted=sgd_pred,
        sgd_contraction=tail_contraction(sgd_norms),
        sgd_predicted_contraction=tail_contraction(sgd_pred),
    )


@dataclass
class MinibatchStudy:
    """All runs of ``gramnewton theory minibatch``; the ``*_limit`` rates come from ``K``.

    ``sgd_limit`` is :func:`~gramnewton.lab.theory.gauss_seidel.best_sgd_rate` of ``K`` (best and
    per-batch ``1 / lambda_max`` learning rates with their per-epoch spectral radii).
    """

    n: int
    d: int
    batch_size: int
    epochs: int
    act: str
    lambda_0: float
    rho_a_limit: float
    sgd_limit: SgdRate
    runs: list[MinibatchRun] = field(default_factory=list)

    def first_matching_width(self, tol: float = 0.05) -> int | None:
        """Smallest width from which on ``1 - contraction`` is within ``tol`` (relative) of ``1 - rho(A)``."""
        ok = [_close_rates(r.ggn_contraction, r.rho_a, tol) for r in self.runs]
        for i, run in enumerate(self.runs):
            if all(ok[i:]):
                return run.width
        return None


def _close_rates(rate: float, reference: float, tol: float) -> bool:
    """``1 - rate`` within a factor ``exp(tol)`` of ``1 - reference`` (``False`` for NaN or a rate >= 1)."""
    if not (rate < 1 and reference < 1):
        return False
    return abs(math.log((1 - rate) / (1 - reference))) <= tol
