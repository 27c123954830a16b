"""Adaptive damping: the rule interface and Levenberg-Marquardt's gain-ratio rule for ``alpha``.

Interface (what :class:`~gramnewton.GramGaussNewton` calls; see :class:`DampingRule`):

1. ``choose_alpha(alpha, system, lam)``, optional: after the engine computed the batch's
   :class:`~gramnewton.engines.GramSystem` (Gram ``G``, residuals ``r``), before the solve: the
   damping of this step (e.g. chosen by cross-validation on the batch). A rule without it keeps
   ``alpha``, and the engine may then leave out a Gram matrix the solve does not need
   (the parameter-space solve, :func:`gramnewton.update.compute_system`).
2. ``update(alpha, gain_ratio, diagnostics)``, once per step, after re-evaluating the batch's
   residuals at the new parameters (skipped when ``measures(diagnostics)``, optional, by default
   ``measures_gain_ratio``, is False: one forward pass saved, ``gain_ratio`` is then ``None``):
   gets the ``alpha`` the step was solved with, the gain ratio and the step's
   :class:`~gramnewton.diagnostics.StepDiagnostics`, and returns a
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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor

from .diagnostics import StepDiagnostics
from .engines.base import GramSystem
from .solve import is_number


@dataclass(frozen=True)
class DampingDecision:
    """What a :class:`DampingRule` decided: next ``alpha`` and whether the step is kept."""

    alpha: float
    accept: bool


class DampingRule:
    """Base of the damping rules (the optimizer also accepts any object with ``update``;
    ``measures_gain_ratio`` is then read with this default, and ``choose_alpha`` is optional, see
    the module docstring). A rule may keep state of its own (e.g. a smoothed ratio).

    Attributes:
        measures_gain_ratio: ``False`` skips the re-evaluation of the batch after the step
            (unless :meth:`measures`, which the optimizer asks, says otherwise for the step).
        subset: re-evaluate only the batch's first ``subset`` samples (``None``: all of them);
            see :class:`GainRatioDamping`.
        retries: how many times the optimizer solves a rejected step again from the batch's
            system with the ``alpha`` the rule returned (``0``: none); see :class:`GainRatioDamping`.
    """

    measures_gain_ratio: bool = True
    subset: int | None = None
    retries: int = 0

    def measures(self, diagnostics: StepDiagnostics) -> bool:
        """Whether the step just taken, described by ``diagnostics`` (before any re-evaluation), is
        re-evaluated; by default ``measures_gain_ratio``."""
        return self.measures_gain_ratio

    def update(self, alpha: float, gain_ratio: float | None, diagnostics: StepDiagnostics) -> DampingDecision:
        """Decide from this step's ``gain_ratio`` (``-inf`` for a non-finite new loss, ``None``
        when not measured) and its diagnostics (``rejected`` is still ``False`` there)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state, saved in the optimizer's ``state_dict``: for a dataclass rule its
        fields that are not constructor arguments (plain numbers, ``None`` or booleans)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.init} if is_dataclass(self) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output; a key this rule does not have is refused."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"{type(self).__name__} has no state {sorted(unknown)} (a state of another damping rule?)")
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class GainRatioDamping(DampingRule):
    """Rule for adapting ``alpha`` from the gain ratio.

    Attributes:
        low, high: ``rho < low`` multiplies ``alpha`` by ``factor``; ``rho > high`` divides it.
        factor: multiplicative change of ``alpha`` (> 1).
        reject_below: steps with ``rho`` below this are undone (parameters restored); a NaN
            ``rho`` is always. ``-inf``: no step is undone, ``alpha`` still adapts (on sinc's
            batches of 1,000, where the default rejected a third of the steps, 2.3-2.7x fewer
            steps to 1e-3, 1.4-1.8x with geodesic acceleration; docs/convergence.md, fifteenth
            session).
        min_alpha, max_alpha: bounds on ``alpha``.
        check_every: while the linearisation is trusted (the last ``trust_after`` measured
            ratios ``rho > high`` with ``alpha`` at its floor, where the rule could not lower
            the damping further: at ``min_alpha``, or at most the jitter the solve added) only
            every ``check_every``-th step is re-evaluated (and a step that promises much, see
            ``recheck_above``); the others keep ``alpha`` and are accepted unmeasured (no extra
            forward pass: on the demo network that pass is about a sixth of a step). Any measured
            ``rho <= trust_above`` ends the trust. ``1``: every step is measured.
        trust_after: measured steps in a row, each with ``alpha`` at ``min_alpha`` and ``rho``
            above ``trust_above``, that start the trust (default 3). Why more than one: when
            ``alpha`` starts at or below the floor (``min_alpha`` raised to the starting
            ``alpha`` or above), one good first step is no evidence; on mnist's first
            cross-entropy steps (``min_alpha=1``, ``trust_above=0.25``) trust after the first
            step let three unmeasured steps take the logits to Inf, where the measured second
            step had ``rho = -82`` and was rejected (docs/design.md, "Adaptive damping").
        trust_above: the measured ``rho`` above which a step with ``alpha`` at ``min_alpha``
            counts towards (or keeps) the trust; ``None`` (default): ``high``. At the floor every
            ``rho >= low`` leaves ``alpha`` where it is, so ``trust_above=low`` also trusts the
            steps whose measurement could not have changed ``alpha`` (the gain ratios of
            mini-batch cross-entropy steps with momentum sit mostly between ``low`` and ``high``;
            docs/classification.md); only a ``rho`` at or below it (``alpha`` raised, or the step
            rejected) ends the trust. Must lie in ``[low, high]``.
        subset: measure ``rho`` on the batch's first ``subset`` samples only (``None``, the
            default: the whole batch). The re-evaluation then runs the network on ``subset``
            samples instead of ``b``: on resnet8_fixup, 28x28, ``b = 128``, a forward pass without
            gradients of 32 samples costs about a third of one of 128 (docs/convergence.md). The
            ratio restricts exactly: the loss and the predicted decrease are sums over samples, so
            ``rho`` on the subset compares the same two quantities over fewer samples (a noisier
            estimate of the batch's ``rho``; a random subset when the batches are shuffled). A
            step the model predicts to raise the subset's loss (a few samples can rise while the
            batch falls) is measured on the whole batch: the ratio of two rises says nothing of
            the step, and the sign alone would reject it. Needs a closure that takes the rows to
            evaluate, ``closure(rows)`` with ``rows`` a ``slice`` of the batch
            (:class:`~gramnewton.GramGaussNewton`); not with ``distributed``.
        retries: a rejected step is solved again, up to ``retries`` times, from the same batch's
            system (the Gram, ``J^T v`` and ``J v`` the engine formed for it) with the ``alpha``
            this rule raised, and judged by its own gain ratio: Levenberg-Marquardt's inner loop.
            A retry costs a ``(b*k, b*k)`` factorisation, ``J^T c`` and one re-evaluation, no
            pass with gradients (on the demo network about a fifth of a step); without retries the
            batch is left and its step's cost is lost. The momentum follows the optimizer's rule:
            after two rejections in a row (a retry counts) ``phi_{t-1} = 0``. ``0`` (the default):
            no retry. In the packaged mnist classification setting (``min_alpha=10``) one retry
            brought 97% test accuracy sooner on ten seed runs of twelve; on the regression demo it
            was no better; without a floor under ``alpha`` (the default ``1e-8``), on mnist with
            hard labels, it ended below the rule without it (95.6 against 96.7% test accuracy,
            medians of six seeds; before the jitter rules below four of the six runs fell under
            90%, one to 9%)
            (docs/classification.md, docs/convergence.md, thirty-second and thirty-third
            sessions): use it with a floor. Not with ``distributed="local"`` (which takes no
            damping rule).
        recheck_above: a trusted step that would go unmeasured is measured anyway when the model
            promises more than this fraction of its batch's loss, ``predicted_decrease >
            recheck_above * loss_before`` (:meth:`measures`; ``None``: never). A step of
            ``lam``-scaled Gauss-Newton usually promises about ``2 / lam`` of it (on mnist's
            cross-entropy steps at ``lam=16`` a median 0.10, 0.20 at the 95th percentile, 6 of
            1,800 above 0.5); on mnist with hard labels and no floor under ``alpha`` two trusted
            steps in a row promised 0.88 and 4.3 times the loss, went unmeasured and took the
            test accuracy from 93% to 10% (docs/classification.md, thirty-third session). Costs
            nothing unless it fires (the re-evaluation it buys).

    The jitter a solve adds to the diagonal (``StepDiagnostics.jitter``) is damping too: a raise
    of ``alpha`` starts from ``alpha + jitter``, the damping the failed step was solved with
    (:meth:`next_alpha`), and a step with ``alpha <= jitter`` counts as at the floor for the
    trust (lowering ``alpha`` further would not change the step). On mnist's cross-entropy Gram
    at the default floor ``1e-8`` nine solves in ten after the 100th step added jitter (0.03 to
    440); doubling ``alpha`` itself from ``1e-8`` took 16 steps, 14 of them rejected, to reach a
    damping that changed the step (docs/classification.md, thirty-third session).

    The trust, the good steps in a row at the floor and the unmeasured steps are the rule's own
    state (a fresh rule measures every step; the optimizer's ``state_dict`` saves them).
    """

    low: float = 0.25
    high: float = 0.75
    factor: float = 2.0
    reject_below: float = 0.0
    min_alpha: float = 1e-8
    max_alpha: float = 1e8
    check_every: int = 1
    trust_above: float | None = None
    subset: int | None = None
    trust_after: int = 3  # after the older fields, so that positional arguments keep their meaning
    retries: int = 0
    recheck_above: float | None = 0.5
    trusted: bool = field(default=False, init=False)
    good_at_floor: int = field(default=0, init=False)
    unchecked: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name in ("low", "high", "factor", "reject_below", "min_alpha", "max_alpha"):
            value = getattr(self, name)
            if not is_number(value) or math.isnan(value):  # a NaN reject_below would reject every step
                raise ValueError(f"Invalid damping {name}: {value!r} (must be a number)")
        if not 0 <= self.low < self.high:
            raise ValueError(f"need 0 <= low < high, got low={self.low}, high={self.high}")
        if not 1 < self.factor < math.inf:  # an infinite factor takes alpha to inf on one bad step
            raise ValueError(f"Invalid damping factor: {self.factor} (must be finite and > 1)")
        if not 0 < self.min_alpha <= self.max_alpha:
            raise ValueError(f"need 0 < min_alpha <= max_alpha, got {self.min_alpha}, {self.max_alpha}")
        for name in ("check_every", "trust_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
        if self.trust_above is not None and not (
            is_number(self.trust_above) and self.low <= self.trust_above <= self.high
        ):
            raise ValueError(
                f"Invalid trust_above: {self.trust_above!r} (must be in [low, high] = [{self.low}, {self.high}])"
            )
        check_subset(self.subset)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"Invalid retries: {self.retries!r} (must be an int >= 0)")
        if self.recheck_above is not None and not (is_number(self.recheck_above) and 0 < self.recheck_above < math.inf):
            raise ValueError(f"Invalid recheck_above: {self.recheck_above!r} (must be a finite number > 0, or None)")

    @property
    def measures_gain_ratio(self) -> bool:  # type: ignore[override]
        """Whether the coming step is re-evaluated (always, unless trusted; see ``check_every``)."""
        return not self.trusted or self.unchecked + 1 >= self.check_every

    def measures(self, diagnostics: StepDiagnostics) -> bool:
        """``measures_gain_ratio``, or a trusted step that promises more than ``recheck_above`` of
        its batch's loss."""
        if self.measures_gain_ratio:
            return True
        limit = self.recheck_above
        return limit is not None and not diagnostics.predicted_decrease <= limit * diagnostics.loss_before

    def next_alpha(self, alpha: float, rho: float, jitter: float = 0.0) -> float:
        """``alpha`` for the next step given this step's gain ratio; a raise starts from the
        damping the step was solved with, ``alpha + jitter`` (``jitter``: what the solve added to
        the diagonal, :class:`~gramnewton.diagnostics.StepDiagnostics`)."""
        if rho < self.low:
            alpha = max(alpha + jitter, self.min_alpha) * self.factor
        elif rho > self.high:
            alpha = alpha / self.factor
        return min(max(alpha, self.min_alpha), self.max_alpha)

    def update(self, alpha: float, gain_ratio: float | None, diagnostics: StepDiagnostics) -> DampingDecision:
        """:meth:`next_alpha`, and reject the step when ``gain_ratio < reject_below``; a trusted
        step that was not measured (``gain_ratio`` ``None``) keeps ``alpha`` and is accepted."""
        if gain_ratio is None:
            self.unchecked += 1
            return DampingDecision(alpha, True)
        new_alpha = self.next_alpha(alpha, gain_ratio, diagnostics.jitter)
        self.unchecked = 0
        threshold = self.high if self.trust_above is None else self.trust_above
        good_at_floor = gain_ratio > threshold and alpha <= max(self.min_alpha, diagnostics.jitter)
        self.good_at_floor = self.good_at_floor + 1 if good_at_floor else 0
        self.trusted = self.check_every > 1 and self.good_at_floor >= self.trust_after
        return DampingDecision(new_alpha, gain_ratio >= self.reject_below)


def check_subset(subset: int | None) -> None:
    """Raise ``ValueError`` unless ``subset`` is ``None`` or an int ``>= 1``."""
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"Invalid subset: {subset!r} (must be an int >= 1, or None for the whole batch)")


def squared_sums(residuals: Tensor, predicted: Tensor, new_residuals: Tensor) -> tuple[float, float, float]:
    """``||r||^2``, ``||r - G c||^2`` and ``||r_new||^2`` in float64, with one synchronisation.

    Args:
        residuals: ``(n,)`` residuals before the step.
        predicted: ``(n,)`` residuals the linearised model predicts after it (``r - G c``).
        new_residuals: ``(n,)`` residuals after it.
    """
    vectors = (residuals, predicted, new_residuals)
    before, model, after = torch.stack([v.detach().reshape(-1).double().pow(2).sum() for v in vectors]).tolist()
    return before, model, after


def gain_ratio(residuals: Tensor, predicted: Tensor, new_residuals: Tensor) -> float:
    """Actual over predicted decrease of the squared residual.

    Args:
        residuals: ``(n,)`` residuals before the step.
        predicted: ``(n,)`` residuals the linearised model predicts after it (``r - G c``).
        new_residuals: ``(n,)`` residuals after it (any non-finite entry gives ``-inf``).
    """
    before, model, after = squared_sums(residuals, predicted, new_residuals)
    return loss_gain_ratio(before, after, before - model)


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


def leave_one_out_ridge(gram: Tensor, residuals: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Leave-one-out error of the step's kernel fit on its own batch, for every ridge in ``grid``.

    The step of Eq. 11 changes the batch's outputs by ``-G c = -(1/lam) H_s r`` with the hat
    matrix ``H_s = G (G + s I)^{-1}`` and the ridge ``s = alpha / lam``: kernel ridge regression
    of the residuals ``r`` on the Gram ``G``. The unit left out is a sample, its ``k`` rows (its
    other outputs would otherwise predict it): its leave-one-out residuals have the closed form
    ``e_B(s) = [(I - H_s)_BB]^{-1} [(I - H_s) r]_B`` (exact for kernel ridge regression; for
    ``k = 1`` ``e_i(s) = [(I - H_s) r]_i / (1 - [H_s]_ii)``), so one eigendecomposition
    ``G = U diag(g) U^T`` prices every ``s``: ``I - H_s = U diag(s / (g + s)) U^T``.

    Args:
        gram: ``(n, n)`` Gram matrix ``J J^T`` (``n = b*k``, rows sample-major), symmetric positive
            semi-definite.
        residuals: ``(b, k)`` residuals, one row per sample (a sample's ``k`` rows are left out
            together); a 1-D tensor of ``n``: one row per sample.
        grid: ``(S,)`` positive ridges ``s``.

    Returns:
        ``(loo, ridges)``: ``(S,)`` mean squared leave-one-out residual (over the ``n`` rows) per
        ridge, and ``grid`` in float64.
    """
    g, u = torch.linalg.eigh(gram.double())
    g = g.clamp_min(0.0)
    s = grid.double()
    n = u.shape[0]
    k = residuals.shape[-1] if residuals.dim() == 2 else 1
    if k * (n // k) != n or residuals.numel() != n:
        raise ValueError(f"residuals of shape {tuple(residuals.shape)} do not match a ({n}, {n}) Gram")
    keep = s[None, :] / (g[:, None] + s[None, :])  # (n, S): eigenvalues of I - H_s
    fit_residual = u @ (keep * (u.T @ residuals.reshape(-1).double())[:, None])  # (n, S): (I - H_s) r
    if k == 1:
        leverage_complement = (u * u) @ keep  # (n, S): diag(I - H_s)
        return (fit_residual / leverage_complement).pow(2).mean(0), s
    rows = u.reshape(n // k, k, n)  # (b, k, n): each sample's rows of U
    blocks = ((rows[:, :, None, :] * rows[:, None, :, :]) @ keep).permute(0, 3, 1, 2)  # (b, S, k, k): (I - H_s)_BB
    own = fit_residual.reshape(n // k, k, -1).permute(0, 2, 1).unsqueeze(-1)  # (b, S, k, 1)
    errors = torch.linalg.solve(blocks, own)  # (b, S, k, 1): each sample's leave-one-out residuals
    return errors.pow(2).sum((0, 2, 3)) / n, s


@dataclass
class CrossValidatedDamping(DampingRule):
    """``alpha`` chosen on every batch by leave-one-out cross-validation, floored by the gain ratio.

    Why: on a mini-batch the step of Eq. 11 is kernel ridge regression of the residuals ``r`` on
    the Gram ``G`` with ridge ``s = alpha / lam`` (:func:`leave_one_out_ridge`). A small ridge
    fits the batch's own, sample-specific residual (noise for every other sample: the step then
    lowers its batch's loss and barely the training set's); a large one keeps only what the
    batch's samples share. The leave-one-out error measures exactly that transfer, on the batch,
    from the ``G`` and ``r`` the step computes anyway (one ``(n, n)`` eigendecomposition, no
    extra pass). Per batch the rule takes the ridge ``s_t`` minimising it over ``points``
    log-spaced values in ``span`` times the mean eigenvalue of ``G`` (scale-free), averages
    ``log s_t`` over batches (weight ``smoothing`` of the newest: one batch's choice is noisy) and
    solves with

        alpha_t = max(lam * exp(mean log s), floor_t).

    ``floor_t`` is the gain-ratio rule's (``curvature``, Levenberg-Marquardt): after a step whose
    linearisation failed (``rho < low``) it is ``factor`` times the ``alpha`` used, and it decays
    by ``factor`` after each good step; a step with ``rho < reject_below`` is undone. With
    ``curvature=None`` there is no floor, no rejection and no extra forward pass.

    Attributes:
        smoothing: weight of the newest batch in the running mean of ``log s`` (in ``(0, 1]``).
        span: smallest and largest ridge tried, relative to the mean eigenvalue of ``G``.
        points: number of ridges tried.
        max_samples: cross-validate on at most this many rows of ``G`` (the first samples, each
            whole, ``k`` rows; the eigendecomposition costs ``O(n^3)``); where fewer than two
            samples fit, the batch is not cross-validated (the running mean is kept).
        curvature: the gain-ratio rule giving the floor and the rejection, or ``None``.

    The running mean, the floor and ``curvature``'s trust are the rule's own state (saved in the
    optimizer's ``state_dict``).
    """

    smoothing: float = 0.1
    span: tuple[float, float] = (1e-5, 1e2)
    points: int = 36
    max_samples: int = 512
    curvature: GainRatioDamping | None = field(default_factory=GainRatioDamping)
    log_ridge: float | None = field(default=None, init=False)
    floor: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not is_number(self.smoothing) or not 0 < self.smoothing <= 1:
            raise ValueError(f"Invalid smoothing: {self.smoothing!r} (must be a number in (0, 1])")
        span = self.span
        span_ok = (
            isinstance(span, tuple | list)
            and len(span) == 2
            and all(is_number(v) for v in span)
            and 0 < span[0] < span[1] < math.inf
        )
        if not span_ok or isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 2:
            raise ValueError(f"need 0 < span[0] < span[1] < inf and an int points >= 2, got {span!r}, {self.points!r}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 2:
            raise ValueError(f"Invalid max_samples: {self.max_samples!r} (must be an int >= 2)")

    @property
    def measures_gain_ratio(self) -> bool:  # type: ignore[override]
        return self.curvature is not None

    @property
    def subset(self) -> int | None:  # type: ignore[override]
        """The re-evaluated samples: ``curvature``'s ``subset`` (the rule that reads the ratio)."""
        return None if self.curvature is None else self.curvature.subset

    def state_dict(self) -> dict[str, Any]:
        curvature = {} if self.curvature is None else self.curvature.state_dict()
        return {**super().state_dict(), "curvature": curvature}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        curvature = state.pop("curvature", {})
        super().load_state_dict(state)
        if self.curvature is not None and curvature:
            self.curvature.load_state_dict(curvature)

    def choose_alpha(self, alpha: float, system: GramSystem, lam: float) -> float:
        """``max(lam * exp(mean log s), floor)``; the first call takes ``alpha`` as the floor."""
        b = system.residuals.shape[0] if system.residuals.dim() else 1
        k = system.gram.shape[0] // b  # a sample's rows (its outputs), left out together
        samples = min(b, self.max_samples // k)
        n = samples * k
        gram, r = system.gram[:n, :n].double(), system.residuals.reshape(b, k)[:samples]
        scale = float(torch.diagonal(gram).mean()) if n else math.nan
        if samples >= 2 and math.isfinite(scale) and scale > 0 and bool(r.pow(2).sum() > 0):
            grid = scale * torch.logspace(
                math.log10(self.span[0]), math.log10(self.span[1]), self.points, dtype=torch.float64
            )
            loo, ridges = leave_one_out_ridge(gram, r, grid)
            if bool(torch.isfinite(loo).all()):
                newest = math.log(float(ridges[loo.argmin()]))
                old = self.log_ridge
                self.log_ridge = newest if old is None else (1 - self.smoothing) * old + self.smoothing * newest
        if self.floor is None:
            self.floor = alpha
        chosen = self.floor if self.log_ridge is None else max(lam * math.exp(self.log_ridge), self.floor)
        return chosen

    def update(self, alpha: float, gain_ratio: float | None, diagnostics: StepDiagnostics) -> DampingDecision:
        """New floor from the gain ratio (``alpha`` is the one the step used); reject below
        ``curvature.reject_below``. Without ``curvature``: keep every step, floor 0."""
        if self.curvature is None or gain_ratio is None:
            self.floor = 0.0
            return DampingDecision(alpha, True)
        self.floor = self.curvature.next_alpha(alpha, gain_ratio, diagnostics.jitter)
        return DampingDecision(alpha, gain_ratio >= self.curvature.reject_below)


DAMPING_RULES = {"gain_ratio": GainRatioDamping, "cross_validated": CrossValidatedDamping}


def damping_rule(spec: bool | str | Mapping[str, Any] | DampingRule | None) -> DampingRule | None:
    """The rule an optimizer's ``adaptive_damping`` names: ``False``/``None`` none (fixed
    ``alpha``), ``True`` or ``"gain_ratio"`` a :class:`GainRatioDamping`, ``"cross_validated"`` a
    :class:`CrossValidatedDamping` (a fresh one: rules keep state), a mapping ``{"name": NAME,
    **arguments}`` (e.g. ``{"name": "gain_ratio", "check_every": 4}``: a rule with its arguments
    from a JSON grid of the benchmarks), or the rule itself."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return GainRatioDamping()
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        arguments = dict(spec)
        name = arguments.pop("name", None)
        if name not in DAMPING_RULES:
            raise ValueError(f"unknown damping rule {name!r}; expected one of {', '.join(DAMPING_RULES)}")
        return DAMPING_RULES[name](**arguments)
    return spec
