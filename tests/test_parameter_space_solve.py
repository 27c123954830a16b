"""The parameter-space solve (:func:`gramnewton.solve.parameter_space_solve`): the float64 normal
equations against a float64 reference and the float32 QR, and their fall-back to the QR."""

from __future__ import annotations

import math

import pytest
import torch
from dense import assert_same_run, seeded

from gramnewton import SingularGramError
from gramnewton.solve import parameter_space_solution, parameter_space_solve


def _jacobian(n: int, m: int, cond: float, rank: int | None = None) -> torch.Tensor:
    """A float32 ``(n, m)`` ``J`` with singular values log-spaced from 1 to ``1 / cond`` (the last
    ``m - rank`` of them zero when ``rank`` is given)."""
    gen = seeded(n + m)
    u, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), m, dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return ((u * s) @ v.T).float()


def _reference(jac: torch.Tensor, rhs: torch.Tensor, lam: float, alpha: float, prior: torch.Tensor) -> torch.Tensor:
    """``(lam J^T J + alpha I)^{-1} (J^T rhs + alpha prior)`` for the float32 ``J`` taken exactly, by a
    float64 SVD of ``J`` (error about ``cond(J) * eps64``, no squaring)."""
    u, s, vh = torch.linalg.svd(jac.double(), full_matrices=True)
    m = jac.shape[1]
    s = torch.cat([s, s.new_zeros(m - s.numel())])
    coordinates = s * (u[:, :m].T @ rhs.double()) + alpha * (vh @ prior.double())
    return vh.T @ (coordinates / (lam * s * s + alpha))


def _relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x.double() - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize(
    "cond,rank,alpha",
    [(1e1, None, 0.3), (1e4, None, 1e-3), (1e7, None, 1e-6), (1e2, 40, 1e-8)],
    ids=["well", "ill", "very_ill", "rank_deficient"],
)
def test_normal_equations_in_float64_match_the_reference_and_beat_float32_qr(cond, rank, alpha):
    n, m, lam = 500, 61, 16.0
    jac = _jacobian(n, m, cond, rank)
    gen = seeded(1)
    rhs, prior = torch.randn(n, generator=gen), torch.randn(m, generator=gen)
    expected = _reference(jac, rhs, lam, alpha, prior)
    x, info = parameter_space_solve(jac, rhs, lam, alpha, prior=prior)
    assert info.method == "normal_equations" and x.dtype == torch.float32
    qr, qr_info = parameter_space_solve(jac, rhs, lam, alpha, prior=prior, dtype=torch.float32)
    assert qr_info.method == "qr"
    # float32 rounding of the result (6e-8) is the floor; the float32 QR loses sqrt(cond) more
    error, qr_error = _relative(x, expected), _relative(qr, expected)
    assert error <= 1e-6 and error <= max(qr_error, 1e-7), (error, qr_error)
    true_condition = (lam * torch.linalg.svdvals(jac.double())[0] ** 2 + alpha) / alpha
    assert 1.0 <= info.condition <= true_condition * (1 + 1e-6)


def test_float64_jacobian_keeps_the_qr_to_round_off():
    jac = _jacobian(300, 20, 1e6).double()
    rhs, prior = torch.randn(300, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    x, info = parameter_space_solve(jac, rhs, 2.0, 1e-6, prior=prior)
    assert info.method == "qr"
    assert _relative(x, _reference(jac, rhs, 2.0, 1e-6, prior)) < 1e-9


@pytest.mark.parametrize("alpha", [5e-8, 1e-9], ids=["pivot_test_fails", "cholesky_fails"])
def test_normal_equations_fall_back_to_qr_when_their_pivots_vanish(alpha):
    # cond(lam J^T J + alpha I) = 1e8 / alpha: at 2e15 the float64 Cholesky succeeds but its smallest
    # pivot is at round-off level (the pivot test refuses it), at 1e17 the Cholesky fails
    jac = 1e4 * _jacobian(200, 30, 1e2, rank=10)
    rhs = torch.randn(200)
    x, info = parameter_space_solve(jac, rhs, 1.0, alpha)
    assert info.method == "qr"
    qr, _ = parameter_space_solve(jac, rhs, 1.0, alpha, dtype=torch.float32)
    assert_same_run(x, qr)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_jacobian_is_refused(value):
    jac = _jacobian(100, 10, 10.0)
    jac[3, 4] = float(value)
    with pytest.raises(SingularGramError, match="Jacobian has NaN or Inf"):
        parameter_space_solve(jac, torch.randn(100), 1.0, 0.1)


@pytest.mark.parametrize(
    "dtype,alpha,method",
    [(torch.float32, 0.1, "normal_equations"), (torch.float64, 0.1, "qr"), (torch.float32, 0.0, "svd")],
)
def test_again_reuses_the_factorisation_bit_for_bit(dtype, alpha, method, monkeypatch):
    """``parameter_space_solution(...).again(e)`` solves ``(lam J^T J + alpha I) x = J^T e`` (no
    prior) bit for bit as a new ``parameter_space_solve`` of ``e``; with the normal equations and the
    QR it factorises nothing (spies on the Cholesky and the QR), with ``alpha = 0`` it is that new solve."""
    jac = _jacobian(300, 20, 1e3).to(dtype)
    gen = seeded(2)
    rhs, prior, e = torch.randn(300, generator=gen), torch.randn(20, generator=gen), torch.randn(300, generator=gen)
    rhs, prior, e = rhs.to(dtype), prior.to(dtype), e.to(dtype)
    solution = parameter_space_solution(jac, rhs, 2.0, alpha, prior=prior)
    assert solution.info.method == method
    assert_same_run(solution.x, parameter_space_solve(jac, rhs, 2.0, alpha, prior=prior)[0])
    fresh, _ = parameter_space_solve(jac, e, 2.0, alpha)
    calls = []
    for module, name in ((torch.linalg, "cholesky_ex"), (torch, "geqrf")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, f=original, n=name: calls.append(n) or f(*args))
    assert_same_run(solution.again(e), fresh)
    assert calls == []
