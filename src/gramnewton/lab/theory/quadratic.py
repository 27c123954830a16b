"""Theorem 1 measured: full-batch GGN on the two-layer net of Eq. 12 at growing width ``M``.

Per step ``t`` it records ``||f_t - y||``, Theorem 1's constant
``C_t = sqrt(M) ||f_{t+1} - y|| / ||f_t - y||^2``, ``lambda_min(G_t)`` and the Gram drift
``||G_t - G_0||_2 / ||G_0||_2``; per width, the distance of ``G_0`` from the limit ``K`` of Eq. 13.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models import get_model
from .ntk import least_eigenvalue
from .runs import run_full_batch

# A residual below this is float64 round-off (measured floor about 1e-14 for n = 64), so a
# ratio whose numerator is there says nothing about the rate.
RESIDUAL_FLOOR = 1e-11


def seeded_two_layer(d: int, width: int, act: str, seed: int) -> torch.nn.Module:
    """The Eq. 12 network in float64, its ``W`` and ``a`` drawn from ``seed``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_model("two_layer", in_channels=d, width=width, act=act).double()


@dataclass(frozen=True)
class QuadraticRun:
    """One width, one network seed. Lists are indexed by step ``t``.

    Attributes:
        residual_norms: ``||f_t - y||``, ``t = 0..T``; ``T < steps`` when round-off was reached
            early (further steps only stir round-off).
        constants: ``C_t``, ``t = 0..T-1``; ``None`` where ``||f_{t+1} - y||`` is at round-off.
        lambda_min: ``lambda_min(G_t)``, ``t = 0..T-1``.
        drift: ``||G_t - G_0||_2 / ||G_0||_2``, ``t = 0..T-1``.
        kernel_error: ``||G_0 - K||_2 / ||K||_2``.
    """

    width: int
    seed: int
    residual_norms: list[float]
    constants: list[float | None]
    lambda_min: list[float]
    drift: list[float]
    kernel_error: float

    @property
    def constant_max(self) -> float | None:
        """Largest measured ``C_t`` (``None`` if no step left round-off)."""
        valid = [c for c in self.constants if c is not None]
        return max(valid) if valid else None


def quadratic_run(
    x: Tensor,
    y: Tensor,
    kernel: Tensor,
    width: int,
    steps: int,
    seed: int,
    act: str = "softplus",
    engine: str = "closed_form",
) -> QuadraticRun:
    """Run ``steps`` full-batch GGN steps at width ``width``; ``x`` ``(n, d)``, ``y`` ``(n,)``, ``kernel`` ``(n, n)``."""
    model = seeded_two_layer(x.shape[1], width, act, seed)
    trace = run_full_batch(model, x, y, steps, engine, stop_below=RESIDUAL_FLOOR)
    norms = [float(r.norm()) for r in trace.residuals]
    g0 = trace.grams[0]
    g0_norm = float(torch.linalg.matrix_norm(g0, 2))
    return QuadraticRun(
        width=width,
        seed=seed,
        residual_norms=norms,
        constants=[
            math.sqrt(width) * norms[t + 1] / norms[t] ** 2 if norms[t + 1] > RESIDUAL_FLOOR else None
            for t in range(len(trace.grams))
        ],
        lambda_min=[least_eigenvalue(g) for g in trace.grams],
        drift=[float(torch.linalg.matrix_norm(g - g0, 2)) / g0_norm for g in trace.grams],
        kernel_error=float(torch.linalg.matrix_norm(g0 - kernel, 2) / torch.linalg.matrix_norm(kernel, 2)),
    )


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` over the points with ``y > 0`` (NaN with
    fewer than two). A zero is a quantity not measured, not a value: the drift of a run that took
    one step (``--steps 1``, or round-off reached at once) is 0, and its log ended the study in
    ``math domain error`` before anything was written."""
    points = [(a, b) for a, b in zip(xs, ys) if b > 0]
    if len(points) < 2:
        return float("nan")
    lx = [math.log(a) for a, _ in points]
    ly = [math.log(b) for _, b in points]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


@dataclass(frozen=True)
class QuadraticRow:
    """Medians over seeds at one width (``None`` where no seed had a measurable ``C``).

    ``constants[t]`` is the median of ``C_t`` over the seeds where it was measurable.
    """

    width: int
    constants: list[float | None]
    constant_max: float | None
    drift_max: float
    lambda_min_g0: float
    kernel_error: float
    steps_to_floor: float


@dataclass
class QuadraticStudy:
    """All runs of ``gramnewton theory quadratic`` and their summary."""

    n: int
    d: int
    steps: int
    act: str
    lambda_0: float
    runs: list[QuadraticRun] = field(default_factory=list)

    def rows(self) -> list[QuadraticRow]:
        """One :class:`QuadraticRow` per width, in increasing width."""
        out = []
        for width in sorted({r.width for r in self.runs}):
            runs = [r for r in self.runs if r.width == width]
            consts = [r.constant_max for r in runs if r.constant_max is not None]
            out.append(
                QuadraticRow(
                    width=width,
                    constants=[_median_at(runs, t) for t in range(self.steps)],
                    constant_max=statistics.median(consts) if consts else None,
                    drift_max=statistics.median(max(r.drift) for r in runs),
                    lambda_min_g0=statistics.median(r.lambda_min[0] for r in runs),
                    kernel_error=statistics.median(r.kernel_error for r in runs),
                    steps_to_floor=statistics.median(_steps_to_floor(r.residual_norms) for r in runs),
                )
            )
        return out

    def slopes(self, min_width: int = 0) -> dict[str, float]:
        """Log-log slopes against ``M`` (widths ``>= min_width``) of the medians of ``drift_max``,
        ``kernel_error`` and ``C_0``, ``C_1`` (Theorem 1's bounds: ``<= -1/2``; ``K`` is a Monte
        Carlo mean over ``M`` neurons: ``-1/2``; ``C_t``: ``<= 0``)."""
        rows = [r for r in self.rows() if r.width >= min_width]
        out = {
            "drift": loglog_slope([r.width for r in rows], [r.drift_max for r in rows]),
            "kernel_error": loglog_slope([r.width for r in rows], [r.kernel_error for r in rows]),
        }
        for t in (0, 1):
            with_c = [r for r in rows if t < len(r.constants) and r.constants[t] is not None]  # C_1: steps >= 2
            out[f"C_{t}"] = loglog_slope([r.width for r in with_c], [r.constants[t] for r in with_c])
        return out


def _median_at(runs: list[QuadraticRun], t: int) -> float | None:
    values = [r.constants[t] for r in runs if t < len(r.constants) and r.constants[t] is not None]
    return statistics.median(values) if values else None


def _steps_to_floor(norms: list[float]) -> int:
    """First step ``t`` with ``||f_t - y||`` at round-off (``len(norms)`` if never)."""
    return next((t for t, r in enumerate(norms) if r <= RESIDUAL_FLOOR), len(norms))
