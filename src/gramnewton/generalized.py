r"""The generalized Gauss-Newton step of a general loss, computed in sample space.

For ``L = sum_i l_i(f_i)`` (see :mod:`gramnewton.losses`) the damped generalized Gauss-Newton step is

    delta = -(lam J^T H J + alpha I)^{-1} J^T g,

``J`` the ``(b*k, m)`` Jacobian of the outputs, ``H = blockdiag(H_i)``, ``g = (g_i)``. With
``H_i = B_i B_i^T`` (``B_i`` is ``(k, q)``) and ``B_i u_i = g_i``, the push-through identity turns it
into a ``(b*q, b*q)`` system:

    delta = -J^T B (lam B^T G B + alpha I)^{-1} u,        G = J J^T.

``B^T J`` is the Jacobian of the *pseudo-residuals* ``z_i = B_i^T f_i`` (``B_i`` held fixed), so any
:class:`~gramnewton.engines.GramEngine` computes ``B^T G B`` and ``J^T B v`` unchanged when the
closure it runs returns ``z_i = B_i^T (f_i - f_i.detached) + u_i``: its value is ``u_i`` (the
right-hand side) and its Jacobian is ``B_i^T J_i``. :class:`LossClosure` builds that closure.
For ``l_i = 1/2 ||f_i - y_i||^2`` (``B_i = I``, ``u_i = r_i``) this is Eq. 11.

Curvature estimates (``curvature=``; ``"auto"``, the default, is ``"exact"`` for the square loss
and ``"gradient"`` otherwise, :data:`DEFAULT_CURVATURE`), each a factor ``B_i`` with ``q`` columns
(``q`` backward passes and a ``(b*q, b*q)`` Gram):

- ``"exact"``: the loss's own factor (``q = k`` for cross-entropy): the step above, exactly.
- ``"top_c"``: ``H_i`` projected on the subspace ``V_i`` spanned by the ``c`` output coordinates
  with the largest ``|g_i|`` and by ``g_i`` restricted to the other coordinates:
  ``H_i ~ V_i V_i^T H_i V_i V_i^T`` (``q = c + 1``). ``g_i`` lies in ``V_i``, so the sample-space
  form stays exact for this curvature. With ``c = k - 1`` it is the exact ``H_i``.
- ``"gradient"``: ``"top_c"`` with ``c = 0``: the curvature along ``g_i`` alone,
  ``H_i ~ g_i g_i^T (g_i^T H_i g_i) / ||g_i||^4`` (``q = 1``: one backward pass, a ``(b, b)`` Gram,
  the cost of a scalar regression step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .engines.base import reevaluate, widened
from .losses import Loss, SquaredError

CURVATURES = ("auto", "exact", "top_c", "gradient")
# What ``"auto"`` means for a loss other than the square loss, chosen by measurement
# (docs/classification.md): on resnet8_fixup / mnist-sized batches ``"gradient"`` costs about an
# SGD step where ``"exact"`` costs an order of magnitude more, and it trained best in the grid.
DEFAULT_CURVATURE = "gradient"


def check_curvature(curvature: str, top_c: int) -> None:
    """Raise ``ValueError`` for an unknown curvature estimate or a negative ``top_c``."""
    if curvature not in CURVATURES:
        raise ValueError(f"Invalid curvature: {curvature!r}; expected one of {CURVATURES}")
    if isinstance(top_c, bool) or not isinstance(top_c, int) or top_c < 0:
        raise ValueError(f"Invalid top_c: {top_c!r} (must be an int >= 0)")


def resolve_curvature(curvature: str, loss: Loss) -> str:
    """The estimate ``curvature`` names for ``loss``: ``"auto"`` is ``"exact"`` for the square
    loss (``B_i = I``: Eq. 11) and :data:`DEFAULT_CURVATURE` for any other."""
    if isinstance(loss, SquaredError):
        if curvature not in ("auto", "exact"):
            raise ValueError("curvature estimates apply to losses other than 'mse' (its output Hessian is I)")
        return "exact"
    return DEFAULT_CURVATURE if curvature == "auto" else curvature


def split_pair(value: Any, loss: Loss) -> tuple[Tensor, Any]:
    """The closure's ``(outputs, targets)`` pair, with a clear error for anything else."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(
            f"with loss={loss.name!r} the closure must return a pair (outputs, targets), e.g. "
            f"(logits (b, k), labels (b,)), got {type(value).__name__}"
        )
    return value[0], value[1]


def subspace_factor(basis: Tensor, sqrt_h: Tensor, grad: Tensor, what: str = "the loss") -> tuple[Tensor, Tensor]:
    """Factor of ``H_i`` projected on the orthonormal columns of ``basis``, and its ``u_i``.

    Args:
        basis: ``(b, k, d)`` orthonormal columns ``V_i`` (a zero column is allowed and ignored).
        sqrt_h: ``(b, k, q)`` factor ``B_i`` of ``H_i``.
        grad: ``(b, k)`` gradients ``g_i``, lying in the span of ``V_i``.
        what: the loss's name, for the error.

    Returns:
        ``(b, k, d)`` factor ``V_i Q_i Lam_i^{1/2}`` of ``V_i V_i^T H_i V_i V_i^T`` (``Q_i Lam_i Q_i^T``
        the eigendecomposition of ``M_i = V_i^T H_i V_i``) and ``(b, d)`` ``u_i = Lam_i^{-1/2} Q_i^T V_i^T g_i``,
        so that ``B_i u_i = g_i`` exactly. Eigenvalues below ``d * eps * max eig`` (rounding of
        ``M_i``) are raised to it: dropping them, a pseudo-inverse, also dropped the part of
        ``g_i`` along them (a sample whose label has probability 0 under ``top_c``: a step far
        from the dense formula's), while raising them changes ``M_i`` by its own rounding.

    Raises:
        ValueError: a sample with ``g_i != 0`` but no curvature on the subspace (``max eig`` below
            ``sqrt(tiny)``, e.g. a loss linear in the outputs): its ``u_i`` would overflow.
    """
    projected = sqrt_h.transpose(1, 2) @ basis  # B_i^T V_i, (b, q, d)
    evals, evecs = torch.linalg.eigh(projected.transpose(1, 2) @ projected)
    d = basis.shape[2]
    info = torch.finfo(evals.dtype)
    top = evals.amax(1, keepdim=True)
    along = (evecs.transpose(1, 2) @ (basis.transpose(1, 2) @ grad.unsqueeze(2))).squeeze(2)  # Q_i^T V_i^T g_i
    flat = (top.squeeze(1) < info.tiny**0.5) & (along.abs().amax(1) > 0)
    if bool(flat.any()):
        raise ValueError(
            f"{what}: {int(flat.sum())} of {grad.shape[0]} samples have an output gradient outside the range of "
            "the loss's Hessian (no curvature along it, e.g. a loss linear in the outputs), so the sample-space "
            "step cannot take it; give the loss curvature along its gradient; no parameter was changed"
        )
    floored = torch.maximum(evals, (d * info.eps * top).clamp_min(info.tiny))
    root = floored.sqrt()
    return (basis @ evecs) * root.unsqueeze(1), along / root


def top_basis(grad: Tensor, c: int) -> Tensor:
    """``(b, k, c + 1)`` orthonormal basis: the unit vectors of the ``c`` largest ``|g_ic|`` and
    ``g_i`` on the remaining coordinates, normalised (a zero column when nothing remains). With
    ``c >= k - 1`` every unit vector, ``(b, k, k)``: ``g_i`` on the one coordinate left is zero
    when that output's gradient is (a label predicted exactly), and its column then dropped that
    coordinate's curvature from the "exact" ``H_i`` this ``c`` promises."""
    b, k = grad.shape
    if c >= k - 1:
        return torch.eye(k, dtype=grad.dtype, device=grad.device).expand(b, k, k)
    top = grad.abs().topk(c, dim=1).indices  # (b, c)
    units = torch.nn.functional.one_hot(top, k).to(grad.dtype).transpose(1, 2)  # (b, k, c)
    rest = grad.scatter(1, top, 0.0)
    norm = rest.norm(dim=1, keepdim=True)
    rest = torch.where(norm > 0, rest / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(rest))
    return torch.cat([units, rest.unsqueeze(2)], dim=2)


def check_shape(loss: Loss, method: str, value: Any, shape: tuple[int | None, ...]) -> Tensor:
    """``value``, the tensor ``loss.method`` returned, if its shape is ``shape`` (``None``: any
    size there); a user loss's slip (``per_sample`` not summed over the outputs, ``hessian_sqrt``
    without ``diag_embed``) would otherwise broadcast into a wrong step or loss, or fail deep in
    the step.

    Raises:
        ValueError: naming the method, the shape it returned and the one expected."""
    if (
        not isinstance(value, Tensor)
        or value.dim() != len(shape)
        or any(want is not None and got != want for got, want in zip(value.shape, shape))
    ):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        expected = tuple("q" if want is None else want for want in shape)
        raise ValueError(
            f"loss {loss.name!r}: {method} returned shape {got}, expected {expected} (b samples, k outputs); "
            "no parameter was changed"
        )
    return value


def output_factor(
    loss: Loss, outputs: Tensor, targets: Tensor, curvature: str = "exact", top_c: int = 1
) -> tuple[Tensor, Tensor]:
    """``(B, u)`` of the chosen curvature estimate: ``(b, k, q)`` and ``(b, q)`` with ``B_i u_i = g_i``.

    ``outputs`` ``(b, k)`` detached, ``targets`` as returned by ``loss.check``.

    Raises:
        ValueError: a method of ``loss`` returned a tensor of the wrong shape (:func:`check_shape`).
    """
    b, k = outputs.shape
    sqrt_h = check_shape(loss, "hessian_sqrt", loss.hessian_sqrt(outputs, targets), (b, k, None))
    grad = check_shape(loss, "gradient", loss.gradient(outputs, targets), (b, k))
    if curvature == "exact":
        u = loss.sqrt_solve(outputs, targets, sqrt_h, grad)
        return sqrt_h, check_shape(loss, "sqrt_solve", u, (b, sqrt_h.shape[2]))
    return subspace_factor(top_basis(grad, 0 if curvature == "gradient" else top_c), sqrt_h, grad, repr(loss.name))


class LossClosure:
    """Wraps a closure returning ``(outputs, targets)`` into one returning the pseudo-residuals.

    Calling it runs the user's closure, validates the pair (``loss.check``), and returns
    ``z`` ``(b, q)`` with value ``u`` and Jacobian ``B^T J`` (module docstring). It records the
    per-sample losses ``(b,)`` of that call in ``per_sample`` (detached).
    """

    def __init__(
        self,
        loss: Loss,
        closure: Callable[[], Any],
        curvature: str = "exact",
        top_c: int = 1,
        dtype: torch.dtype | None = None,
    ):
        check_curvature(curvature, top_c)
        self.loss, self.closure, self.curvature, self.top_c = loss, closure, curvature, top_c
        self.dtype = dtype  # the parameters': outputs in a narrower dtype (autocast) are widened to it
        self.per_sample: Tensor | None = None

    def evaluate(self) -> tuple[Tensor, Tensor]:
        """Run the closure; return the validated outputs ``(b, k)`` (graph kept; widened to
        ``dtype`` when narrower, e.g. autocast's bfloat16 logits) and targets."""
        outputs, targets = split_pair(self.closure(), self.loss)
        outputs = widened(outputs, self.dtype) if isinstance(outputs, Tensor) else outputs
        targets = self.loss.check(outputs, targets)
        return outputs, targets

    def __call__(self) -> Tensor:
        outputs, targets = self.evaluate()
        detached = outputs.detach()
        sqrt_h, u = output_factor(self.loss, detached, targets, self.curvature, self.top_c)
        per_sample = self.loss.per_sample(detached, targets)
        self.per_sample = check_shape(self.loss, "per_sample", per_sample, (detached.shape[0],))
        # value u exactly (outputs - detached is exactly 0), Jacobian B^T J
        return ((outputs - detached).unsqueeze(1) @ sqrt_h.to(outputs.dtype)).squeeze(1) + u.to(outputs.dtype)

    @torch.no_grad()
    def loss_sum(self, rows: slice | None = None) -> float:
        """Re-run the closure and return ``sum_i l_i`` (``inf`` when not finite), e.g. after a step;
        with ``rows``, ``closure(rows)`` and the sum over those samples only.

        Raises:
            ValueError: the outputs are not as many as the rows asked of the batch of the last call."""
        outputs, targets = split_pair(
            reevaluate(self.closure) if rows is None else reevaluate(self.closure, rows), self.loss
        )
        outputs = widened(outputs, self.dtype) if isinstance(outputs, Tensor) else outputs
        if self.per_sample is not None and isinstance(outputs, Tensor):
            expected = len(range(self.per_sample.shape[0])[rows or slice(None)])
            if outputs.dim() == 0 or outputs.shape[0] != expected:
                raise ValueError(
                    f"closure returned {tuple(outputs.shape)} outputs when re-evaluated, expected {expected} rows"
                )
        if not isinstance(outputs, Tensor) or not bool(torch.isfinite(outputs).all()):
            return float("inf")
        return float(self.loss.per_sample(outputs.detach(), self.loss.check(outputs, targets)).double().sum())


def predicted_decrease(u: Tensor, predicted: Tensor, change: Tensor | None = None) -> float:
    """Decrease of ``sum_i l_i`` predicted by the quadratic model for the step ``delta = -phi``:
    ``-(g^T J delta + 1/2 delta^T J^T H J delta) = 1/2 (||u||^2 - ||u - B^T J phi||^2)``.

    ``u`` ``(b, q)`` pseudo-residuals; ``predicted`` ``(b*q,)`` the linearised ones after the step,
    ``u - B^T J phi`` (``u - B^T G B c`` without momentum, ``phi = J^T B c``); ``change``
    ``(b*q,)``, when given, the model's change ``a = B^T J phi`` itself: the decrease is then
    ``u.a - 1/2 ||a||^2``. Prefer it: a confidently wrong sample has pseudo-residuals
    ``y / sqrt(p)`` of 1e10 and more, and the difference of the squares loses every digit of the
    decrease (float64 at a margin of 50, float32 at 20) where the product does not.
    """
    u = u.reshape(-1).double()
    if change is not None:
        change = change.reshape(-1).double()
        return float((u * change).sum() - 0.5 * change.pow(2).sum())
    return 0.5 * float(u.pow(2).sum() - predicted.double().pow(2).sum())
