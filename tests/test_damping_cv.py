"""Leave-one-out ridge selection: the closed form against refitting without each sample."""

from __future__ import annotations

import math

import pytest
import torch
from dense import assert_close, dense_jacobian, dense_step, flat_params
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.damping import CrossValidatedDamping, leave_one_out_ridge


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


def _explicit_choice(model, x, y, lam):
    """The rule's first choice by hand: dense J, LOO over the default grid, lam * best ridge."""
    jac = dense_jacobian(model, x).detach()
    with torch.no_grad():
        r = (model(x) - y).reshape(-1)
    gram = jac @ jac.T
    grid = torch.diagonal(gram).mean() * torch.logspace(-5, 2, 36, dtype=torch.float64)
    errors = torch.stack([torch.tensor(explicit_leave_one_out(gram, r, float(s))) for s in grid])
    return lam * float(grid[errors.argmin()])


@pytest.mark.parametrize("engine", ["reference", "hooks"])
def test_step_is_the_dense_formula_with_the_cross_validated_alpha(engine):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    lam = 2.0
    alpha = _explicit_choice(model, x, y, lam)
    expected = dense_step(model, x, y, lam, alpha)
    before = flat_params(model)
    rule = CrossValidatedDamping(curvature=None)
    opt = GramGaussNewton(model, lam=lam, alpha=1e-9, engine=engine, adaptive_damping=rule, metric=None)
    calls = []
    opt.step(lambda: calls.append(1) or model(x) - y)
    assert len(calls) == 1  # no re-evaluation without the curvature floor
    assert opt.last_diagnostics.alpha == pytest.approx(alpha, rel=1e-12)
    assert_close(flat_params(model) - before, expected, 1e-10, "step with the cross-validated alpha")


def test_noise_residuals_get_a_larger_alpha_than_smooth_ones():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 64, dtype=torch.float64).unsqueeze(1)
    chosen = {}
    for name, y in {"smooth": torch.sin(3 * x), "noise": torch.randn(64, 1, dtype=torch.float64)}.items():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1)).double()
        opt = GramGaussNewton(model, lam=1.0, alpha=1e-9, adaptive_damping=CrossValidatedDamping(curvature=None))
        opt.step(lambda: model(x) - y)
        chosen[name] = opt.last_diagnostics.alpha
    assert chosen["noise"] > 100 * chosen["smooth"]


def test_running_mean_of_log_ridge_and_gain_ratio_floor():
    rule = CrossValidatedDamping(smoothing=0.5)
    model = nn.Linear(4, 1, dtype=torch.float64)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, alpha=1e3, adaptive_damping=rule)
    opt.step(lambda: model(x) - y)
    first = rule.log_ridge
    assert opt.last_diagnostics.alpha == 1e3  # the initial alpha is the first floor
    assert rule.floor == pytest.approx(1e3 / 2)  # a linear model: rho = 1, the floor halves
    x2, y2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt.step(lambda: model(x2) - y2)
    assert rule.log_ridge != first
    assert opt.last_diagnostics.alpha == pytest.approx(max(math.exp(rule.log_ridge), 1e3 / 2))


def test_failed_linearisation_is_undone_and_raises_the_floor():
    class SineModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.4], dtype=torch.float64))

        def forward(self, x):
            return torch.sin(3 * self.w * x)

    model = SineModel()  # the Gauss-Newton step to sin(3w) = 0 from w = 0.4 overshoots
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    rule = CrossValidatedDamping(span=(1e-9, 1e-8), points=2)  # cross-validation alone: tiny alpha
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-9, adaptive_damping=rule)
    opt.step(lambda: model(x) - y)
    assert opt.last_gain_ratio < 0 and opt.last_diagnostics.rejected
    assert torch.equal(model.w.detach(), torch.tensor([0.4], dtype=torch.float64))
    assert rule.floor == pytest.approx(2 * max(opt.last_diagnostics.alpha, 1e-8))  # GainRatioDamping.min_alpha


def test_bad_settings_are_refused():
    for kwargs in ({"smoothing": 0.0}, {"span": (1.0, 0.1)}, {"points": 1}, {"max_samples": 1}):
        with pytest.raises(ValueError):
            CrossValidatedDamping(**kwargs)


def test_shipped_defaults():
    from gramnewton.damping import GainRatioDamping

    opt = GramGaussNewton(nn.Linear(3, 1))
    assert (opt.param_groups[0]["lam"], opt.param_groups[0]["alpha"]) == (16.0, 0.3)
    assert isinstance(opt.damping, GainRatioDamping) and opt.param_groups[0]["momentum"] == 0.9
    assert opt.damping.check_every == 4
    assert GramGaussNewton(nn.Linear(3, 1), adaptive_damping=False).damping is None
    assert isinstance(
        GramGaussNewton(nn.Linear(3, 1), adaptive_damping="cross_validated").damping, CrossValidatedDamping
    )
    with pytest.raises(ValueError, match="unknown damping rule"):
        GramGaussNewton(nn.Linear(3, 1), adaptive_damping="newton")
