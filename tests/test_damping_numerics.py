"""The damping rules' numbers against brute force in float64.

``CrossValidatedDamping``: the leave-one-out error of every ridge against refitting the kernel ridge
regression without each *sample* (its ``k`` rows of ``G``) and predicting it; the chosen ``alpha``
against the argmin over the documented grid. ``GainRatioDamping``: the gain ratio the optimizer
hands the rule against the dense ratio of the step taken (square loss, cross-entropy, momentum,
``lr``, weight decay, ``subset``), and the decisions against the documented rule.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dense import assert_same_run, dense_jacobian, flat_params, seeded
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.damping import CrossValidatedDamping, GainRatioDamping, leave_one_out_ridge
from gramnewton.diagnostics import StepDiagnostics
from gramnewton.engines.base import GramSystem


def brute_force_leave_one_out(gram: torch.Tensor, r: torch.Tensor, s: float) -> float:
    """Mean squared error over all rows of predicting each sample (``r``'s row, ``k`` rows of
    ``gram``) from a kernel ridge fit (ridge ``s``) to the other samples."""
    b, k = r.shape
    flat = r.reshape(-1)
    errors = []
    for i in range(b):
        out = torch.zeros(b * k, dtype=torch.bool)
        out[i * k : (i + 1) * k] = True
        keep = ~out
        coef = torch.linalg.solve(gram[keep][:, keep] + s * torch.eye(int(keep.sum()), dtype=gram.dtype), flat[keep])
        errors.append(flat[out] - gram[out][:, keep] @ coef)
    return float(torch.cat(errors).pow(2).mean())


def random_system(b: int, k: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = J J^T`` (rank ``min(b*k, m)``) with correlated outputs of a sample, and ``(b, k)`` residuals
    partly predictable from ``J``."""
    gen = seeded(seed)
    base = torch.randn(b, 1, m, dtype=torch.float64, generator=gen)
    jac = (base + 0.3 * torch.randn(b, k, m, dtype=torch.float64, generator=gen)).reshape(b * k, m)
    r = jac @ torch.randn(m, dtype=torch.float64, generator=gen) / m**0.5
    r = r + 0.5 * torch.randn(b * k, dtype=torch.float64, generator=gen)
    return jac @ jac.T, r.reshape(b, k)


@pytest.mark.parametrize("k, m", [(1, 40), (1, 5), (3, 40), (3, 7)])  # full rank and rank-deficient
def test_leave_one_out_leaves_out_whole_samples(k, m):
    gram, r = random_system(10, k, m, seed=k + m)
    grid = torch.logspace(-3, 2, 6, dtype=torch.float64) * torch.diagonal(gram).mean()
    loo, _ = leave_one_out_ridge(gram, r, grid)
    for value, s in zip(loo.tolist(), grid.tolist()):
        expected = brute_force_leave_one_out(gram, r, s)
        assert value == pytest.approx(expected, rel=1e-8), (k, m, s)


def documented_choice(gram, r, lam, span=(1e-5, 1e2), points=36):
    """``lam`` times the ridge of least brute-force LOO error over ``points`` log-spaced values in
    ``span`` times the mean eigenvalue of ``G``."""
    scale = float(torch.diagonal(gram).mean())  # trace / n: the mean eigenvalue
    grid = scale * torch.logspace(math.log10(span[0]), math.log10(span[1]), points, dtype=torch.float64)
    errors = torch.tensor([brute_force_leave_one_out(gram, r, float(s)) for s in grid])
    return lam * float(grid[errors.argmin()])


@pytest.mark.parametrize("k, m, lam", [(1, 30, 1.0), (2, 30, 3.0), (3, 6, 0.5)])
def test_cross_validated_alpha_is_the_argmin_over_the_documented_grid(k, m, lam):
    gram, r = random_system(9, k, m, seed=10 + k)
    rule = CrossValidatedDamping(smoothing=1.0, span=(1e-3, 1e1), points=9)
    system = GramSystem(residuals=r, gram=gram, jt_times=lambda v: [])
    chosen = rule.choose_alpha(1e-12, system, lam)  # a negligible first floor
    assert chosen == pytest.approx(documented_choice(gram, r, lam, (1e-3, 1e1), 9), rel=1e-12)


def test_cross_validation_on_max_samples_rows_takes_whole_samples():
    # max_samples = 7 rows with k = 2: the first three samples (six rows), never half a sample
    gram, r = random_system(8, 2, 30, seed=3)
    rule = CrossValidatedDamping(smoothing=1.0, span=(1e-3, 1e1), points=9, max_samples=7)
    chosen = rule.choose_alpha(1e-12, GramSystem(residuals=r, gram=gram, jt_times=lambda v: []), 2.0)
    assert chosen == pytest.approx(documented_choice(gram[:6, :6], r[:3], 2.0, (1e-3, 1e1), 9), rel=1e-12)


def test_cross_validated_choice_through_the_optimizer_with_momentum():
    # the second step (phi_{t-1} != 0) still cross-validates the batch's own G and r, k = 2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    rule = CrossValidatedDamping(smoothing=1.0, span=(1e-3, 1e1), points=9, curvature=None)
    opt = GramGaussNewton(model, lam=2.0, alpha=1e-12, momentum=0.5, adaptive_damping=rule, metric=None)
    for _ in range(2):
        jac = dense_jacobian(model, x).detach()
        with torch.no_grad():
            r = model(x) - y
        expected = documented_choice(jac @ jac.T, r, 2.0, (1e-3, 1e1), 9)
        opt.step(lambda: model(x) - y)
        assert opt.last_diagnostics.alpha == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- the gain ratio, densely


def _mlp(k: int = 2) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, k)).double()


def _set_flat(model: nn.Module, w: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(w, model.parameters())


def dense_ratio(model, x, y, w_before, d, loss, rows=None):
    """``(L(w) - L(w + d)) / predicted`` with ``predicted`` the decrease of the Gauss-Newton model
    (``||r||^2 - ||r + J d||^2`` for the square loss, ``-(g^T J d + 1/2 d^T J^T H J d)`` for the
    summed cross-entropy), on the batch's ``rows``."""
    x, y = (x, y) if rows is None else (x[rows], y[rows])
    m = copy.deepcopy(model)
    _set_flat(m, w_before)
    jac = dense_jacobian(m, x).detach()
    with torch.no_grad():
        out = m(x)
        _set_flat(m, w_before + d)
        new = m(x)
    change = (jac @ d).reshape(out.shape)
    if loss == "mse":
        before, after = (out - y).pow(2).sum(), (new - y).pow(2).sum()
        predicted = before - (out - y + change).pow(2).sum()
    else:
        before = F.cross_entropy(out, y, reduction="sum")
        after = F.cross_entropy(new, y, reduction="sum")
        p = out.softmax(-1)
        g = p - F.one_hot(y, out.shape[-1]).double()
        hess_change = p * change - p * (p * change).sum(-1, keepdim=True)  # H_i (J d)_i
        predicted = -((g * change).sum() + 0.5 * (change * hess_change).sum())
    return float((before - after) / predicted)


class Recorder(GainRatioDamping):
    """A gain-ratio rule that records the ratios it was handed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[float | None] = []

    def update(self, alpha, gain_ratio, diagnostics):
        self.seen.append(gain_ratio)
        return super().update(alpha, gain_ratio, diagnostics)


@pytest.mark.parametrize(
    "loss, momentum, lr, weight_decay, subset",
    [
        ("mse", 0.0, 1.0, 0.0, None),
        ("mse", 0.7, 0.5, 0.0, None),
        ("mse", 0.7, 1.0, 0.1, None),
        ("mse", 0.5, 0.8, 0.05, 4),
        ("cross_entropy", 0.0, 1.0, 0.0, None),
        ("cross_entropy", 0.6, 0.7, 0.1, 5),
    ],
)
def test_gain_ratio_equals_the_dense_ratio_of_the_step(loss, momentum, lr, weight_decay, subset):
    model = _mlp(3)
    gen = seeded(2)
    x = torch.randn(12, 3, dtype=torch.float64, generator=gen)
    y = (
        torch.randn(12, 3, dtype=torch.float64, generator=gen)
        if loss == "mse"
        else torch.randint(0, 3, (12,), generator=gen)
    )
    rule = Recorder(reject_below=-math.inf, subset=subset)
    options = {"curvature": "exact"} if loss != "mse" else {}
    opt = GramGaussNewton(
        model,
        lam=1.5,
        alpha=0.5,
        momentum=momentum,
        lr=lr,
        weight_decay=weight_decay,
        adaptive_damping=rule,
        loss=loss,
        metric=None,
        **options,  # the exact output Hessian: the dense ratio's (the default "gradient" is an estimate)
    )

    def closure(rows=slice(None)):
        return model(x[rows]), y[rows]

    if loss == "mse":

        def closure(rows=slice(None)):  # noqa: F811 - the square loss takes residuals
            return model(x[rows]) - y[rows]

    for _ in range(3):
        w = flat_params(model).detach().clone()
        opt.step(closure)
        decayed = flat_params(model).detach() - w
        d = decayed + lr * weight_decay * w  # the step without the decay
        rows = None if subset is None else slice(0, subset)
        expected = dense_ratio(model, x, y, w, d, loss, rows)
        assert rule.seen[-1] == pytest.approx(expected, rel=1e-8, abs=1e-10)


# ---------------------------------------------------------------- the rule's decisions


def _diag(alpha: float, jitter: float = 0.0) -> StepDiagnostics:
    return StepDiagnostics(
        loss_before=1.0,
        loss_after=None,
        predicted_decrease=0.1,
        gain_ratio=None,
        alpha=alpha,
        lam=1.0,
        momentum=0.0,
        jitter=jitter,
        solve_method="cholesky",
        solve_space="sample",
        condition=None,
        step_norm=1.0,
    )


def reference_decision(rule, alpha, rho, jitter, state):
    """The documented rule by hand: ``(alpha', accept, state')`` with ``state = (good, trusted, unchecked)``."""
    good, trusted, unchecked = state
    if rho is None:
        return alpha, True, (good, trusted, unchecked + 1)
    if rho < rule.low:
        new = max(alpha + jitter, rule.min_alpha) * rule.factor
    elif rho > rule.high:
        new = alpha / rule.factor
    else:
        new = alpha
    new = min(max(new, rule.min_alpha), rule.max_alpha)
    t = rule.high if rule.trust_above is None else rule.trust_above
    good = good + 1 if rho > t and alpha <= max(rule.min_alpha, jitter) else 0
    trusted = rule.check_every > 1 and good >= rule.trust_after
    return new, rho >= rule.reject_below, (good, trusted, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"check_every": 3, "min_alpha": 0.01, "trust_after": 2},
        {"check_every": 2, "trust_above": 0.25, "min_alpha": 0.1, "max_alpha": 5.0, "factor": 3.0},
        {"reject_below": -math.inf, "low": 0.1, "high": 0.9, "check_every": 4, "trust_after": 1},
    ],
)
def test_decisions_follow_the_documented_rule(kwargs):
    gen = seeded(5)
    rule = GainRatioDamping(**kwargs)
    state, alpha = (0, False, 0), 1.0
    for step in range(300):
        measured = rule.measures_gain_ratio
        assert measured == (not state[1] or state[2] + 1 >= rule.check_every)
        rho = float(torch.empty(1).uniform_(-0.5, 1.2, generator=gen)) if measured else None
        if measured and step % 7 == 0:
            rho = 0.95  # runs of good steps, to reach the floor and the trust
        jitter = 0.3 if step % 11 == 0 else 0.0
        expected = reference_decision(rule, alpha, rho, jitter, state)
        decision = rule.update(alpha, rho, _diag(alpha, jitter))
        assert (decision.alpha, decision.accept) == expected[:2], step
        assert (rule.good_at_floor, rule.trusted, rule.unchecked) == expected[2], step
        alpha, state = decision.alpha, expected[2]


@pytest.mark.parametrize("rule", ["gain_ratio", "cross_validated"])
def test_a_resumed_run_continues_bit_for_bit(rule):
    def make():
        model = _mlp(2)
        damping = (
            GainRatioDamping(
                check_every=3, min_alpha=0.1, trust_after=1, low=0.45, high=0.5, retries=1, recheck_above=None
            )
            if rule == "gain_ratio"
            else CrossValidatedDamping(smoothing=0.5, points=8)
        )
        return model, GramGaussNewton(model, lam=2.0, alpha=0.3, momentum=0.6, adaptive_damping=damping)

    gen = seeded(7)
    batches = [
        (torch.randn(8, 3, dtype=torch.float64, generator=gen), torch.randn(8, 2, dtype=torch.float64, generator=gen))
        for _ in range(10)
    ]
    model, opt = make()
    for x, y in batches[:5]:
        opt.step(lambda x=x, y=y: model(x) - y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    if rule == "gain_ratio":  # saved mid-trust, two steps unmeasured: a fresh rule would measure the next
        assert opt.damping.state_dict() == {"trusted": True, "good_at_floor": 1, "unchecked": 2}
    for x, y in batches[5:]:
        opt.step(lambda x=x, y=y: model(x) - y)
    resumed, opt2 = make()
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for x, y in batches[5:]:
        opt2.step(lambda x=x, y=y: resumed(x) - y)
    assert_same_run(flat_params(model), flat_params(resumed))
    assert opt.damping.state_dict() == opt2.damping.state_dict()
    assert opt.param_groups[0]["alpha"] == opt2.param_groups[0]["alpha"]


def test_a_rejected_step_changes_nothing():
    model = _mlp(2)
    gen = seeded(8)
    x, y = torch.randn(8, 3, dtype=torch.float64, generator=gen), torch.randn(8, 2, dtype=torch.float64, generator=gen)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, momentum=0.5, weight_decay=0.1, adaptive_damping=True)
    opt.step(lambda: model(x) - y)
    w = flat_params(model).detach().clone()
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.damping.reject_below = math.inf  # the next step is rejected
    opt.step(lambda: model(x) - y)
    assert opt.last_diagnostics.rejected
    assert torch.equal(flat_params(model), w)
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for key in state:
        for name, value in state[key].items():
            assert torch.equal(torch.as_tensor(after[key][name]), torch.as_tensor(value)), name
