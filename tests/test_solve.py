"""The damped solve: Cholesky, jitter and eigendecomposition fallbacks, explicit failure."""

from __future__ import annotations

import pytest
import torch
from dense import assert_same_run, seeded

from gramnewton import SingularGramError, damped_solve
from gramnewton.solve import all_finite, cholesky_solve, damped_solution


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jitter_starts_at_the_shift_that_passes_the_pivot_test(seed: int, monkeypatch: pytest.MonkeyPatch):
    """A float32 Gram of rank 50 of 200 with ``alpha`` under float32's resolution: the matrix is
    positive definite but its smallest pivots fail the test (``min pivot^2 > n * eps * max
    diagonal``). The first jittered attempt uses the shift computed from the failed factor (between
    half and 1.5 times the test's bound) and passes: two factorisations in all, where the ladder
    from ``n * eps * mean diagonal`` took three on these seeds; the result solves the jittered
    system (backward error of a float32 solve)."""
    factorisations = []
    cholesky_ex = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda m: factorisations.append(m) or cholesky_ex(m))
    generator = seeded(seed)
    a = torch.randn(200, 50, generator=generator)
    gram, rhs, alpha = a @ a.T, torch.randn(200, generator=generator), 1e-4
    x, info = damped_solve(gram, rhs, 1.0, alpha)
    assert info.method == "jitter" and len(factorisations) == 2
    bound = 200 * torch.finfo(torch.float32).eps * float(gram.diagonal().max() + alpha)
    assert 0.5 * bound <= info.jitter <= 1.5 * bound
    mat = (gram.double() + gram.double().T) / 2 + (alpha + info.jitter) * torch.eye(200, dtype=torch.float64)
    x, b = x.double(), rhs.double()  # normwise backward error of a float32 solve
    assert float((mat @ x - b).norm() / (torch.linalg.matrix_norm(mat, 2) * x.norm() + b.norm())) < 1e-6


def test_eigh_fallback_when_jitter_does_not_help():
    gram = torch.zeros(4, 4, dtype=torch.float64)
    x, info = damped_solve(gram, torch.ones(4, dtype=torch.float64), 1.0, 0.0, max_jitter_tries=0)
    assert info.method == "eigh" and info.rank == 0 and torch.equal(x, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("path", ["cholesky", "jitter", "eigh"])
def test_again_reuses_the_accepted_factorisation_bit_for_bit(path: str, monkeypatch: pytest.MonkeyPatch):
    """``damped_solution(...).again(e)`` equals a new ``damped_solve`` of ``e`` bit for bit on each
    path (the same factorisation accepted), without factorising again (a spy counts the Cholesky
    factorisations and eigendecompositions)."""
    generator = seeded(3)
    a = torch.randn(40, 10 if path != "cholesky" else 60, generator=generator)
    gram, rhs, e = a @ a.T, torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    alpha, tries = {"cholesky": (0.3, 4), "jitter": (1e-6, 4), "eigh": (1e-6, 0)}[path]
    solution = damped_solution(gram, rhs, 2.0, alpha, max_jitter_tries=tries)
    assert solution.info.method == path
    assert_same_run(solution.x, damped_solve(gram, rhs, 2.0, alpha, max_jitter_tries=tries)[0])
    fresh, _ = damped_solve(gram, e, 2.0, alpha, max_jitter_tries=tries)
    calls = []
    for name in ("cholesky_ex", "eigh"):
        original = getattr(torch.linalg, name)
        monkeypatch.setattr(torch.linalg, name, lambda *args, f=original, n=name: calls.append(n) or f(*args))
    again = solution.again(e.double())
    assert calls == [] and again.dtype == torch.float64
    assert_same_run(again.float(), fresh)  # the float32 system's solution, returned in e's dtype


def test_float64_solve_option_returns_input_dtype():
    a = torch.randn(5, 3)
    x, info = damped_solve(a @ a.T, torch.randn(5), 1.0, 0.1, dtype=torch.float64)
    assert x.dtype == torch.float32 and info.method == "cholesky"


@pytest.mark.parametrize(
    "entry, value",
    [((0, 1), "nan"), ((2, 2), "nan"), ((1, 1), "inf"), ((2, 2), "inf"), ((0, 2), "inf"), ((1, 1), "-inf")],
)
def test_non_finite_gram_raises(entry: tuple[int, int], value: str):
    # the success path has no isfinite of its own: a bad entry must fail the Cholesky or its pivot test
    gram = 4 * torch.eye(3, dtype=torch.float64)
    gram[entry] = float(value)
    with pytest.raises(SingularGramError, match="NaN or Inf"):
        damped_solve(gram, torch.ones(3, dtype=torch.float64), 1.0, 0.1)


def test_all_finite_is_exact():
    assert all_finite(torch.tensor([1.0, -2.0, 3e38, 3e38]))  # finite entries whose float32 sum overflows
    assert all_finite(torch.empty(0))
    for bad in ("nan", "inf", "-inf"):
        t = torch.ones(5)
        t[3] = float(bad)
        assert not all_finite(t)
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # sum NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 64, 200, 513])
def test_cholesky_solve_is_torchs_bit_for_bit(n: int, dtype: torch.dtype):
    # solve.cholesky_solve replaces torch.cholesky_solve on the CPU by its two triangular solves,
    # which must change nothing (potrs is those two solves); one and three right-hand sides
    a = torch.randn(n, n + 3, dtype=dtype)
    factor = torch.linalg.cholesky(a @ a.T + torch.eye(n, dtype=dtype))
    for k in (1, 3):
        rhs = torch.randn(n, k, dtype=dtype)
        assert_same_run(cholesky_solve(rhs, factor), torch.cholesky_solve(rhs, factor))
