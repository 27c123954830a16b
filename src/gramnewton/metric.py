r"""The Gram-Gauss-Newton step in a diagonal metric: the kernel regression with ``J D J^T``.

GGN's step is the smallest change of the weights, in the Euclidean norm, that fits the batch's
linearised model. In the metric ``D^{-1}`` (``D`` ``(m,)`` diagonal, positive) the same kernel
regression reads, with ``r`` ``(b*k,)``, ``J`` ``(b*k, m)``, ``mu`` the momentum,

.. math::
    \phi_t = \mu \phi_{t-1} + D J^\top (\lambda J D J^\top + \alpha I)^{-1} (r - \lambda \mu J \phi_{t-1}),

the minimiser of ``lam ||J phi - r / lam||^2 + alpha ||phi - mu phi_{t-1}||^2_{D^{-1}}``: the
Euclidean step in the coordinates ``D^{-1/2} w``, whose Jacobian is ``J D^{1/2}``. So the step
needs only a :class:`~gramnewton.engines.GramSystem` whose Gram is ``J D J^T``, whose ``J^T v`` is
``D J^T v`` and whose ``J u`` is the plain one (:func:`metric_system`); the optimizer's momentum,
damping rule, rejection and geodesic acceleration are unchanged.

:class:`SecondMomentMetric` takes ``D`` from Adam's second moment of the mini-batch gradient
``g = J^T r / b``: ``v <- beta2 v + (1 - beta2) g^2``, ``s = sqrt(v / (1 - beta2^t))``,
``D = (s + eps mean(s))^(-power)`` divided by its mean (so that ``alpha`` keeps its scale).
Scaling every gradient by one factor leaves ``D`` as it is, and so does the arithmetic: what is
kept is the root ``sqrt(v)`` (optimizer state ``metric_root_moment``), updated as
``hypot(sqrt(beta2) sqrt(v), sqrt(1 - beta2) g)``, which has ``g``'s range (``v`` itself, in
float32, underflows for ``|g| < ~1e-19`` and overflows above ``~1e19``, in float16 below ``|g| ~
2e-4``: ``D`` all ones where it should spread over decades, or NaN), and ``D`` is formed from
``s / max(s)``.
``power = 1`` is Adam's own metric, ``1/2`` (the default) its square root, ``0`` the Euclidean
one. Measured on the regression demo at the real step cost (docs/convergence.md, thirty-eighth
session; 1.16x the Euclidean step's time): on seed 0 the test MSE at 90 s a third below Adam's
and the defaults'; on seeds 1 and 2 no better, and on some initialisations the step stalls (the
damping rule rejecting steps that lengthen on coordinates with small gradients).

With ``per_tensor=True`` ``D`` is one weight per parameter tensor,
``D_l = (rms_l(s) + eps mean(s))^(-power)`` (``rms_l`` the root mean square of ``s`` over the
tensor's entries), normalised the same way. Its Gram ``sum_l D_l J_l J_l^T`` is a weighted sum of
the per-parameter blocks an engine forms anyway (``GramSystem.weighted_gram``), so the step costs
the Euclidean one's plus the batch gradient (1.07x on the demo's network; thirty-ninth session).

The per-tensor metric with ``power=1`` is the default's (``GramGaussNewton(model)``,
``metric="auto"``) with a damping rule, the square loss and steps solved in sample space
(docs/convergence.md, fortieth session: lower test MSE than the Euclidean step on the demo's
seeds 0-2, rotated-digits, concrete and diabetes). With a fixed ``alpha``
(``GramGaussNewton(model, lam=..., alpha=..., momentum=mu, adaptive_damping=False)``) ``"auto"``
is the Euclidean step of the design's formula, which outside checks rely on; ``metric=None`` (or
``"euclidean"``) asks for it everywhere.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .engines import GramSystem
from .engines.base import check_fits
from .engines.handlers import add_gram_lower, mirror_lower
from .engines.reference import flatten, split_like
from .solve import SingularGramError, is_number


@dataclass(frozen=True)
class SecondMomentMetric:
    """``D = (s + eps mean(s))^(-power) / mean(...)`` from Adam's bias-corrected root second moment
    ``s`` of the mini-batch gradients (module docstring).

    Attributes:
        power: ``0`` the Euclidean metric, ``1/2`` (default) the square root of Adam's, ``1``
            Adam's; in ``[0, 1]``.
        beta2: the second moment's decay per accepted step, in ``[0, 1)`` (Adam's ``0.999``).
        relative_eps: ``eps``, relative to ``mean(s)``: a coordinate whose gradients vanish gets
            a weight at most ``eps^(-power)`` times the others' (``> 0``).
        per_tensor: one weight per parameter tensor, from the root mean square of its ``s``
            (module docstring), instead of one per entry.
    """

    power: float = 0.5
    beta2: float = 0.999
    relative_eps: float = 1e-3
    per_tensor: bool = False

    def __post_init__(self) -> None:
        for name, low, high, closed in (("power", 0, 1, True), ("beta2", 0, 1, False)):
            value = getattr(self, name)
            inside = is_number(value) and low <= value and (value <= high if closed else value < high)
            if not inside:
                raise ValueError(
                    f"Invalid metric {name}: {value!r} (must be in [{low}, {high}{']' if closed else ')'})"
                )
        eps = self.relative_eps
        if not is_number(eps) or not 0 < eps < math.inf:
            raise ValueError(f"Invalid metric relative_eps: {eps!r} (must be a finite number > 0)")
        if not isinstance(self.per_tensor, bool):
            raise ValueError(f"Invalid metric per_tensor: {self.per_tensor!r} (must be True or False)")

    def updated_root_moment(self, root: Tensor, gradient: Tensor) -> Tensor:
        """``sqrt(beta2 v + (1 - beta2) g^2)`` from the root ``root = sqrt(v)``, as ``hypot(sqrt(beta2)
        root, sqrt(1 - beta2) g)``: no ``g^2`` is formed, so nothing underflows or overflows inside
        ``g``'s range. NaN where ``root`` is negative (a corrupt state: :meth:`scaling` refuses it;
        ``hypot`` alone would drop the sign). A new tensor; ``root`` is left as it is (a step the
        damping rule rejects must not change it). ``root``, ``gradient``: ``(m,)``."""
        updated = torch.hypot(root * math.sqrt(self.beta2), gradient * math.sqrt(1 - self.beta2))
        return updated.masked_fill(root < 0, math.nan)

    def scaling(self, root: Tensor, count: int, sizes: Sequence[int] | None = None) -> Tensor:
        """``D`` ``(m,)`` from the root second moment ``root = sqrt(v)`` ``(m,)`` after ``count >= 1``
        updates. All ones where ``root`` is zero throughout (no gradient yet), and for ``power =
        0``. ``sizes``: the parameters' numbers of entries in order (summing to ``m``), which
        ``per_tensor`` needs. ``D`` depends on ``s`` only through ``s / max(s)``, so Adam's bias
        correction ``s = root / sqrt(1 - beta2^count)``, a common factor, cancels, and ``c * root``
        gives the same ``D`` (to round-off) for any ``c > 0`` that keeps it finite.

        Raises:
            ValueError: ``count`` is not an int ``>= 1``.
            SingularGramError: ``root`` has a NaN, infinite or negative entry (a gradient that is
                not finite, or a corrupt ``state_dict``): no ``D`` is defined (not all ones)."""
        if not (isinstance(count, int) and count >= 1):  # 1 - beta2^0 = 0: a division by zero
            raise ValueError(f"Invalid metric count: {count!r} (the updates made, an int >= 1)")
        if self.power == 0:
            return torch.ones_like(root)
        low, top = torch.aminmax(root)  # a NaN anywhere makes both NaN
        if not bool((low >= 0) & (top > 0) & top.isfinite()):  # one sync a step, as before
            if not bool((low == 0) & (top == 0)):  # read only off the common path
                raise SingularGramError(
                    "the metric's second moment is not a finite non-negative number (a batch gradient "
                    "J^T r that is not finite, or a state_dict whose metric_root_moment (or an older "
                    "metric_moment) holds NaN, infinite or negative entries); no parameter was changed"
                )
            return torch.ones_like(root)  # all zero: no gradient yet
        # s relative to its largest entry, in [0, 1] whatever the gradients' scale: neither the mean
        # (a sum of up to m entries), the squares of rms_l nor the power -power overflows, and what
        # underflows in a square (an entry below 1e-19 of the largest, in float32) is dwarfed by
        # eps mean(s) >= eps max(s) / m
        unit = root / top
        mean = unit.mean()
        if not self.per_tensor:
            weight = (unit + self.relative_eps * mean).pow(-self.power)
        elif sizes is None:
            raise ValueError("a per-tensor metric needs the parameters' sizes")
        else:
            rms = torch.stack([part.square().mean().sqrt() for part in unit.split(list(sizes))])
            repeats = torch.tensor(list(sizes), device=unit.device)
            weight = (rms + self.relative_eps * mean).pow(-self.power).repeat_interleave(repeats)
        return weight / weight.mean()


METRICS = {"second_moment": SecondMomentMetric}


def metric_from(spec: None | str | Mapping[str, Any] | SecondMomentMetric) -> SecondMomentMetric | None:
    """The metric an optimizer's ``metric`` names: ``None`` or ``"euclidean"`` (the name a config
    file can write; also ``{"name": "euclidean"}``) the Euclidean step (no metric),
    ``"second_moment"`` a :class:`SecondMomentMetric` with its defaults, a mapping ``{"name":
    "second_moment", **arguments}`` (e.g. ``{"name": "second_moment", "power": 0.75}``, from a
    JSON grid or a config table), or the metric itself."""
    if spec is None or isinstance(spec, SecondMomentMetric):
        return spec
    if spec == "euclidean":
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"Invalid metric: {spec!r} (expected None, a name, a mapping or a SecondMomentMetric)")
    arguments = dict(spec)
    name = arguments.pop("name", None)
    if name == "euclidean":  # the name the error below lists, in a mapping (a grid or config table)
        if arguments:
            raise ValueError(f"metric 'euclidean' takes no arguments, got {', '.join(map(repr, arguments))}")
        return None
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; expected one of {', '.join(['euclidean', *METRICS])}")
    try:
        return METRICS[name](**arguments)
    except TypeError as error:  # an argument the metric does not have
        raise ValueError(f"metric {name!r}: {error}") from None


def batch_gradient(system: GramSystem) -> Tensor:
    """``g = J^T r / b`` ``(m,)``, the mini-batch gradient of half the mean squared residual (for
    a general loss, of its pseudo-residuals: the loss's gradient), in the engine's parameter order."""
    r = system.residuals
    return flatten(system.jt_times(r.reshape(-1)), r.dtype) / r.shape[0]


def metric_system(
    system: GramSystem, params: Sequence[Tensor], scaling: Tensor, *, per_tensor: bool = False
) -> GramSystem:
    """``system`` in the metric ``D^{-1}``, ``D = scaling`` ``(m,)`` (module docstring).

    ``per_tensor``: ``scaling`` is constant over each parameter's entries (only its first entry
    is read), and the Gram ``sum_l D_l J_l J_l^T`` comes from the engine's
    ``system.weighted_gram`` where it has one.

    Returns:
        residuals as ``system``'s; ``gram`` ``J D J^T`` ``(b*k, b*k)``, from ``weighted_gram``
        (above) or from ``J D^{1/2}`` one parameter's columns at a time
        (``system.jacobian_columns``: the engine's dense per-sample rows); the plain ``J J^T`` is
        not needed; ``jt_times(v) = D J^T v``; ``j_times(u) = J u`` (momentum's ``J phi_{t-1}``,
        as without a metric). No dense ``J`` and no ``jacobian_columns``: the step is solved in
        sample space.

    Raises:
        ValueError: the engine can neither weight its Gram per parameter (for ``per_tensor``) nor
            materialise ``J`` (``jacobian_columns`` is ``None``).
    """
    residuals = system.residuals
    rows = residuals.numel()
    if per_tensor and system.weighted_gram is not None:
        starts = torch.tensor([0, *itertools.accumulate(p.numel() for p in params)][:-1], device=scaling.device)
        # each parameter's first entry (an empty parameter's weight is read anywhere: it has no columns)
        gram = system.weighted_gram(scaling[starts.clamp(max=scaling.numel() - 1)].tolist())
    elif system.jacobian_columns is None:
        raise ValueError("a metric needs the engine's dense Jacobian columns, which this engine does not provide")
    else:
        check_fits((rows, rows), residuals, "Gram matrix")
        gram = residuals.new_zeros(rows, rows)
        root = scaling.sqrt().to(residuals.dtype)
        start = 0
        for p in params:
            stop = start + p.numel()
            add_gram_lower(gram, system.jacobian_columns(start, stop) * root[start:stop])
            start = stop
        mirror_lower(gram)
    per_parameter = split_like(scaling, params)

    def jt_times(v: Tensor) -> list[Tensor]:
        return [t * d.to(t.dtype) for t, d in zip(system.jt_times(v), per_parameter)]

    return GramSystem(residuals=residuals, gram=gram, jt_times=jt_times, j_times=system.j_times)
