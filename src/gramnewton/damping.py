"""Adaptive damping: the rule interface and Levenberg-Marquardt's gain-ratio rule for ``alpha``.

Interface (what :class:`~gramnewton.GramGaussNewton` calls; see :class:`DampingRule`):

1. ``choose_alpha(alpha, system)``, optional: after the engine computed the batch's
   :class:`~gramnewton.engines.GramSystem` (Gram ``G``, residuals ``r``), before the solve: the
   damping of this step (e.g. chosen by cross-validation on the batch). Default: ``alpha``.
2. ``update(alpha, gain_ratio, diagnostics)``, once per step, after re-evaluating the batch's
   residuals at the new parameters (skipped when ``measures_gain_ratio`` is False: one forward
   pass saved, ``gain_ratio`` is then ``None``): gets the ``alpha`` the step was solved with, the
   gain ratio and the step's :class:`~gramnewton.diagnostics.StepDiagnostics`, and returns a
   :class:`DampingDecision`: the ``alpha`` for the next step and whether to keep the step. A
   rejected step is undone: parameters and momentum as before it, not counted as a step.

After a step ``delta = -J^T c`` with ``c = (lam G + alpha I)^{-1} r``, the linearised model
predicts the residual ``r - G c``. The gain ratio compares the actual with the predicted
decrease of the batch's squared residual:

    rho = (||r||^2 - ||r_new||^2) / (||r||^2 - ||r - G c||^2).

For a general loss (:mod:`gramnewton.generalized`) it compares the decrease of ``sum_i l_i`` with
the one the quadratic model predicts, ``1/2 (||u||^2 - ||u - B^T G B c||^2)``
(:func:`loss_gain_ratio`); for the square loss both forms agree.

``rho`` near 1 means the linearisation is trusted: damping is lowered (longer steps); ``rho``
small or negative means the step left the region where the linear model holds: damping is
raised and, when ``rho < reject_below``, the step is undone. This is the rule of Marquardt
(1963) as used by K-FAC (Martens & Grosse 2015, Section 6.5) on each mini-batch; it costs one
extra forward pass without gradients per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .diagnostics import StepDiagnostics
from .engines.base import GramSystem


@dataclass(frozen=True)
class DampingDecision:
    """What a :class:`DampingRule` decided: next ``alpha`` and whether the step is kept."""

    alpha: float
    accept: bool


class DampingRule:
    """Base of the damping rules (the optimizer also accepts any object with ``update``; the two
    other members are then read with these defaults). A rule may keep state of its own (e.g. a
    smoothed ratio).

    Attributes:
        measures_gain_ratio: ``False`` skips the re-evaluation of the batch after the step.
    """

    measures_gain_ratio: bool = True

    def choose_alpha(self, alpha: float, system: GramSystem) -> float:
        """The damping of this step from its Gram system (``G`` ``(b*k, b*k)``, residuals
        ``(b, k)``), before the solve; ``alpha`` is the current one. Default: unchanged."""
        return alpha

    def update(self, alpha: float, gain_ratio: float | None, diagnostics: StepDiagnostics) -> DampingDecision:
        """Decide from this step's ``gain_ratio`` (``-inf`` for a non-finite new loss, ``None``
        when not measured) and its diagnostics (``rejected`` is still ``False`` there)."""
        raise NotImplementedError


@dataclass(frozen=True)
class GainRatioDamping(DampingRule):
    """Rule for adapting ``alpha`` from the gain ratio.

    Attributes:
        low, high: ``rho < low`` multiplies ``alpha`` by ``factor``; ``rho > high`` divides it.
        factor: multiplicative change of ``alpha`` (> 1).
        reject_below: steps with ``rho`` below this are undone (parameters restored).
        min_alpha, max_alpha: bounds on ``alpha``.
    """

    low: float = 0.25
    high: float = 0.75
    factor: float = 2.0
    reject_below: float = 0.0
    min_alpha: float = 1e-8
    max_alpha: float = 1e8

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"need 0 <= low < high, got low={self.low}, high={self.high}")
        if not self.factor > 1:
            raise ValueError(f"Invalid damping factor: {self.factor} (must be > 1)")
        if not 0 < self.min_alpha <= self.max_alpha:
            raise ValueError(f"need 0 < min_alpha <= max_alpha, got {self.min_alpha}, {self.max_alpha}")

    def next_alpha(self, alpha: float, rho: float) -> float:
        """``alpha`` for the next step given this step's gain ratio."""
        if rho < self.low:
            alpha = max(alpha, self.min_alpha) * self.factor
        elif rho > self.high:
            alpha = alpha / self.factor
        return min(max(alpha, self.min_alpha), self.max_alpha)

    def update(self, alpha: float, gain_ratio: float, diagnostics: StepDiagnostics) -> DampingDecision:
        """:meth:`next_alpha`, and reject the step when ``gain_ratio < reject_below``."""
        return DampingDecision(self.next_alpha(alpha, gain_ratio), gain_ratio >= self.reject_below)


def gain_ratio(residuals: Tensor, predicted: Tensor, new_residuals: Tensor) -> float:
    """Actual over predicted decrease of the squared residual.

    Args:
        residuals: ``(n,)`` residuals before the step.
        predicted: ``(n,)`` residuals the linearised model predicts after it (``r - G c``).
        new_residuals: ``(n,)`` residuals after it (any non-finite entry gives ``-inf``).
    """
    before = float(residuals.double().pow(2).sum())
    after = float(new_residuals.double().pow(2).sum())
    return loss_gain_ratio(before, after, before - float(predicted.double().pow(2).sum()))


def loss_gain_ratio(before: float, after: float, predicted_decrease: float) -> float:
    """Actual over predicted decrease of a loss: ``(before - after) / predicted_decrease``.

    ``after`` not finite gives ``-inf``; a model that predicts no progress (``<= 0``) is judged by
    the sign of the actual change alone (``1`` or ``-inf``).
    """
    if not math.isfinite(after):
        return -math.inf
    if predicted_decrease <= 0:  # the model predicts no progress: judge by the sign alone
        return 1.0 if after < before else -math.inf
    return (before - after) / predicted_decrease
