"""Physics-informed residuals: the few pieces users write by hand for every PDE (torch only).

A physics-informed network (PINN) ``u(w, x)`` is trained on residuals at collocation points:
interior points ``x_i`` where the PDE must hold (e.g. ``-Laplace u - f``) and boundary points
where the boundary condition must hold (``u - g``). This module provides

- :func:`sample_interior`, :func:`sample_boundary`: uniform collocation points in a box and on
  its faces,
- :func:`pointwise`: a model as a function of one point, ``u(params, x) -> scalar``,
- :func:`gradient`, :func:`laplacian`: input derivatives of such a function (``torch.func``, so
  they compose with the engines' ``vmap(jacrev(...))``),
- :func:`residual`: interior + boundary residuals with weights, as a
  :class:`~gramnewton.engines.FunctionalResidual` (the closure of
  ``GramGaussNewton(..., engine="functional")``),
- :func:`relative_l2`: the relative L2 error against a reference solution,
- :class:`~gramnewton.forward_laplacian.ForwardLaplacian` and :func:`taylor_residual`: the same
  residuals for an MLP with the derivatives propagated forward, a plain closure whose Gram
  matrix the default (hooks) engine computes exactly and fast (``engine="auto"``).

Example (2-D Poisson, ``-Laplace u = f`` on the unit square, ``u = 0`` on its boundary)::

    u = pinn.pointwise(model)
    interior = lambda p, x: -pinn.laplacian(lambda y: u(p, y), x) - f(x)
    boundary = lambda p, x: u(p, x)
    closure = pinn.residual(dict(model.named_parameters()),
                            (interior, pinn.sample_interior(900, [0, 0], [1, 1])),
                            (boundary, pinn.sample_boundary(120, [0, 0], [1, 1])))
    opt = GramGaussNewton(model, engine="functional", alpha=1e-6, adaptive_damping=True)
    opt.step(closure)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from .engines.functional import FunctionalResidual, PerSample, Term
from .forward_laplacian import ForwardLaplacian, Sin, Taylor

__all__ = [
    "ForwardLaplacian",
    "Sin",
    "Taylor",
    "TaylorResidual",
    "gradient",
    "laplacian",
    "pointwise",
    "relative_l2",
    "residual",
    "sample_boundary",
    "sample_interior",
    "taylor_residual",
]

Point = Callable[[Tensor], Tensor]


def _box(low: Sequence[float], high: Sequence[float], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    lo, hi = torch.as_tensor(low, dtype=dtype).reshape(-1), torch.as_tensor(high, dtype=dtype).reshape(-1)
    if lo.shape != hi.shape or lo.numel() == 0 or not bool((hi > lo).all()):
        raise ValueError(f"need low < high in every coordinate, got low={list(low)}, high={list(high)}")
    return lo, hi


def sample_interior(
    n: int,
    low: Sequence[float],
    high: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(n, d)`` points drawn uniformly from the box ``[low, high]`` (``d = len(low)``)."""
    lo, hi = _box(low, high, dtype)
    return lo + (hi - lo) * torch.rand(n, lo.numel(), generator=generator, dtype=dtype)


def sample_boundary(
    n: int,
    low: Sequence[float],
    high: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``(n, d)`` points drawn uniformly from the surface of the box ``[low, high]``.

    A face is chosen with probability proportional to its ``(d-1)``-volume (both faces normal to
    a coordinate have the same area), then a point uniformly on it. In one dimension the two end
    points are drawn with equal probability.
    """
    lo, hi = _box(low, high, dtype)
    d = lo.numel()
    x = sample_interior(n, low, high, generator=generator, dtype=dtype)
    widths = hi - lo
    areas = torch.stack([widths[torch.arange(d) != j].prod() for j in range(d)])  # prod() of nothing is 1
    axis = torch.multinomial(areas, n, replacement=True, generator=generator)
    upper = torch.rand(n, generator=generator, dtype=dtype) < 0.5
    rows = torch.arange(n)
    x[rows, axis] = torch.where(upper, hi[axis], lo[axis])
    return x


def pointwise(model: nn.Module) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """``u(params, x)``: ``model`` at one point ``x`` of shape ``(d,)``, a scalar.

    ``params`` maps parameter names to tensors (``torch.func.functional_call``); the model must
    have one output.
    """

    def u(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, dict(params), (x.unsqueeze(0),)).reshape(())

    return u


def gradient(u: Point, x: Tensor) -> Tensor:
    """``(d,)`` gradient of the scalar function ``u`` at the point ``x`` of shape ``(d,)``."""
    return jacrev(u)(x)


def laplacian(u: Point, x: Tensor, dims: Sequence[int] | None = None) -> Tensor:
    """``sum_j d^2 u / dx_j^2`` at the point ``x`` of shape ``(d,)``, over ``dims`` (default all).

    E.g. ``dims=range(1, d)`` for the spatial Laplacian of ``u(t, x)``. Forward-over-reverse
    (``torch.func.hessian``): exact, and it composes with ``vmap`` and ``jacrev``.
    """
    diagonal = torch.diagonal(hessian(u)(x))
    return diagonal.sum() if dims is None else diagonal[list(dims)].sum()


def _part(part: tuple) -> tuple[Callable, Tensor, float]:
    """``(fn, points)`` or ``(fn, points, weight)`` validated; returns ``(fn, points, weight)``."""
    if len(part) not in (2, 3):
        raise ValueError(f"each part is (fn, points) or (fn, points, weight), got {len(part)} items")
    fn, points, *rest = part
    weight = float(rest[0]) if rest else 1.0
    if not weight > 0:
        raise ValueError(f"a part's weight must be positive, got {weight}")
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape (n, d) with n > 0, got {tuple(points.shape)}")
    return fn, points, weight


def residual(
    params: Mapping[str, Tensor], *parts: tuple[PerSample, Tensor] | tuple[PerSample, Tensor, float]
) -> FunctionalResidual:
    """Interior + boundary (+ any other) residuals as one closure.

    Each part is ``(fn, points)`` or ``(fn, points, weight)`` with ``fn(params, x) -> scalar`` for
    one point ``x`` and ``points`` of shape ``(n, d)``. Rows are scaled by ``sqrt(weight / n)``,
    so that half the squared residual norm is the usual PINN loss
    ``1/2 sum_parts weight * mean_i fn(params, x_i)^2`` (``weight`` defaults to 1).
    """
    terms = []
    for part in parts:
        fn, points, weight = _part(part)
        terms.append(Term(fn, (points,), math.sqrt(weight / points.shape[0])))
    return FunctionalResidual(params, *terms)


BatchPart = Callable[[Taylor, Tensor], Tensor]


class TaylorResidual:
    """A closure: the weighted residuals of every part from one :class:`ForwardLaplacian` pass.

    All parts' points go through the network as one batch, so that every module is called once
    with one row per residual (what the hooks engine needs for per-sample Jacobians); each part's
    function then sees its own rows. Calling it returns ``(b,)`` (or ``(b, k)``) residuals, part
    after part, row ``i`` depending on point ``i`` only.

    Attributes:
        taylor: the :class:`ForwardLaplacian` of the model.
        parts: ``(fn, points, scale)`` per part, ``scale = sqrt(weight / n)``.
    """

    def __init__(self, taylor: ForwardLaplacian, parts: list[tuple[BatchPart, Tensor, float]]):
        self.taylor, self.parts = taylor, parts
        self._points = torch.cat([points for _, points, _ in parts])

    def __call__(self) -> Tensor:
        derivatives = self.taylor(self._points)
        rows, start = [], 0
        for fn, points, scale in self.parts:
            stop = start + points.shape[0]
            r = fn(derivatives.rows(start, stop), points)
            if r.shape[0] != points.shape[0]:
                raise ValueError(f"a part's function returned {tuple(r.shape)} for {points.shape[0]} points")
            rows.append(scale * r.reshape(points.shape[0], -1))
            start = stop
        if len({r.shape[1] for r in rows}) != 1:
            raise ValueError(f"every part must return the same number of outputs, got {[r.shape[1] for r in rows]}")
        out = torch.cat(rows)
        return out.squeeze(1) if out.shape[1] == 1 else out


def taylor_residual(
    model: nn.Sequential,
    *parts: tuple[BatchPart, Tensor] | tuple[BatchPart, Tensor, float],
    dims: Sequence[int] | None = None,
) -> TaylorResidual:
    """Interior + boundary (+ any other) residuals of an MLP by the forward Laplacian.

    Each part is ``(fn, points)`` or ``(fn, points, weight)`` with ``points`` ``(n, d)`` and
    ``fn(t, points) -> (n,)`` (or ``(n, k)``), ``t`` the part's :class:`Taylor` (``t.value``
    ``(n, k)``, ``t.gradient`` ``(n, d, k)``, ``t.laplacian`` ``(n, k)`` over ``dims``). Rows are
    scaled by ``sqrt(weight / n)`` as in :func:`residual`. E.g. for ``-Laplace u = f``,
    ``u = g`` on the boundary::

        closure = pinn.taylor_residual(model,
                                       (lambda t, x: -t.laplacian[:, 0] - f(x), x_interior),
                                       (lambda t, x: t.value[:, 0] - g(x), x_boundary, 10.0))
        GramGaussNewton(model).step(closure)   # engine="auto": the hooks engine, exact

    ``model`` is as for :class:`ForwardLaplacian` (Linear layers and smooth elementwise
    activations in an ``nn.Sequential``).
    """
    if not parts:
        raise ValueError("taylor_residual needs at least one part")
    taylor = ForwardLaplacian(model, dims)
    checked = []
    for part in parts:
        fn, points, weight = _part(part)
        if points.shape[1] != taylor.d:
            raise ValueError(
                f"the model takes {taylor.d} coordinates; a part's points have shape {tuple(points.shape)}"
            )
        checked.append((fn, points, math.sqrt(weight / points.shape[0])))
    return TaylorResidual(taylor, checked)


def relative_l2(predicted: Tensor, exact: Tensor) -> float:
    """``||predicted - exact||_2 / ||exact||_2`` over the evaluation points.

    On points drawn uniformly from the domain this is the Monte Carlo estimate of the relative
    ``L^2`` error. Shapes must match (e.g. both ``(n,)``).
    """
    if predicted.shape != exact.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and exact {tuple(exact.shape)} differ in shape")
    norm = exact.detach().double().norm()
    if not norm > 0:
        raise ValueError("the reference solution is zero on the evaluation points: the relative error is undefined")
    return float((predicted.detach().double() - exact.detach().double()).norm() / norm)
