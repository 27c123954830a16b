"""A measured prototype, not a product: Gauss-Newton with the curvature of a sub-batch.

Not a test. ``benchmarks/convergence_race.py`` races it as the variant ``sggn:rows=S,alpha=A``
(``lam``, ``momentum`` optional: 16 and 0.9). The step is

    phi_t = (lam (b/s) J_S^T J_S + alpha I)^{-1} (J^T g + alpha mu phi_{t-1}),   w <- w - phi_t,

``J^T g`` the gradient of the batch's summed loss (one ordinary backward over all ``b`` samples,
weight gradients included), ``J_S`` the ``(s, m)`` rows ``B^T J`` of the batch's first ``s``
samples from the hooks engine (the ``"gradient"`` curvature of a general loss: the closure returns
``(outputs, targets)``; the square loss's closures, which return residuals, are not supported),
``lam (b/s)`` scaling the sub-batch's curvature to the batch's. It is
solved in sample space by the Woodbury identity: ``phi = (v - J_S^T c) / alpha`` with
``(alpha I + lam' G_S) c = lam' J_S v``, ``lam' = lam b / s``, ``v`` the right-hand side above.
With ``s = b`` and ``mu = 0`` it is ``GramGaussNewton``'s step (both checked in float64 against
the dense formula in ``tests/test_subsampled_prototype.py``). The question it answers (docs/classification.md, fourteenth session): does the exact
step's per-epoch lead survive a curvature estimated on fewer samples, at a cheaper step? In the
complement of ``J_S``'s row space the step is a gradient step of length ``1 / alpha`` on the
summed loss, so ``alpha`` must be the size of ``b`` over a first-order learning rate.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.generalized import LossClosure


class SubsampledGaussNewton(GramGaussNewton):
    """The step above, fixed ``alpha`` (no damping rule); ``closure(rows)`` as the lab's training step gives it."""

    def __init__(self, model: nn.Module, *, rows: int, lam: float, alpha: float, momentum: float, loss: str):
        super().__init__(model, lam=lam, alpha=alpha, momentum=momentum, loss=loss, adaptive_damping=False)
        self.rows = rows
        self.phi: list[Tensor] | None = None

    def step(self, closure: Callable[..., Any]) -> Tensor:  # type: ignore[override]
        lam, alpha, mu = self._shared("lam"), self._shared("alpha"), self._shared("momentum")
        params = self.engine.params
        system = self.engine.compute(LossClosure(self.loss, lambda: closure(slice(0, self.rows)), "gradient", 1))
        with torch.enable_grad():
            outputs, targets = closure()
            per_sample = self.loss.per_sample(outputs, self.loss.check(outputs, targets))
            v = [g.detach() for g in torch.autograd.grad(per_sample.sum(), params)]
        if mu and self.phi is not None:
            v = [g + (alpha * mu) * p for g, p in zip(v, self.phi)]
        scaled = lam * per_sample.shape[0] / min(self.rows, per_sample.shape[0])  # lam' = lam b / s
        gram = system.gram.double()
        matrix = scaled * gram + alpha * torch.eye(gram.shape[0], dtype=torch.float64)
        c = torch.linalg.solve(matrix, scaled * system.j_times(v).double()).to(v[0].dtype)
        self.phi = [(vi - ji) / alpha for vi, ji in zip(v, system.jt_times(c))]
        with torch.no_grad():
            torch._foreach_sub_(params, self.phi)
        self.last_diagnostics = types.SimpleNamespace(alpha=alpha)  # what the race records
        return per_sample.detach().mean()
