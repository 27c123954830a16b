"""The damped solve: Cholesky, jitter and eigendecomposition fallbacks, explicit failure."""

from __future__ import annotations

import pytest
import torch

from gramnewton import SingularGramError, damped_solve


def test_well_conditioned_uses_cholesky():
    a = torch.randn(6, 4, dtype=torch.float64)
    gram, rhs = a @ a.T, torch.randn(6, dtype=torch.float64)
    x, info = damped_solve(gram, rhs, 2.0, 0.5)
    assert info.method == "cholesky"
    expected = torch.linalg.solve(2.0 * gram + 0.5 * torch.eye(6, dtype=torch.float64), rhs)
    assert torch.allclose(x, expected, rtol=1e-12, atol=0)


def test_singular_gram_gives_minimum_norm_solution():
    a = torch.randn(3, 5, dtype=torch.float64)
    jac = torch.cat([a, a])  # duplicated samples: rank 3 of 6
    rhs = torch.cat([torch.ones(3), torch.ones(3)]).double()
    x, info = damped_solve(jac @ jac.T, rhs, 1.0, 0.0)
    assert info.method in ("jitter", "eigh") and torch.isfinite(x).all()
    # J^T x must be (close to) the minimum-norm solution of J w = rhs
    w = jac.T @ x
    assert torch.allclose(w, torch.linalg.pinv(jac) @ rhs, rtol=1e-5, atol=1e-8)


def test_eigh_fallback_when_jitter_does_not_help():
    gram = torch.zeros(4, 4, dtype=torch.float64)
    x, info = damped_solve(gram, torch.ones(4, dtype=torch.float64), 1.0, 0.0, max_jitter_tries=0)
    assert info.method == "eigh" and info.rank == 0 and torch.equal(x, torch.zeros(4, dtype=torch.float64))


def test_float64_solve_option_returns_input_dtype():
    a = torch.randn(5, 3)
    x, info = damped_solve(a @ a.T, torch.randn(5), 1.0, 0.1, dtype=torch.float64)
    assert x.dtype == torch.float32 and info.method == "cholesky"


def test_non_finite_gram_raises():
    gram = torch.eye(3, dtype=torch.float64)
    gram[0, 1] = float("nan")
    with pytest.raises(SingularGramError, match="NaN or Inf"):
        damped_solve(gram, torch.ones(3, dtype=torch.float64), 1.0, 0.1)
