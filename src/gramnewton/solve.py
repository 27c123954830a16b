"""The damped solve ``(lam G + alpha I) x = e`` of Algorithm 1, from ``G`` or from ``J``.

Two sample-space solves, each one function:

- :func:`jacobian_solve`, from ``J`` itself (engines that have it), by a thin SVD
  ``J = U S V^T``: accurate to about ``cond(J) * eps``. The update uses it for ``alpha = 0``
  (Eq. 9 and 10), where a solve with ``G = J J^T`` (condition number ``cond(J)^2``) stalls:
  on a 1-256-1 tanh net fitting 16 points in float64 the ``G`` solves stop at ``||r||^2`` of
  1e-14 to 1e-4, the SVD reaches 1e-27 (tests/test_reliability.py). **Cut-off:** singular values
  ``s <= max(n, m) * eps * s_max`` are treated as zero (the rank-revealing convention of
  ``numpy.linalg.matrix_rank`` and ``lstsq``), which gives the minimum-norm least-squares step.
- :func:`damped_solve`, from ``G`` (every engine; the only one for ``alpha > 0``), attempts in
  this order, each only if the previous one failed:

1. Cholesky of the symmetrised matrix (``torch.linalg.cholesky_ex``), accepted when it succeeds
   and its pivots are not numerically zero (``min pivot^2 > n * eps * max diagonal``); a
   Cholesky that "succeeds" on a singular matrix returns huge, meaningless steps.
2. Cholesky with diagonal jitter ``10^j * eps_rel * mean(diag)``, ``j = 0..max_jitter_tries-1``;
   only for ``alpha > 0``. With ``alpha = 0`` a jittered solve of a singular ``G`` (duplicated
   samples, a zero-Jacobian sample, ``b*k > m``) divides the part of ``r`` outside the range of
   ``G`` by the jitter: ``c`` 1e8 times the minimum norm in float64, and ``J^T c`` (exact only in
   exact arithmetic) off by 4e-8 in float64 and 1e-2 in float32 (tests/test_solve_numerics.py).
3. Symmetric eigendecomposition, inverting only eigenvalues above ``n * eps * max|eig|`` (the
   minimum-norm, pseudo-inverse solution, consistent with the minimum-norm reading of Eq. 9);
   for ``alpha = 0`` directly after the Cholesky.

The solutions are never NaN for finite input: if the accepted solution is not finite (e.g. it
overflows), :class:`SingularGramError` is raised.

Each damped solve has a twin returning a :class:`Solution` (:func:`damped_solution`,
:func:`parameter_space_solution`) whose ``again`` applies the accepted factorisation to another
right-hand side: geodesic acceleration solves the step's own system a second time, and a second
factorisation of the same matrix cost about 0.65 ms of a 3 ms step on the sinc network
(``J`` ``(1000, 61)``; docs/performance.md).

Precision: bfloat16 and float16 systems are solved in float32 (no Cholesky exists for them and
their 8 or 11 bits could not resolve the damped system); float32 and float64 ones in their own
dtype unless ``dtype`` says otherwise. The solution is cast back to the right-hand side's dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


class SingularGramError(RuntimeError):
    """No finite Gram-Gauss-Newton step: the loss, Gram matrix, solution or direction is NaN or Inf."""


class NonFiniteError(ValueError):
    """The closure's outputs or residuals are NaN or Inf: a diverged model or bad input data; no
    parameter was changed. A ``ValueError`` (bad input), kept apart so that a training driver can
    tell a diverged run from a programming error."""


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number given as one: a Python or NumPy int or float, not a
    ``bool`` (``lam=True`` is a slip, not a 1), a tensor or a string. NaN is a number here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_damping(lam: float, alpha: float) -> None:
    """Raise ``ValueError`` unless ``lam`` and ``alpha`` are numbers (:func:`is_number`) with
    ``0 < lam < inf`` and ``0 <= alpha < inf`` (NaN is refused)."""
    if not is_number(lam) or not 0 < lam < math.inf:
        raise ValueError(f"Invalid lam value: {lam!r} (must be a finite number > 0)")
    if not is_number(alpha) or not 0 <= alpha < math.inf:
        raise ValueError(f"Invalid alpha (damping) value: {alpha!r} (must be a finite number >= 0)")


def check_solve_dtype(dtype: torch.dtype | None, name: str = "solve_dtype") -> None:
    """Raise ``ValueError`` (naming the argument ``name``) unless ``dtype`` is ``None``,
    ``torch.float32`` or ``torch.float64``: the dtypes a damped system is solved in."""
    if not any(dtype is d for d in (None, torch.float32, torch.float64)):
        raise ValueError(f"Invalid {name}: {dtype!r} (must be None, torch.float32 or torch.float64)")


def solve_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype a ``dtype`` system is solved in: float32 for bfloat16/float16, else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass(frozen=True)
class SolveInfo:
    """How a damped system was solved: ``method`` is ``"cholesky"``, ``"jitter"``, ``"eigh"`` (from
    ``G``), ``"svd"`` (from ``J``), or in parameter space ``"normal_equations"`` or ``"qr"``
    (:func:`parameter_space_solve`); ``rank``: singular values or eigenvalues kept.

    ``condition`` estimates the condition number of the matrix that was factorised: the squared
    ratio of the largest to the smallest Cholesky pivot (a lower bound), or of the largest to the
    smallest kept eigenvalue (for ``"svd"``: of ``lam G + alpha I`` from the kept singular values).
    """

    method: str
    jitter: float = 0.0
    rank: int | None = None
    condition: float | None = None


class Solution(NamedTuple):
    """A damped solve's solution ``x``, how it was found, and ``again``: the factorisation it
    accepted applied to another right-hand side ``e`` (the same matrix, not factorised anew; the
    result in ``e``'s dtype, :class:`SingularGramError` if it is not finite)."""

    x: Tensor
    info: SolveInfo
    again: Callable[[Tensor], Tensor]


def _cholesky_condition(chol: Tensor) -> float:
    pivots = chol.diagonal().abs()
    return float((pivots.max() / pivots.min()) ** 2)


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite, by one reduction on the usual (finite) path.

    A finite sum implies finite entries (NaN and Inf propagate through a sum; ``Inf - Inf`` is
    NaN); only a sum that is not finite (a bad entry, or finite entries whose sum overflows)
    needs the elementwise ``isfinite``. On the 2-core CPU with 2 threads the sum costs about a
    fifth of ``isfinite(t).all()`` (five kernels) for ``(4096, 10)`` (docs/performance.md, perf4).
    """
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when ``t`` has that dtype already (``to`` then returns
    ``t`` itself, after about a microsecond of argument parsing; a step made a dozen such calls)."""
    return t if t.dtype == dtype else t.to(dtype)


def cholesky_solve(rhs: Tensor, factor: Tensor) -> Tensor:
    """``(L L^T)^{-1} rhs`` for the lower Cholesky factor ``L = factor`` ``(n, n)`` and ``rhs``
    ``(n, k)``: ``torch.cholesky_solve``, done on the CPU as its two triangular solves. LAPACK's
    ``potrs`` is those two solves, so the result is the same bit for bit
    (``tests/test_solve.py``), and ``torch.linalg.solve_triangular`` skips copies that
    ``cholesky_solve`` makes: 1.5-2.5x faster from ``n = 200`` on the 2-core CPU (docs/performance.md,
    twenty-fifth session). Elsewhere ``torch.cholesky_solve`` as is (the equality is unchecked on
    other devices)."""
    if factor.device.type != "cpu":
        return torch.cholesky_solve(rhs, factor)
    lower = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, lower, upper=True)


def damped_matrix(gram: Tensor, lam: float, alpha: float) -> Tensor:
    """``lam * G + alpha * I``, symmetrised. ``gram`` is ``(n, n)``."""
    mat = (gram + gram.mT).mul_(0.5 * lam)
    mat.diagonal().add_(alpha)  # in place: no (n, n) identity allocated every step
    return mat


class _Cholesky(NamedTuple):
    """One Cholesky attempt on an ``(n, n)`` matrix (:func:`_cholesky`)."""

    factor: Tensor  # lower triangular; meaningful only when ``passed``
    passed: bool  # factorised, with ``min pivot^2 > n * eps * max diagonal``
    condition: float  # ``(max pivot / min pivot)^2`` when ``passed``, else ``inf``
    shift: float | None  # a diagonal shift that passes the test (below); ``None``: not factorised


def _cholesky(mat: Tensor) -> _Cholesky:
    """The Cholesky factor of ``mat`` ``(n, n)``, accepted when it succeeds with pivots that are
    not numerically zero (``min pivot^2 > bound = n * eps * max diagonal``). One synchronisation.

    When the factorisation succeeds but the pivot test fails, ``shift = 1.5 * bound - min pivot^2``
    is a diagonal shift that passes it in exact arithmetic with half the bound to spare for rounding:
    adding ``s`` to the diagonal adds at least ``s`` to every squared pivot (the ``k``-th is the
    minimum of ``x^T A x`` over ``x`` with ``x_k = 1`` and no entries after ``k``, so ``||x|| >= 1``).

    No separate finiteness check is needed: a NaN or ``+-Inf`` in ``mat`` (symmetric, so in its
    lower triangle) reaches a diagonal step of the factorisation as NaN or ``-Inf`` (LAPACK's
    ``potrf`` then fails), or, on the diagonal, makes ``max diagonal`` infinite (the pivot test
    fails). A finite ``mat`` factorised without failure has finite ``L`` (``|L_ij| <= sqrt(a_ii)``).
    """
    chol, info = torch.linalg.cholesky_ex(mat)
    low, high = torch.aminmax(chol.diagonal())
    code, low, high, top = torch.stack([info.to(low.dtype), low, high, mat.diagonal().max()]).tolist()
    bound = mat.shape[0] * torch.finfo(mat.dtype).eps * top
    if code == 0 and low * low > bound:  # `>` is False for NaN too
        return _Cholesky(chol, True, (high / low) ** 2, None)
    shift = 1.5 * bound - low * low if code == 0 and math.isfinite(bound) and math.isfinite(low) else None
    return _Cholesky(chol, False, math.inf, shift)


def damped_solve(
    gram: Tensor,
    rhs: Tensor,
    lam: float,
    alpha: float,
    *,
    dtype: torch.dtype | None = None,
    max_jitter_tries: int = 4,
) -> tuple[Tensor, SolveInfo]:
    """Solve ``(lam G + alpha I) x = rhs``.

    Args:
        gram: ``(n, n)`` symmetric positive semi-definite Gram matrix.
        rhs: ``(n,)`` right-hand side (the flattened residuals).
        lam: ``lam > 0``, scale of the Gram matrix.
        alpha: ``alpha >= 0``, Tikhonov damping.
        dtype: solve in this dtype (e.g. ``torch.float64``); the result is cast back. Default:
            the Gram's dtype, float32 for bfloat16/float16.
        max_jitter_tries: number of jittered Cholesky attempts before the eigendecomposition
            (``alpha > 0`` only: with ``alpha = 0`` the eigendecomposition follows the Cholesky).

    Returns:
        ``x`` of shape ``(n,)`` in ``rhs``'s dtype, and a :class:`SolveInfo`
        (:func:`damped_solution` without the factorisation).

    Raises:
        ValueError: ``lam`` or ``alpha`` out of range (see :func:`check_damping`).
        SingularGramError: the input is not finite or no finite solution was found.
    """
    _check_system(gram, rhs, dtype)
    x, info, _ = damped_solution(gram, rhs, lam, alpha, dtype=dtype, max_jitter_tries=max_jitter_tries)
    return x, info


def _check_system(gram: Tensor, rhs: Tensor, dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` unless ``gram`` is ``(n, n)`` and ``rhs`` ``(n,)``, both floating, and
    ``dtype`` is ``None``, float32 or float64 (:func:`damped_solve`'s public input)."""
    square = gram.dim() == 2 and gram.shape[0] == gram.shape[1]
    if not square or rhs.dim() != 1 or rhs.shape[0] != gram.shape[0]:
        raise ValueError(
            f"damped_solve needs gram (n, n) and rhs (n,), got {tuple(gram.shape)} and {tuple(rhs.shape)} "
            "(flatten the residuals sample-major: rhs.reshape(-1))"
        )
    if not gram.is_floating_point() or not rhs.is_floating_point():
        raise ValueError(f"damped_solve needs floating gram and rhs, got {gram.dtype} and {rhs.dtype}")
    check_solve_dtype(dtype, "dtype")


def damped_solution(
    gram: Tensor,
    rhs: Tensor,
    lam: float,
    alpha: float,
    *,
    dtype: torch.dtype | None = None,
    max_jitter_tries: int = 4,
) -> Solution:
    """:func:`damped_solve` (same arguments), keeping the accepted factorisation: ``again(e)``
    solves ``(lam G + alpha I) x = e`` for ``e`` ``(n,)`` with it (a Cholesky solve, or the
    eigendecomposition's pseudo-inverse), bit for bit what a new :func:`damped_solve` of ``e``
    returns whenever that one accepts the same factorisation (always, unless the solution of
    ``rhs`` was finite at a jitter where ``e``'s is not)."""
    check_damping(lam, alpha)
    out_dtype = rhs.dtype
    work = dtype or solve_dtype_for(gram.dtype)
    mat = damped_matrix(as_dtype(gram, work), lam, alpha)
    plain = _cholesky(mat)
    if plain.passed:  # the usual path: a Cholesky that succeeded says the matrix was finite
        again = _cholesky_again(plain.factor)
        return Solution(again(rhs), SolveInfo("cholesky", condition=plain.condition), again)
    if not all_finite(mat):  # one sum: at b = 100 on the sinc network (G of rank 61) every step comes here
        raise SingularGramError("the Gram matrix has NaN or Inf entries; no parameter was changed")
    n, eps = mat.shape[0], torch.finfo(work).eps
    if alpha == 0:  # Eq. 9's minimum-norm reading; a jitter puts r's part outside range(G) into c / jitter
        return _eigh_solution(mat, rhs, n * eps)
    # The ladder starts at n * max(eps, 1e-10) * mean diagonal, or at the shift that passes the
    # pivot test where the factorisation succeeded and that shift is larger (the usual float32
    # case: one more factorisation where the ladder from below took two or three).
    first = (float(mat.diagonal().abs().mean()) or 1.0) * max(eps, 1e-10) * n
    if plain.shift is not None:
        first = max(first, plain.shift)
    b = rhs.to(work).unsqueeze(1)

    for j in range(max_jitter_tries):
        jitter = first * 10.0**j
        jittered = mat.clone()
        jittered.diagonal().add_(jitter)
        attempt = _cholesky(jittered)  # the same pivot test as the unjittered attempt
        if attempt.passed:
            x = cholesky_solve(b, attempt.factor).squeeze(1)
            if all_finite(x):
                info = SolveInfo("jitter", jitter=jitter, condition=attempt.condition)
                return Solution(_finite(x, out_dtype), info, _cholesky_again(attempt.factor))

    return _eigh_solution(mat, rhs, n * eps)


def _eigh_solution(mat: Tensor, rhs: Tensor, tolerance: float) -> Solution:
    """The pseudo-inverse solution of ``mat x = rhs`` (``mat`` symmetric ``(n, n)``) by its
    eigendecomposition: eigenvalues at or below ``tolerance * max |eig|`` (negative ones from
    rounding included) are dropped, giving the minimum-norm least-squares solution."""
    evals, evecs = torch.linalg.eigh(mat)
    cutoff = tolerance * float(evals.abs().max())
    keep = evals > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))

    def again(e: Tensor) -> Tensor:
        return _finite(evecs @ (inv * (evecs.T @ e.to(evecs.dtype))), e.dtype)

    condition = float(evals.max() / evals[keep].min()) if bool(keep.any()) else None
    return Solution(again(rhs), SolveInfo("eigh", rank=int(keep.sum()), condition=condition), again)


def _cholesky_again(factor: Tensor) -> Callable[[Tensor], Tensor]:
    """``e -> (L L^T)^{-1} e`` for the lower Cholesky factor ``factor`` ``(n, n)``, in ``e``'s dtype."""

    def again(e: Tensor) -> Tensor:
        return _finite(cholesky_solve(as_dtype(e, factor.dtype).unsqueeze(1), factor).squeeze(1), e.dtype)

    return again


def _finite(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` cast to ``dtype``, or :class:`SingularGramError` if it is (or becomes) not finite."""
    out = as_dtype(x, dtype)
    if not all_finite(out):
        raise SingularGramError(
            "the solution of the damped Gram system is not finite (overflow or a singular system); "
            "increase alpha or rescale the targets; no parameter was changed"
        )
    return out


def jacobian_solve(
    jac: Tensor, rhs: Tensor, lam: float, alpha: float, *, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, SolveInfo]:
    """Solve ``(lam J J^T + alpha I) c = rhs`` and form ``J^T c`` from ``J`` (thin SVD, cut-off above).

    With ``J = U S V^T`` and ``s`` the kept singular values:
    ``c = U diag(1 / (lam s^2 + alpha)) U^T rhs + (rhs - U U^T rhs) / alpha`` (the second term, the
    part of ``rhs`` outside the kept range, only for ``alpha > 0``: the eigenvalue of
    ``lam G + alpha I`` there is ``alpha``; with ``alpha = 0`` it is dropped, the pseudo-inverse)
    and ``J^T c = V diag(s / (lam s^2 + alpha)) U^T rhs``; ``J^T c`` is computed from the last
    formula, never through ``G``. The condition estimate includes the eigenvalue ``alpha`` when
    fewer than ``n`` singular values are kept.

    Args:
        jac: ``(n, m)`` Jacobian, rows sample-major.
        rhs: ``(n,)`` right-hand side (the flattened residuals).
        lam, alpha: as in :func:`damped_solve`.
        dtype: solve in this dtype; default ``jac``'s (float32 for bfloat16/float16).

    Returns:
        ``J^T c`` of shape ``(m,)`` and ``c`` of shape ``(n,)``, both in ``rhs``'s dtype, and a
        :class:`SolveInfo` with ``method="svd"`` and the rank kept.

    Raises:
        ValueError: ``lam`` or ``alpha`` out of range.
        SingularGramError: ``J`` or a result is not finite.
    """
    check_damping(lam, alpha)
    work = dtype or solve_dtype_for(jac.dtype)
    jac, r = jac.to(work), rhs.to(work)
    if not bool(torch.isfinite(jac).all()):
        raise SingularGramError("the Jacobian has NaN or Inf entries; no parameter was changed")
    u, s, vh = torch.linalg.svd(jac, full_matrices=False)
    cutoff = max(jac.shape) * torch.finfo(work).eps * float(s.max()) if s.numel() else 0.0
    keep = s > cutoff
    u, s, vh = u[:, keep], s[keep], vh[keep]
    damped = lam * s * s + alpha  # eigenvalues of lam G + alpha I along the kept directions
    along = u.T @ r
    projected = along / damped
    jt_c = vh.T @ (s * projected)
    c = u @ projected
    if alpha > 0:  # the part of r outside range(J) (n > rank): eigenvalue alpha, not dropped
        c = c + (r - u @ along) / alpha
    if s.numel() == 0:
        condition = None
    elif alpha > 0 and s.numel() < r.shape[0]:  # lam G + alpha I also has the eigenvalue alpha
        condition = float(damped.max() / alpha)
    else:
        condition = float(damped.max() / damped.min())
    info = SolveInfo("svd", rank=int(keep.sum()), condition=condition)
    return _finite(jt_c, rhs.dtype), _finite(c, rhs.dtype), info


# Largest ``m`` whose float32 parameter-space system is solved by the float64 normal equations
# (:func:`parameter_space_solve`): their cost, ``n m^2`` float64 multiply-adds, stays that of the
# float32 QR's ``2 n m^2`` on a CPU; on an accelerator with slow float64 a large ``m`` would not.
NORMAL_EQUATIONS_MAX_PARAMS = 1024


def solves_by_normal_equations(jac_dtype: torch.dtype, dtype: torch.dtype | None, num_params: int) -> bool:
    """Whether :func:`parameter_space_solve` tries the float64 normal equations first: a float32,
    float16 or bfloat16 ``J`` of at most :data:`NORMAL_EQUATIONS_MAX_PARAMS` columns, no ``dtype``
    given (``alpha > 0``)."""
    return dtype is None and solve_dtype_for(jac_dtype) != torch.float64 and num_params <= NORMAL_EQUATIONS_MAX_PARAMS


def parameter_space_solve(
    jac: Tensor,
    rhs: Tensor,
    lam: float,
    alpha: float,
    *,
    prior: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Solve the parameter-space (Levenberg-Marquardt) system ``(lam J^T J + alpha I) x = J^T rhs + alpha prior``.

    ``x`` minimises ``lam ||J x - rhs / lam||^2 + alpha ||x - prior||^2``. Two exact solves for
    ``alpha > 0``, with ``K = cond(lam J^T J + alpha I)`` (bounded through ``alpha``):

    - **Normal equations in float64** (default for a float32, float16 or bfloat16 ``J`` with
      ``m <= NORMAL_EQUATIONS_MAX_PARAMS`` and no ``dtype`` given): ``J`` cast to float64 (exactly),
      ``lam J^T J + alpha I`` formed and Cholesky-factorised in float64; forward error about
      ``K * eps64``, below the float32 QR's ``sqrt(K) * eps32`` for every ``K < 2.9e17``, and the
      solution is rounded to float32 at the end anyway. Accepted under :func:`damped_solve`'s pivot
      test (``K`` below about ``1 / (m * eps64)``), else the QR below is used. Cost: ``n m^2``
      float64 multiply-adds and an ``(m, m)`` Cholesky. Measured on the sinc network (``m = 61``,
      ``n = 1000``): half the time of the float32 QR and its load sensitivity (MKL's ``geqrf`` on a
      ``(1061, 61)`` matrix took 2-10x its quiet time with the 2 cores busy; docs/performance.md,
      "Session tiny7").
    - **QR** (float64 ``J``, or ``dtype`` given): the least-squares solution of the stacked
      ``(n + m, m)`` system ``[sqrt(lam) J; sqrt(alpha) I] x = [rhs / sqrt(lam); sqrt(alpha) prior]``
      (``2 n m^2`` multiply-adds in the work dtype). The stacked matrix's condition number is
      ``sqrt(K)``: forming ``J^T J`` in the same dtype would square it, and an SVD of ``J`` alone
      works with ``cond(J)``, unbounded (float32 sinc network, ``n = 1000``, ``alpha = 1e-3``,
      max-norm relative error of the step: QR 9e-5, SVD of ``J`` without cut-off 1.4e-3, normal
      equations in float32 0.74; tests/test_momentum.py). ``R`` is the Cholesky factor of
      ``lam J^T J + alpha I``.

    Either way the factor's pivots give the condition estimate, as in :func:`damped_solve`.
    With ``alpha = 0`` the prior has no weight and the minimum-norm least-squares solution comes
    from :func:`jacobian_solve` (rank-revealing SVD, cut-off above).

    Args:
        jac: ``(n, m)`` Jacobian.
        rhs: ``(n,)`` right-hand side (the residuals, less ``lam mu J phi_{t-1}`` with momentum).
        lam, alpha: as in :func:`damped_solve`.
        prior: ``(m,)`` the point the damping pulls towards (``mu phi_{t-1}``), default 0.
        dtype: solve by QR in this dtype; default: see above (QR in ``jac``'s dtype for float64).

    Returns:
        ``x`` of shape ``(m,)`` in ``rhs``'s dtype, and a :class:`SolveInfo` (method
        ``"normal_equations"``, ``"qr"``, or ``"svd"`` when ``alpha = 0``)
        (:func:`parameter_space_solution` without the factorisation).

    Raises:
        ValueError: ``lam`` or ``alpha`` out of range.
        SingularGramError: ``J`` or the solution is not finite.
    """
    x, info, _ = parameter_space_solution(jac, rhs, lam, alpha, prior=prior, dtype=dtype)
    return x, info


def parameter_space_solution(
    jac: Tensor,
    rhs: Tensor,
    lam: float,
    alpha: float,
    *,
    prior: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Solution:
    """:func:`parameter_space_solve` (same arguments), keeping the accepted factorisation:
    ``again(e)`` solves ``(lam J^T J + alpha I) x = J^T e`` (no prior) for ``e`` ``(n,)`` with the
    float64 Cholesky factor or the QR's reflectors, bit for bit what a new
    :func:`parameter_space_solve` of ``e`` returns (with ``alpha = 0`` it is such a new solve)."""
    check_damping(lam, alpha)
    if alpha == 0:
        x, _, info = jacobian_solve(jac, rhs, lam, alpha, dtype=dtype)
        return Solution(x, info, lambda e: jacobian_solve(jac, e, lam, alpha, dtype=dtype)[0])
    m = jac.shape[1]
    if solves_by_normal_equations(jac.dtype, dtype, m):
        solved = _normal_equations(jac, rhs, lam, alpha, prior)
        if solved is not None:
            return solved
    if not all_finite(jac):  # one sum; the QR would turn a NaN into a finite-looking step
        raise SingularGramError("the Jacobian has NaN or Inf entries; no parameter was changed")
    work = dtype or solve_dtype_for(jac.dtype)
    a, r = jac.to(work), rhs.to(work)
    stacked = torch.cat([math.sqrt(lam) * a, math.sqrt(alpha) * torch.eye(m, dtype=work, device=a.device)])
    target = torch.cat([r / math.sqrt(lam), math.sqrt(alpha) * (a.new_zeros(m) if prior is None else prior.to(work))])
    # Householder factors without forming Q (``linalg.qr`` also builds the (n + m, m) Q: 2x the time
    # at n = 20,000, m = 61); Q^T target is applied from the reflectors.
    reflectors, tau = torch.geqrf(stacked)
    upper = reflectors[:m].triu()

    def solve_stacked(target: Tensor, dtype: torch.dtype) -> Tensor:
        projected = torch.ormqr(reflectors, tau, target.unsqueeze(1), transpose=True)[:m]
        return _finite(torch.linalg.solve_triangular(upper, projected, upper=True).squeeze(1), dtype)

    def again(e: Tensor) -> Tensor:
        return solve_stacked(torch.cat([e.to(work) / math.sqrt(lam), a.new_zeros(m)]), e.dtype)

    return Solution(solve_stacked(target, rhs.dtype), SolveInfo("qr", condition=_cholesky_condition(upper)), again)


def _normal_equations(jac: Tensor, rhs: Tensor, lam: float, alpha: float, prior: Tensor | None) -> Solution | None:
    """``(lam J^T J + alpha I) x = J^T rhs + alpha prior`` in float64 by Cholesky (``jac`` ``(n, m)``,
    ``rhs`` ``(n,)``, ``prior`` ``(m,)`` or ``None``); ``None`` when the Cholesky fails
    :func:`_cholesky`'s pivot test (the caller then uses the QR).

    No finiteness check of its own: a NaN or Inf in ``J`` (or a ``J^T J`` that overflows) puts a
    NaN or Inf on the diagonal of ``J^T J``, which fails the pivot test (the QR path then checks
    ``J`` and raises); a finite ``J``, ``rhs`` and ``prior`` with a factor that passed it give a
    finite solution unless it overflows, which :func:`_finite` refuses. ``again(e)`` solves with
    ``J^T e`` as the right-hand side."""
    a = jac.double()
    # each product of two float32 entries is exact in float64; only the sums round (n * eps64)
    mat = (a.mT @ a).mul_(lam)
    mat.diagonal().add_(alpha)
    plain = _cholesky(mat)  # reads the lower triangle only: no symmetrisation needed
    if not plain.passed:
        return None
    b = a.mT @ rhs.double()
    if prior is not None:
        b.add_(prior.double(), alpha=alpha)
    x = cholesky_solve(b.unsqueeze(1), plain.factor).squeeze(1)

    def again(e: Tensor) -> Tensor:
        return _finite(cholesky_solve((a.mT @ e.double()).unsqueeze(1), plain.factor).squeeze(1), e.dtype)

    return Solution(_finite(x, rhs.dtype), SolveInfo("normal_equations", condition=plain.condition), again)
