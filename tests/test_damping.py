"""Adaptive (gain-ratio) damping: the ratio, the alpha rule, rejected steps restore parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.damping import GainRatioDamping, gain_ratio


class SineModel(nn.Module):
    """``f(x) = sin(3 w x)``: strongly non-linear in its single weight."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * self.w * x)


def test_linear_model_has_gain_ratio_one_and_alpha_drops():
    model = nn.Linear(5, 1, dtype=torch.float64)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, alpha=0.5, adaptive_damping=GainRatioDamping(factor=4.0), lam=1.0)
    opt.step(lambda: model(x) - y)
    assert abs(opt.last_gain_ratio - 1.0) < 1e-10
    assert opt.param_groups[0]["alpha"] == pytest.approx(0.125)


def test_step_that_increases_the_loss_is_undone_and_alpha_raised():
    model = SineModel(0.4)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, alpha=1e-3, adaptive_damping=True, lam=1.0)
    opt.step(lambda: model(x) - y)
    assert opt.last_gain_ratio < 0
    assert float(model.w.detach()) == 0.4
    assert opt.param_groups[0]["alpha"] == pytest.approx(2e-3)
    for _ in range(30):  # raised damping eventually gives accepted, loss-decreasing steps
        opt.step(lambda: model(x) - y)
    assert abs(math.sin(3 * float(model.w.detach()))) < 1e-3


def test_adapted_alpha_survives_state_dict():
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    opt = GramGaussNewton(model, alpha=1.0, adaptive_damping=True, lam=1.0)
    opt.step(lambda: model(x) - y)
    twin = GramGaussNewton(nn.Linear(3, 1), alpha=1.0, adaptive_damping=True, lam=1.0)
    twin.load_state_dict(opt.state_dict())
    assert twin.param_groups[0]["alpha"] == opt.param_groups[0]["alpha"] < 1.0


def test_gain_ratio_edge_cases():
    r = torch.tensor([1.0, 1.0])
    assert gain_ratio(r, torch.zeros(2), torch.tensor([float("nan"), 0.0])) == -math.inf
    assert gain_ratio(r, r, torch.zeros(2)) == 1.0  # no predicted progress, actual progress
    assert gain_ratio(r, torch.zeros(2), torch.tensor([0.5, 0.5])) == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs", [dict(factor=1.0), dict(low=0.8, high=0.2), dict(min_alpha=0.0)])
def test_invalid_rules(kwargs):
    with pytest.raises(ValueError):
        GainRatioDamping(**kwargs)


def test_alpha_rule_is_bounded():
    rule = GainRatioDamping(factor=10.0, min_alpha=1e-3, max_alpha=1.0)
    assert rule.next_alpha(0.5, -1.0) == 1.0
    assert rule.next_alpha(2e-3, 0.9) == 1e-3
    assert rule.next_alpha(0.5, 0.5) == 0.5
