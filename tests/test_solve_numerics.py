"""Numerical audit of the damped solves against dense float64 references (docs/design.md, "The solve").

Each test checks a result against an explicit float64 computation (``torch.linalg.solve``, or the
pseudo-inverse from an SVD), the push-through identity ``J^T (lam J J^T + alpha I)^{-1} r =
(lam J^T J + alpha I)^{-1} J^T r``, or the :class:`SolveInfo` the solve reports."""

from __future__ import annotations

import pytest
import torch
from dense import assert_same_run, seeded

from gramnewton.solve import damped_solution, damped_solve, jacobian_solve, parameter_space_solve


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _duplicated(seed: int) -> torch.Tensor:
    """A float64 ``J`` ``(20, 40)`` whose last four rows repeat its first four: ``G`` of rank 16."""
    gen = seeded(seed)
    jac = torch.randn(16, 40, dtype=torch.float64, generator=gen)
    return torch.cat([jac, jac[:4]])


def _zero_row(seed: int) -> torch.Tensor:
    """A float64 ``J`` ``(16, 40)`` with an exactly zero row (a sample with zero Jacobian)."""
    gen = seeded(seed)
    jac = torch.randn(16, 40, dtype=torch.float64, generator=gen)
    jac[3] = 0
    return jac


@pytest.mark.parametrize("alpha", [0.1, 1e-3])
@pytest.mark.parametrize("shape", [(30, 6), (6, 30)])
def test_jacobian_solve_coefficients_solve_the_damped_system(shape, alpha):
    """``jacobian_solve``'s ``c`` solves ``(lam J J^T + alpha I) c = r`` for ``alpha > 0`` also when
    ``b*k > m``: the part of ``r`` outside the range of ``J`` is divided by ``alpha``, not dropped
    (was: ``c = U diag(1 / (lam s^2 + alpha)) U^T r`` from the thin SVD, relative error about 1
    for ``J`` ``(30, 6)``, and a condition estimate without the eigenvalue ``alpha``); ``J^T c`` equals the parameter-space solve (push-through)."""
    gen = seeded(1)
    jac = torch.randn(*shape, dtype=torch.float64, generator=gen)
    rhs = torch.randn(shape[0], dtype=torch.float64, generator=gen)
    lam = 0.7
    jt_c, c, info = jacobian_solve(jac, rhs, lam, alpha)
    expected = torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(shape[0], dtype=torch.float64), rhs)
    assert _rel(c, expected) < 1e-10  # cond(lam G + alpha I) up to 1e5: the reference's own error
    assert _rel(jt_c, jac.T @ expected) < 1e-10
    phi, _ = parameter_space_solve(jac, rhs, lam, alpha)
    assert _rel(jt_c, phi) < 1e-10
    assert info.method == "svd" and info.rank == min(shape)
    # the condition of lam G + alpha I, whose smallest eigenvalue is alpha when b*k > m
    cond = float(torch.linalg.cond(lam * jac @ jac.T + alpha * torch.eye(shape[0], dtype=torch.float64)))
    assert info.condition == pytest.approx(cond, rel=1e-8)


@pytest.mark.parametrize("make", [_duplicated, _zero_row])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_zero_singular_gram_gives_the_minimum_norm_solution_in_float64(make, seed):
    """``alpha = 0`` with an exactly singular ``G`` (duplicated samples, a zero row): the docs promise
    the minimum-norm (pseudo-inverse) reading of Eq. 9. ``c = G^+ r`` and ``J^T c = J^+ r`` to
    round-off (was: the jitter ladder, ``c = (G + 1e-10 n mean(diag) I)^{-1} r``: ``|c|`` 1e8 times
    the minimum norm, ``J^T c`` off by 4e-8 relative, the zero-Jacobian sample's coefficient 1e8)."""
    jac = make(seed)
    n = jac.shape[0]
    rhs = torch.randn(n, dtype=torch.float64, generator=seeded(10 + seed))
    gram = jac @ jac.T
    c, info = damped_solve(gram, rhs, 1.0, 0.0)
    expected = torch.linalg.pinv(gram, hermitian=True) @ rhs
    assert _rel(c, expected) < 1e-10
    assert _rel(jac.T @ c, torch.linalg.pinv(jac) @ rhs) < 1e-10
    rank = int(torch.linalg.matrix_rank(jac))  # 16 duplicated, 15 with the zero row
    assert info.method == "eigh" and info.jitter == 0.0 and info.rank == rank
    # the reported condition is that of G restricted to its range
    s = torch.linalg.svdvals(gram)
    assert info.condition == pytest.approx(float(s[0] / s[rank - 1]), rel=1e-6)


@pytest.mark.parametrize("work", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", [_duplicated, _zero_row])
def test_alpha_zero_singular_float32_gram(make, work):
    """The float32 Gram of the same ``J`` (solved in float32, or in float64 with ``dtype``):
    ``J^T c`` within 1e-4 of the minimum-norm step (was: jitter ``n * eps32 * mean(diag)``,
    relative error 1e-2 for duplicated samples, 3e-5 for a zero row)."""
    jac = make(0).float()
    rhs = torch.randn(jac.shape[0], generator=seeded(5))
    gram = jac @ jac.T
    c, info = damped_solve(gram, rhs, 1.0, 0.0, dtype=work)
    assert c.dtype == torch.float32 and info.jitter == 0.0
    expected = torch.linalg.pinv(jac.double()) @ rhs.double()
    assert _rel(jac.double().T @ c.double(), expected) < 1e-4


def test_alpha_zero_again_equals_a_fresh_solve():
    """``again(e)`` after an ``alpha = 0`` solve of a singular ``G`` is a fresh solve of ``e``."""
    jac = _duplicated(3)
    gram = jac @ jac.T
    gen = seeded(4)
    rhs, other = torch.randn(2, 20, dtype=torch.float64, generator=gen)
    solution = damped_solution(gram, rhs, 1.0, 0.0)
    assert_same_run(solution.again(other), damped_solve(gram, other, 1.0, 0.0)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jitter_reported_is_the_jitter_used(dtype):
    """A tiny ``alpha`` with ``cond(G) = 1e12``: the jittered Cholesky's solution solves
    ``(G + (alpha + jitter) I) x = r`` to ``cond * eps`` and its condition estimate is a lower bound
    of (and within a factor 1e3 of) ``torch.linalg.cond`` of that matrix."""
    gen = seeded(7)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=gen))
    gram = (q * torch.logspace(0, -12, 40, dtype=torch.float64)) @ q.T
    rhs = torch.randn(40, dtype=torch.float64, generator=gen)
    x, info = damped_solve(gram.to(dtype), rhs.to(dtype), 1.0, 1e-12)
    g = gram.to(dtype).double()
    mat = (g + g.T) / 2 + (1e-12 + info.jitter) * torch.eye(40, dtype=torch.float64)
    cond = float(torch.linalg.cond(mat))
    expected = torch.linalg.solve(mat, rhs.to(dtype).double())
    assert _rel(x, expected) < 10 * cond * torch.finfo(dtype).eps
    assert info.condition <= cond * 1.01 and info.condition >= cond / 1e3
