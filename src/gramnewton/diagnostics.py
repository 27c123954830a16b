"""What one optimizer step did, in numbers a user tuning GGN can read (``opt.last_diagnostics``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepDiagnostics:
    """Scalars of one step; each costs at most one reduction of a ``(b*k,)`` or ``(m,)`` vector.

    Losses are the batch's mean loss, the same quantity ``step()`` returns: the mean squared
    residual over the batch's ``b*k`` entries for ``loss="mse"``, the mean of ``l_i`` over its
    samples for another loss.

    Attributes:
        loss_before: loss of the batch before the step (``mean(r^2)`` for the square loss).
        loss_after: loss of the same batch after the step, when adaptive damping re-evaluated it
            (``None`` otherwise); under a rule with a ``subset``, of the re-evaluated samples only.
        predicted_decrease: ``loss_before - mean((r - J phi)^2)``, the decrease the linearised
            model promises.
        gain_ratio: ``(loss_before - loss_after) / predicted_decrease`` when measured, else ``None``.
        alpha: the damping this step was solved with (the rule may have changed it since).
        lam: the Gram scale this step was solved with.
        momentum: ``mu`` of this step.
        jitter: what the solve added to the diagonal beyond ``alpha`` (0 for a plain Cholesky).
        solve_method: ``"cholesky"``, ``"jitter"`` or ``"eigh"`` (sample space), ``"svd"``, or
            ``"normal_equations"`` or ``"qr"`` (parameter space; :class:`~gramnewton.solve.SolveInfo`).
        solve_space: ``"sample"`` or ``"parameter"``.
        condition: estimate of the condition number of the solved matrix (``lam G + alpha I`` or
            ``lam J^T J + alpha I``): ``(max L_ii / min L_ii)^2`` of its Cholesky factor, or the
            eigenvalue ratio after an eigendecomposition; a lower bound of the true one.
        step_norm: ``||phi_t||``, the norm of the step over all parameters (without weight decay).
        rejected: the damping rule undid the step (parameters and momentum unchanged).
        acceleration_ratio: ``2 ||a|| / ||v||`` of the step's geodesic acceleration (added when at
            most its ``max_ratio``), ``None`` without ``geodesic_acceleration``.
        retries: how many times a rejected attempt was solved again from the batch's system
            (:class:`~gramnewton.damping.GainRatioDamping`'s ``retries``); the other fields
            describe the last attempt.
    """

    loss_before: float
    loss_after: float | None
    predicted_decrease: float
    gain_ratio: float | None
    alpha: float
    lam: float
    momentum: float
    jitter: float
    solve_method: str
    solve_space: str
    condition: float | None
    step_norm: float
    rejected: bool = False
    acceleration_ratio: float | None = None
    retries: int = 0
