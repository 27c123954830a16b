"""Leave-one-out ridge selection: the closed form against refitting without each sample."""

from __future__ import annotations

import torch

from gramnewton.damping import leave_one_out_ridge


def explicit_leave_one_out(gram: torch.Tensor, r: torch.Tensor, s: float) -> float:
    """Refit kernel ridge regression without sample ``i``, predict it, for every ``i``."""
    n = len(r)
    errors = []
    for i in range(n):
        keep = torch.arange(n) != i
        coef = torch.linalg.solve(gram[keep][:, keep] + s * torch.eye(n - 1, dtype=gram.dtype), r[keep])
        errors.append(r[i] - gram[i, keep] @ coef)
    return float(torch.stack(errors).pow(2).mean())


def test_closed_form_equals_explicit_refits():
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(12, 30, dtype=torch.float64, generator=gen)
    gram, r = jac @ jac.T, torch.randn(12, dtype=torch.float64, generator=gen)
    grid = torch.tensor([1e-3, 0.1, 1.0, 30.0], dtype=torch.float64)
    loo, ridges = leave_one_out_ridge(gram, r, grid)
    assert torch.equal(ridges, grid)
    for value, s in zip(loo, grid):
        expected = explicit_leave_one_out(gram, r, float(s))
        assert abs(float(value) - expected) <= 1e-10 * expected


def test_rank_deficient_gram_and_smooth_signal_prefers_small_ridge():
    # residuals that are a smooth function of the inputs (predictable) against pure noise
    gen = torch.Generator().manual_seed(1)
    x = torch.linspace(-1, 1, 40, dtype=torch.float64)
    gram = torch.exp(-((x[:, None] - x[None, :]) ** 2) / 0.1)  # a smooth kernel, nearly singular
    grid = torch.logspace(-8, 2, 21, dtype=torch.float64)
    smooth, _ = leave_one_out_ridge(gram, torch.sin(3 * x), grid)
    noise, _ = leave_one_out_ridge(gram, torch.randn(40, dtype=torch.float64, generator=gen), grid)
    assert grid[smooth.argmin()] < 1e-3 < grid[noise.argmin()]
    assert torch.isfinite(smooth).all() and torch.isfinite(noise).all()
