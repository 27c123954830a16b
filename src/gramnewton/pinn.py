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
from .forward_laplacian import ForwardLaplacian, Sin, Taylor, check_dtype

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


def _count(n: int) -> int:
    """``n`` checked to be a positive integer (a count of points)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of points must be a positive integer, got {n!r}")
    return n


def _box(
    low: Sequence[float], high: Sequence[float], dtype: torch.dtype, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    lo = torch.as_tensor(low, dtype=dtype, device=device).reshape(-1)
    hi = torch.as_tensor(high, dtype=dtype, device=device).reshape(-1)
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
    """``(n, d)`` points drawn uniformly from the box ``[low, high]`` (``d = len(low)``, ``n >= 1``),
    on the ``generator``'s device (a CPU generator draws on the CPU whatever torch's default
    device), else on the default device."""
    n = _count(n)
    lo, hi = _box(low, high, dtype, _device(generator))
    return lo + (hi - lo) * torch.rand(n, lo.numel(), generator=generator, dtype=dtype, device=lo.device)


def _device(generator: torch.Generator | None) -> torch.device | None:
    """Where a draw with ``generator`` must be made (torch refuses one on another device)."""
    return None if generator is None else generator.device


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
    points are drawn with equal probability. ``n >= 1``. On the ``generator``'s device, as
    :func:`sample_interior`.
    """
    n = _count(n)
    lo, hi = _box(low, high, dtype, _device(generator))
    d, device = lo.numel(), lo.device
    x = sample_interior(n, low, high, generator=generator, dtype=dtype)
    widths = hi - lo
    # each face's (d-1)-volume: the product of the other widths (prod() of nothing is 1)
    areas = torch.stack([widths[torch.arange(d, device=device) != j].prod() for j in range(d)])
    axis = torch.multinomial(areas, n, replacement=True, generator=generator)
    upper = torch.rand(n, generator=generator, dtype=dtype, device=device) < 0.5
    rows = torch.arange(n, device=device)
    x[rows, axis] = torch.where(upper, hi[axis], lo[axis])
    return x


def _by_slot(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` keyed by parameter *slot*: each module object's own parameter attribute once.

    ``torch.func.functional_call`` with its default ``tie_weights=True`` leaves a module called at
    two places of the model (one Linear twice in a Sequential) holding the substituted tensors
    after the call (torch 2.13: the model's Parameters are replaced for good, and the optimizer
    trains tensors the model no longer uses); with ``tie_weights=False`` a Parameter shared by two
    modules is substituted in one of them only. Setting every slot once, untied, does both right:
    a shared module is one slot, a tied Parameter one slot per module that holds it, each given
    the value of the Parameter's name in ``params`` (``model.named_parameters()``'s name or any
    alias). Keys of ``params`` that name no Parameter (buffers) pass through.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    by_slot = {name: value for name, value in params.items() if name not in aliases}
    for prefix, module in model.named_modules():  # a module object once, at its first name
        for local, p in module._parameters.items():
            slot = f"{prefix}.{local}" if prefix else local
            name = canonical.get(id(p)) if p is not None else None
            if slot in params:
                by_slot[slot] = params[slot]
            elif name is not None and name in params:
                by_slot[slot] = params[name]
    return by_slot


def _input_width(model: nn.Module) -> int | None:
    """``d`` when ``model`` is a Linear or a Sequential that starts with one (else unknown)."""
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else model
    return first.in_features if isinstance(first, nn.Linear) else None


def pointwise(model: nn.Module) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """``u(params, x)``: ``model`` at one point ``x`` of shape ``(d,)``, a scalar.

    ``params`` maps parameter names to tensors, as ``dict(model.named_parameters())`` (a
    parameter it leaves out keeps the model's own value); the model must have one output. Shared
    modules and tied parameters see the given values everywhere and stay the model's own after
    the call (:func:`_by_slot`).
    """

    width = _input_width(model)

    def u(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        if x.dim() != 1 or (width is not None and x.shape[0] != width):
            wanted = f"({width},)" if width is not None else "(d,)"
            raise ValueError(f"u(params, x) takes one point of shape {wanted}, got {tuple(x.shape)}")
        values = _by_slot(model, params)
        return functional_call(model, values, (x.unsqueeze(0),), tie_weights=False, strict=False).reshape(())

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
    if dims is None:
        return diagonal.sum()
    chosen = list(dims)
    if not chosen or len(set(chosen)) != len(chosen) or any(not 0 <= j < diagonal.shape[0] for j in chosen):
        # a repeated coordinate would be counted twice, a negative one wrap around
        raise ValueError(f"dims must be distinct coordinates in 0..{diagonal.shape[0] - 1}, got {chosen}")
    return diagonal[chosen].sum()


def _part(part: tuple) -> tuple[Callable, Tensor, float]:
    """``(fn, points)`` or ``(fn, points, weight)`` validated; returns ``(fn, points, weight)``."""
    if len(part) not in (2, 3):
        raise ValueError(f"each part is (fn, points) or (fn, points, weight), got {len(part)} items")
    fn, points, *rest = part
    weight = _weight(rest[0]) if rest else 1.0
    if not isinstance(points, Tensor):
        raise ValueError(f"a part's points must be a tensor of shape (n, d), got a {type(points).__name__}")
    if not points.is_floating_point():
        raise ValueError(f"a part's points must be floating point (e.g. float64), got {points.dtype}")
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape (n, d) with n > 0, got {tuple(points.shape)}")
    bad = ~torch.isfinite(points).all(1)
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} of a part's {points.shape[0]} points have NaN or Inf coordinates (the first: row "
            f"{int(bad.nonzero()[0])}); drop or fix them"
        )
    return fn, points, weight


def _weight(weight: object) -> float:
    """A part's weight checked to be one finite positive number (not one per point)."""
    if isinstance(weight, Tensor) and weight.numel() != 1:
        raise ValueError(
            f"a part's weight must be one number, got a tensor of shape {tuple(weight.shape)}; for per-point "
            "weights, multiply the part's residuals by their square roots in its function"
        )
    value = float(weight)  # type: ignore[arg-type]
    if not math.isfinite(value) or not value > 0:
        raise ValueError(f"a part's weight must be finite and positive, got {value}")
    return value


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

    def __call__(self) -> Tensor:
        # the points are joined on every call, not once: a part's points resampled in place
        # (``x.copy_(new)``) must reach the network as they reach the part's function
        derivatives = self.taylor(torch.cat([points for _, points, _ in self.parts]))
        rows, start = [], 0
        for index, (fn, points, scale) in enumerate(self.parts):
            stop = start + points.shape[0]
            r = _rows_of(fn(derivatives.rows(start, stop), points), points.shape[0], index)
            rows.append(scale * r)
            start = stop
        if len({r.shape[1] for r in rows}) != 1:
            raise ValueError(f"every part must return the same number of outputs, got {[r.shape[1] for r in rows]}")
        out = torch.cat(rows)
        return out.squeeze(1) if out.shape[1] == 1 else out


def _rows_of(r: object, n: int, index: int) -> Tensor:
    """Part ``index``'s result as ``(n, k)``, refused unless it has one row per point."""
    if not isinstance(r, Tensor) or r.dim() == 0:
        what = "a scalar" if isinstance(r, Tensor) else f"a {type(r).__name__}"
        raise ValueError(
            f"part {index}'s function returned {what}; it must return one residual row per point, (n,) or (n, k) "
            f"with n = {n} (do not reduce over the points, e.g. with .mean())"
        )
    if r.shape[0] != n:
        raise ValueError(
            f"part {index}'s function returned {r.shape[0]} rows for {n} points (shape {tuple(r.shape)}); it must "
            "return one residual row per point"
        )
    return r.reshape(n, -1)


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
        check_dtype(model, points)
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
