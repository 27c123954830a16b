"""One Gram-Gauss-Newton update as separate units: curvature, solve, apply.

``gram_gauss_newton_direction`` computes ``-J^T (lam G + alpha I)^{-1} (f - y)`` for a closure
(with sample-space momentum, in sample or parameter space);
``GeodesicAcceleration`` adds Levenberg-Marquardt's second-order correction to it;
``apply_direction`` writes it into the parameters all at once, or not at all.
``full_batch_step`` is Eq. 9 of the paper (and Eq. 11 with ``alpha > 0``) as a plain function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from .engines import Closure, GramEngine, GramSystem, ReferenceEngine
from .engines.base import params_dtype, reevaluated_residuals
from .engines.reference import flatten, split_like
from .solve import (
    SingularGramError,
    SolveInfo,
    all_finite,
    as_dtype,
    check_damping,
    check_solve_dtype,
    damped_solution,
    is_number,
    jacobian_solve,
    parameter_space_solution,
    solves_by_normal_equations,
)

SOLVE_SPACES = ("auto", "sample", "parameter")

Correction = Callable[[Tensor], list[Tensor]]
"""``e -> -J^T (lam G + alpha I)^{-1} e`` per parameter (``e`` ``(b*k,)``), equal in parameter space to
``-(lam J^T J + alpha I)^{-1} J^T e``: a step's damped system applied to another right-hand side
with the factorisation its own solve accepted (geodesic acceleration's second solve; Eq. 10's SVD
path, ``alpha = 0``, solves anew)."""


@dataclass(frozen=True)
class GramGaussNewtonStep:
    """A computed, not yet applied, update ``w <- (1 - wd) w + direction``.

    Attributes:
        direction: one tensor per parameter, ``-phi_t`` (without momentum
            ``-J^T (lam G + alpha I)^{-1} (f - y)``).
        residuals: ``(b, k)`` residuals before the update.
        gram: ``(b*k, b*k)`` Gram matrix ``J J^T``; ``None`` after a parameter-space solve by an
            engine that skipped it (:func:`choose_solve_space`).
        coefficients: ``(b*k,)`` solution ``c`` of ``(lam G + alpha I) c = f - y - lam mu J phi_{t-1}``
            (``phi_t = mu phi_{t-1} + J^T c``); ``None`` after a parameter-space solve.
        solve_info: how the damped system was solved.
        predicted: ``(b*k,)`` residuals the linearised model predicts after the step,
            ``f - y - J phi_t`` (the denominator of the gain ratio).
        change: ``(b*k,)`` the linearised model's change ``J phi_t`` (``residuals - predicted``,
            formed without that subtraction: a general loss's pseudo-residuals reach 1e10 and more
            for a confidently wrong sample, and the difference of squares of ``residuals`` and
            ``predicted`` then loses the predicted decrease); ``None`` where not known.
        solve_space: ``"sample"`` (the ``(b*k, b*k)`` system) or ``"parameter"`` (``(m, m)``).
        alpha: the damping the system was solved with.
        mean_loss: the batch's mean loss before the update when the step is that of a general
            loss (:mod:`gramnewton.generalized`; ``residuals`` then hold the pseudo-residuals
            ``u``), else ``None``.
        acceleration_ratio: ``2 ||a|| / ||v||`` of a geodesic acceleration
            (:class:`GeodesicAcceleration`; ``direction`` is ``v + a/2`` when it is at most the
            acceleration's ``max_ratio``, ``v`` otherwise), ``None`` when none was computed.
    """

    direction: list[Tensor]
    residuals: Tensor
    gram: Tensor | None
    coefficients: Tensor | None
    solve_info: SolveInfo
    predicted: Tensor
    solve_space: str = "sample"
    alpha: float | None = None
    mean_loss: Tensor | None = None
    acceleration_ratio: float | None = None
    change: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """Mean loss before the update (a detached scalar): the mean squared residual, or
        ``mean_loss`` for a general loss."""
        return self.residuals.pow(2).mean() if self.mean_loss is None else self.mean_loss

    @cached_property
    def direction_norm(self) -> float:
        """``||direction||`` over all parameters, accumulated in float64 (``inf`` or NaN when an
        entry is not finite; a float64 direction may also overflow to ``inf`` with finite entries).

        Computed once per step object (``dataclasses.replace`` makes a new one, so a replaced
        direction is never judged by an old norm)."""
        return total_norm(self.direction)


def total_norm(tensors: Sequence[Tensor]) -> float:
    """The Euclidean norm of all ``tensors`` together, accumulated in float64 (one multi-tensor
    call for all of them)."""
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))))


@dataclass(frozen=True)
class GeodesicAcceleration:
    r"""Geodesic acceleration of a step (Transtrum & Sethna 2012; Levenberg-Marquardt's
    second-order correction), for the square loss.

    With ``v`` the step's direction (``-phi_t``), ``r`` the batch's residuals and ``J v`` from the
    linearised model, the residuals' second directional derivative along ``v`` is taken by one
    more evaluation of the closure at ``w + h v`` (no gradients),

    .. math::
        r_{vv} = \frac{2}{h} \Big( \frac{r(w + h v) - r(w)}{h} - J v \Big),

    and the acceleration ``a`` minimises ``lam ||J a + r_vv||^2 + alpha ||a||^2`` on the step's
    own damped system,

    .. math::
        a = -J^\top (\lambda G + \alpha I)^{-1} \lambda r_{vv}
          = -(\lambda J^\top J + \alpha I)^{-1} \lambda J^\top r_{vv}.

    The step becomes ``v + a/2`` when ``2 ||a|| / ||v|| <= max_ratio`` (the correction is
    small enough for its second-order model to hold) and stays ``v`` otherwise. Its cost: one
    forward pass without gradients, one more solve of the same system with the factorisation the
    step's solve accepted (no second factorisation) and one ``J^T c``.

    Attributes:
        step_size: ``h``, the finite-difference step along ``v`` (relative to ``||v||``: ``h = 1``
            evaluates at the end of the step).
        max_ratio: largest ``2 ||a|| / ||v||`` at which the acceleration is added. Transtrum &
            Sethna suggest 0.75; on the sinc network (docs/design.md, "Geodesic acceleration")
            1.5 took 0.6-1.0x the steps of 0.75 to each target, and 3 or no bound no fewer than 1.5.
    """

    step_size: float = 0.1
    max_ratio: float = 1.5

    def __post_init__(self) -> None:
        for name in ("step_size", "max_ratio"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"Invalid geodesic acceleration {name}: {value!r} (must be a finite number > 0)")


def choose_solve_space(
    solve_space: str, system: GramSystem, params: list[Tensor], solve_dtype: torch.dtype | None = None
) -> str:
    """The space to solve in: ``solve_space`` unless it is ``"auto"``.

    Rule of ``"auto"`` (:func:`prefers_parameter_space`): the parameter space when the engine can
    give the dense ``J`` and ``b*k > m`` if that system is solved by the float64 normal equations
    (a float32 ``J``, ``m <= 1024``, no ``solve_dtype``:
    :func:`~gramnewton.solve.solves_by_normal_equations`), else ``b*k > 2 m``. With ``n = b*k``:
    cost, the sample space's ``(n, n)`` Cholesky is ``n^3/3``, the normal equations' ``n m^2``
    float64 multiply-adds, the parameter space's QR of the stacked ``(n + m, m)`` matrix
    ``2 n m^2`` (fewer flops than the Cholesky below ``m = 0.41 n``), each plus materialising
    ``J``. Measured on the sinc network (``m = 61``, float32, ``alpha = 0.1``,
    ``benchmarks/solve_space.py``): with the QR a parameter-space step took 1.9x the sample-space
    one at ``n = 100``, 0.63x at ``n = 1000``, 0.34x at ``n = 4000``; with the normal equations
    0.79x at ``n = 64``, 0.77x at 100, 0.54x at 130, 0.64x at 200, 0.24x at 1000 (docs/design.md,
    "Solve spaces"). Accuracy: ``G`` has rank at most ``m < n``, so
    ``lam G + alpha I`` has ``n - m`` eigenvalues equal to ``alpha`` and its Cholesky loses
    ``cond(lam G + alpha I)``-fold in precision, the QR its square root (float32 step error
    2e-5 to 9e-4 in sample space, 6e-6 to 1.4e-5 in parameter space by the QR, same measurement).
    """
    if solve_space not in SOLVE_SPACES:
        raise ValueError(f"Invalid solve_space: {solve_space!r}; expected one of {SOLVE_SPACES}")
    if solve_space == "parameter" and system.jacobian_columns is None:
        raise ValueError("solve_space='parameter' needs the dense Jacobian, which this engine does not provide")
    if solve_space != "auto":
        return solve_space
    if system.gram is None:  # the engine was told it would not be needed (below)
        return "parameter"
    preferred = prefers_parameter_space(system.gram.shape[0], params, solve_dtype)
    return "parameter" if system.jacobian_columns is not None and preferred else "sample"


def prefers_parameter_space(rows: int, params: list[Tensor], solve_dtype: torch.dtype | None = None) -> bool:
    """The ``"auto"`` rule of :func:`choose_solve_space` for ``rows = b*k`` residuals and the
    parameters ``params`` (``m`` entries; ``J`` has their dtype): ``rows > m`` when the
    parameter-space system is solved by the float64 normal equations
    (:func:`~gramnewton.solve.solves_by_normal_equations`), else ``rows > 2 m``."""
    num_params = sum(p.numel() for p in params)
    normal_equations = solves_by_normal_equations(params[0].dtype, solve_dtype, num_params)
    return rows > (1 if normal_equations else 2) * num_params


def compute_system(
    engine: GramEngine, closure: Closure, solve_space: str, skip_gram: bool, solve_dtype: torch.dtype | None = None
) -> GramSystem:
    """``engine.compute(closure)``, letting an engine that can (``can_skip_gram``) leave out the
    ``(b*k, b*k)`` Gram when the step will be solved in parameter space (``skip_gram``: nothing
    else needs it), which would cost ``(b*k)^2 m`` and ``(b*k)^2`` memory for nothing."""
    if not skip_gram or solve_space == "sample" or not getattr(engine, "can_skip_gram", False):
        return engine.compute(closure)
    return engine.compute(
        closure,
        form_gram=lambda rows: solve_space == "auto" and not prefers_parameter_space(rows, engine.params, solve_dtype),
    )


def gram_gauss_newton_direction(
    engine: GramEngine,
    closure: Closure,
    *,
    lam: float,
    alpha: float,
    solve_dtype: torch.dtype | None = None,
    momentum: float = 0.0,
    previous: Sequence[Tensor] | None = None,
    solve_space: str = "sample",
    choose_alpha: Callable[[GramSystem], float] | None = None,
    acceleration: GeodesicAcceleration | None = None,
    system: GramSystem | None = None,
) -> GramGaussNewtonStep:
    r"""Compute the update of Eq. 11, with sample-space momentum (SPRING), for ``closure``'s residuals.

    With ``r = f - y`` ``(b*k,)``, ``J`` ``(b*k, m)``, ``G = J J^T``, ``mu = momentum`` and
    ``phi_{t-1} = previous`` (one tensor per parameter; ``None`` or ``mu = 0``: Eq. 11 exactly),
    the step taken is ``w <- (1 - wd) w - phi_t`` with

    .. math::
        \phi_t = \mu \phi_{t-1} + J^\top (\lambda G + \alpha I)^{-1} (r - \lambda \mu J \phi_{t-1})
               = (\lambda J^\top J + \alpha I)^{-1} (J^\top r + \alpha \mu \phi_{t-1}),

    the minimiser of ``lam ||J phi - r / lam||^2 + alpha ||phi - mu phi_{t-1}||^2``. The first
    form is solved in sample space (``(b*k, b*k)``), the second, equal by the push-through
    identity ``J^T (lam J J^T + alpha I)^{-1} = (lam J^T J + alpha I)^{-1} J^T``, in parameter
    space (``(m, m)``); see :func:`choose_solve_space`. ``choose_alpha``, when given, replaces
    ``alpha`` by its value on the computed system (a damping rule's choice for this batch); the
    returned step records the ``alpha`` it was solved with. ``acceleration`` (square loss only:
    ``closure`` returns residuals or ``(outputs, targets)``) adds the step's geodesic
    acceleration (:class:`GeodesicAcceleration`), evaluating ``closure`` once more with the
    parameters moved along the step and restored (bit for bit) before this returns. ``system``,
    when given, is ``closure``'s system at the current parameters from :func:`compute_system`
    (no forward or backward pass then: a rejected step solved again with another ``alpha``).

    Raises:
        ValueError: ``lam`` or ``alpha`` out of range, bad residuals, or momentum or the
            parameter space asked of an engine that cannot provide ``J v`` or ``J`` (nothing applied).
        SingularGramError: the loss, Gram matrix, coefficients or direction is not finite
            (parameters are untouched: nothing applied).
    """
    check_damping(lam, alpha)
    _check_arguments(engine.params, momentum, previous, solve_dtype)
    if system is None:
        system = compute_system(engine, closure, solve_space, skip_gram=choose_alpha is None, solve_dtype=solve_dtype)
    r = system.residuals.reshape(-1)
    if not math.isfinite(float(r.pow(2).sum())):  # finite residuals whose squares overflow
        raise SingularGramError(
            f"the squared residuals overflow {r.dtype} (loss not finite; largest |residual| "
            f"{float(r.abs().max()):.3g}); rescale the targets or use a float64 model; no parameter was changed"
        )
    use_momentum = bool(momentum) and previous is not None
    if use_momentum and system.j_times is None:
        raise ValueError("momentum needs J v, which this engine does not provide (GramSystem.j_times is None)")
    if choose_alpha is not None:  # the damping rule sets this step's alpha from its system
        alpha = choose_alpha(system)
        check_damping(lam, alpha)
    space = choose_solve_space(solve_space, system, engine.params, solve_dtype)
    solve = _parameter_space if space == "parameter" else _sample_space
    step, again = solve(system, engine.params, lam, alpha, solve_dtype, momentum, previous, use_momentum)
    if acceleration is not None:
        step = _accelerated(step, again, system, closure, engine.params, lam, acceleration)
    # one float64 norm over the whole direction (the diagnostics' step norm) says it is finite; only
    # a norm that is not (a bad entry, or a float64 direction whose norm overflows) needs each entry
    if not math.isfinite(step.direction_norm) and not all(all_finite(d) for d in step.direction):
        raise SingularGramError(
            "the Gram-Gauss-Newton step is not finite (overflow in J^T r); increase alpha or use "
            "solve_dtype=torch.float64; no parameter was changed"
        )
    return step


def check_momentum(momentum: float) -> None:
    """Raise ``ValueError`` unless ``momentum`` is a number (:func:`~gramnewton.solve.is_number`)
    in ``[0, 1)``."""
    if not is_number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"Invalid momentum value: {momentum!r} (must be a number in [0, 1))")


def _check_arguments(
    params: Sequence[Tensor], momentum: float, previous: Sequence[Tensor] | None, solve_dtype: torch.dtype | None
) -> None:
    """Raise ``ValueError`` before anything is computed unless ``0 <= momentum < 1``, ``previous``
    (``phi_{t-1}``, if given) has one tensor per parameter of its shape, and ``solve_dtype`` is
    ``None``, float32 or float64 (:func:`gram_gauss_newton_direction`'s public input)."""
    check_momentum(momentum)
    if previous is not None and [tuple(b.shape) for b in previous] != [tuple(p.shape) for p in params]:
        raise ValueError(
            f"previous (phi_t-1) must be one tensor per parameter, of its shape: got shapes "
            f"{[tuple(b.shape) for b in previous]} for parameters {[tuple(p.shape) for p in params]}"
        )
    check_solve_dtype(solve_dtype)


def _sample_space(
    system: GramSystem,
    params: Sequence[Tensor],
    lam: float,
    alpha: float,
    solve_dtype: torch.dtype | None,
    momentum: float,
    previous: Sequence[Tensor] | None,
    use_momentum: bool,
) -> tuple[GramGaussNewtonStep, Correction]:
    """``phi_t = mu phi_{t-1} + J^T c`` with ``(lam G + alpha I) c = r - lam mu J phi_{t-1}``, and
    the :data:`Correction` of its factorised system.

    Without momentum and with ``alpha = 0``, an engine that holds ``J`` (``system.jacobian``) is
    solved from ``J`` by SVD (:func:`~gramnewton.solve.jacobian_solve`): ``G`` would square its
    condition number."""
    r = system.residuals.reshape(-1)
    j_previous = as_dtype(system.j_times(previous), r.dtype) if use_momentum else None
    if j_previous is None and alpha == 0 and system.jacobian is not None:  # Eq. 10 exactly
        jt_c, coefficients, info = jacobian_solve(system.jacobian, r, lam, alpha, dtype=solve_dtype)
        direction = split_like(-jt_c, params)

        def correction(e: Tensor) -> list[Tensor]:
            return split_like(-jacobian_solve(system.jacobian, e, lam, alpha, dtype=solve_dtype)[0], params)
    else:  # without momentum, Eq. 11 exactly, operation for operation
        rhs = r if j_previous is None else r - (lam * momentum) * j_previous
        coefficients, info, again = damped_solution(system.gram, rhs, lam, alpha, dtype=solve_dtype)
        # J^T (-c): the sign on the (b*k,) coefficients, not on the m-entry direction (exact either way)
        direction = system.jt_times(-coefficients)
        if j_previous is not None:
            direction = [torch.add(d, as_dtype(p, d.dtype), alpha=-momentum) for d, p in zip(direction, previous)]

        def correction(e: Tensor) -> list[Tensor]:
            return system.jt_times(-again(e))

    linear = r if j_previous is None else r - momentum * j_previous
    gram_c = as_dtype(system.gram, r.dtype) @ as_dtype(coefficients, r.dtype)
    predicted = linear - gram_c
    change = gram_c if j_previous is None else gram_c + momentum * j_previous  # J phi_t
    step = GramGaussNewtonStep(
        direction, system.residuals, system.gram, coefficients, info, predicted, alpha=alpha, change=change
    )
    return step, correction


def _parameter_space(
    system: GramSystem,
    params: Sequence[Tensor],
    lam: float,
    alpha: float,
    solve_dtype: torch.dtype | None,
    momentum: float,
    previous: Sequence[Tensor] | None,
    use_momentum: bool,
) -> tuple[GramGaussNewtonStep, Correction]:
    """``(lam J^T J + alpha I) phi_t = J^T r + alpha mu phi_{t-1}`` (Levenberg-Marquardt's system),
    solved from the dense ``J`` (:func:`~gramnewton.solve.parameter_space_solution`), and the
    :data:`Correction` of its factorised system."""
    jac = system.jacobian_columns(0, sum(p.numel() for p in params))
    r = system.residuals.reshape(-1)
    prior = momentum * flatten(previous, jac.dtype) if use_momentum else None
    phi, info, again = parameter_space_solution(jac, as_dtype(r, jac.dtype), lam, alpha, prior=prior, dtype=solve_dtype)
    direction = split_like(-phi, params)
    change = as_dtype(jac @ phi, r.dtype)
    predicted = r - change
    step = GramGaussNewtonStep(
        direction, system.residuals, system.gram, None, info, predicted, "parameter", alpha=alpha, change=change
    )
    return step, lambda e: split_like(-again(e.to(jac.dtype)), params)


def _accelerated(
    step: GramGaussNewtonStep,
    correction: Correction,
    system: GramSystem,
    closure: Closure,
    params: Sequence[Tensor],
    lam: float,
    acceleration: GeodesicAcceleration,
) -> GramGaussNewtonStep:
    """``step`` with its geodesic acceleration ``a`` (:class:`GeodesicAcceleration`): direction
    ``v + a/2`` when ``2 ||a|| / ||v|| <= max_ratio``. The acceleration is ``correction(lam r_vv)``:
    the step's own damped system, in its space, with the factorisation its solve accepted (see
    :data:`Correction`); ``predicted`` stays the velocity's linear model (the gain ratio compares
    the decrease of the step taken with the one ``v`` promises)."""
    if not 0 < step.direction_norm < math.inf:  # nothing to accelerate, or a step refused next
        return step
    r = system.residuals.reshape(-1)
    h = acceleration.step_size
    displaced = _residuals_along(params, step.direction, h, closure).reshape(-1).to(r.dtype)
    second = (2.0 / h) * ((displaced - r) / h - (step.predicted - r))  # r_vv; J v = predicted - r
    accel = correction(lam * second)
    ratio = 2.0 * total_norm(accel) / step.direction_norm
    if not ratio <= acceleration.max_ratio:  # also a NaN ratio (no finite correction): v alone
        return replace(step, acceleration_ratio=ratio)
    direction = [torch.add(v, a.to(v.dtype), alpha=0.5) for v, a in zip(step.direction, accel)]
    return replace(step, direction=direction, acceleration_ratio=ratio)


@torch.no_grad()
def _residuals_along(params: Sequence[Tensor], direction: Sequence[Tensor], h: float, closure: Closure) -> Tensor:
    """``closure()``'s residuals at ``w + h * direction``, without gradients; the parameters are
    restored from a copy (bit for bit), also when the closure raises."""
    params = list(params)
    saved = [p.detach().clone() for p in params]
    try:
        torch._foreach_add_(params, [d.to(p.dtype) for p, d in zip(params, direction)], alpha=h)
        return reevaluated_residuals(closure, params_dtype(params)).detach()
    finally:
        restore_parameters(params, saved)


@torch.no_grad()
def restore_parameters(params: Sequence[Tensor], saved: Sequence[Tensor]) -> None:
    """Copy ``saved`` (clones taken earlier) back into ``params``, bit for bit, in one
    multi-tensor call: a rejected step, or the acceleration's displaced evaluation, undone."""
    torch._foreach_copy_(list(params), list(saved))


def step_scale(
    phi_norm: float, momentum: float, count: int, *, bias_correction: bool, max_step_norm: float | None
) -> float:
    r"""The factor ``s_t`` of the step taken, ``w <- (1 - wd) w - s_t phi_t``.

    ``s_t = min(b_t, C / ||phi_t||)`` with ``b_t = 1 / sqrt(1 - mu^(2t))`` when ``bias_correction``
    (``t = count``, the momentum steps since ``phi_0 = 0``; ``b_t = 1`` otherwise) and
    ``C = max_step_norm`` (no bound when ``None``). ``b_t`` undoes the start-up shrinkage of
    ``phi``: steps of independent size ``sigma`` sum to ``||phi_t||^2 = sigma^2 (1 - mu^(2t)) / (1 - mu^2)``.
    Both off: ``s_t = 1``, the formula of :func:`gram_gauss_newton_direction` exactly.
    """
    scale = 1.0 / (1.0 - momentum ** (2 * count)) ** 0.5 if bias_correction and momentum else 1.0
    if max_step_norm is not None and phi_norm * scale > max_step_norm:
        scale = max_step_norm / phi_norm
    return scale


def scale_step(step: GramGaussNewtonStep, scale: float) -> GramGaussNewtonStep:
    """``step`` with its direction multiplied by ``scale``; the linearised model's predicted
    residuals follow (``r - J (s phi) = r - s (r - predicted)``), so a gain ratio judges the step taken."""
    r = step.residuals.reshape(-1).to(step.predicted.dtype)
    change = None if step.change is None else scale * step.change
    return replace(
        step,
        direction=[d * scale for d in step.direction],
        predicted=r - scale * (r - step.predicted),
        change=change,
    )


@torch.no_grad()
def apply_direction(params: Sequence[Tensor], direction: Sequence[Tensor], weight_decay: float = 0.0) -> None:
    """``w <- (1 - weight_decay) * w + d`` for every parameter, after every ``d`` was checked.

    ``direction``: one tensor per parameter, of its shape (no broadcasting); a mismatch raises
    ``ValueError`` before any parameter changes. One multi-tensor call per operation
    (``torch._foreach_*``, as ``torch.optim`` does), not one kernel launch per parameter."""
    params, direction = list(params), list(direction)
    if len(params) != len(direction):
        raise ValueError(
            f"got {len(params)} parameters and {len(direction)} directions (one per parameter); no parameter was changed"
        )
    for i, (p, d) in enumerate(zip(params, direction)):
        if p.shape != d.shape:
            raise ValueError(
                f"direction {i} has shape {tuple(d.shape)}, its parameter {tuple(p.shape)}; no parameter was changed"
            )
    if not params:
        return
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - weight_decay)
    torch._foreach_add_(params, [as_dtype(d, p.dtype) for p, d in zip(params, direction)])


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
    if not params:
        raise ValueError("full_batch_step got no parameter to train; no parameter was changed")
    step = gram_gauss_newton_direction(
        engine or ReferenceEngine(params), closure, lam=lam, alpha=alpha, solve_dtype=solve_dtype
    )
    apply_direction(params, step.direction)
    return step
