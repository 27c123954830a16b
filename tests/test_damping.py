"""Adaptive (gain-ratio) damping: the ratio, the alpha rule, rejected steps restore parameters."""

from __future__ import annotations

import math

import pytest
import torch
from dense import assert_same_run
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.damping import CrossValidatedDamping, GainRatioDamping, gain_ratio
from gramnewton.diagnostics import StepDiagnostics


def diagnostics_of(jitter: float = 0.0, loss_before: float = 1.0, predicted_decrease: float = 0.1) -> StepDiagnostics:
    """A step's diagnostics as the optimizer hands them to the rule (the rule reads these three)."""
    return StepDiagnostics(
        loss_before=loss_before,
        loss_after=None,
        predicted_decrease=predicted_decrease,
        gain_ratio=None,
        alpha=1.0,
        lam=1.0,
        momentum=0.0,
        jitter=jitter,
        solve_method="cholesky" if jitter == 0 else "jitter",
        solve_space="sample",
        condition=None,
        step_norm=1.0,
    )


STEP = diagnostics_of()  # an ordinary step: no jitter, a promise of a tenth of the loss


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
    opt = GramGaussNewton(model, alpha=0.5, adaptive_damping=GainRatioDamping(factor=4.0), lam=1.0, momentum=0.0)
    opt.step(lambda: model(x) - y)
    assert abs(opt.last_gain_ratio - 1.0) < 1e-10
    assert opt.param_groups[0]["alpha"] == pytest.approx(0.125)


def test_step_that_increases_the_loss_is_undone_and_alpha_raised():
    model = SineModel(0.4)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, alpha=1e-3, adaptive_damping=True, lam=1.0, momentum=0.0)
    opt.step(lambda: model(x) - y)
    assert opt.last_gain_ratio < 0
    assert float(model.w.detach()) == 0.4
    assert opt.param_groups[0]["alpha"] == pytest.approx(2e-3)
    for _ in range(30):  # raised damping eventually gives accepted, loss-decreasing steps
        opt.step(lambda: model(x) - y)
    assert abs(math.sin(3 * float(model.w.detach()))) < 1e-3


def test_a_rule_that_never_rejects_keeps_the_step_and_still_raises_alpha():
    """``reject_below=-inf``: the step that raised the loss stays taken, ``alpha`` doubles."""
    model = SineModel(0.4)
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    opt = GramGaussNewton(
        model, alpha=1e-3, adaptive_damping=GainRatioDamping(reject_below=-math.inf), lam=1.0, momentum=0.0
    )
    opt.step(lambda: model(x) - y)
    assert opt.last_gain_ratio < 0 and not opt.last_diagnostics.rejected
    assert float(model.w.detach()) != 0.4
    assert opt.param_groups[0]["alpha"] == pytest.approx(2e-3)
    rule = GainRatioDamping(reject_below=-math.inf)
    assert not rule.update(1.0, math.nan, STEP).accept  # a NaN ratio is still refused


def test_adapted_alpha_survives_state_dict():
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    opt = GramGaussNewton(model, alpha=1.0, adaptive_damping=True, lam=1.0, momentum=0.0)
    opt.step(lambda: model(x) - y)
    twin = GramGaussNewton(nn.Linear(3, 1), alpha=1.0, adaptive_damping=True, lam=1.0, momentum=0.0)
    twin.load_state_dict(opt.state_dict())
    assert twin.param_groups[0]["alpha"] == opt.param_groups[0]["alpha"] < 1.0


@pytest.mark.parametrize("rule", ["gain_ratio", "cross_validated"])
def test_damping_state_survives_state_dict_and_a_resumed_run_steps_alike(rule, tmp_path):
    """The rule's own state (the gain-ratio rule's trust and unmeasured-step count; the
    cross-validated ridge, floor and trust) and the rejections in a row are in the state dict:
    a twin loaded from it, even through ``torch.load(weights_only=True)``, measures the same
    steps and takes the same ones."""

    def make(model):
        # trusted after three good steps at the floor; no recheck (steps of lam = 1 promise most of
        # their loss, so every trusted step would be measured)
        trusting = GainRatioDamping(check_every=4, min_alpha=0.1, recheck_above=None)
        damping = trusting if rule == "gain_ratio" else CrossValidatedDamping(curvature=trusting)
        return GramGaussNewton(model, alpha=0.3, lam=1.0, momentum=0.5, adaptive_damping=damping)

    torch.manual_seed(0)
    with torch.device("cpu"):  # the CPU's draws on any default device: whether a step is trusted is theirs
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)) for _ in range(12)]
    home = torch.get_default_device()
    model, batches = model.to(home), [(x.to(home), y.to(home)) for x, y in batches]
    opt = make(model)
    for x, y in batches[:5]:
        opt.step(lambda: model(x) - y)
    opt.rejections_in_a_row = 1
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    twin_model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    twin_model.load_state_dict(saved["model"])
    twin = make(twin_model)
    twin.load_state_dict(saved["optimizer"])
    assert twin.damping.state_dict() == opt.damping.state_dict() and twin.rejections_in_a_row == 1
    measured = {True: [], False: []}
    for x, y in batches[5:]:
        for m, o, log in ((model, opt, measured[True]), (twin_model, twin, measured[False])):
            o.step(lambda: m(x) - y)
            log.append(o.last_gain_ratio)
    assert measured[True] == measured[False]
    assert (None in measured[True]) == (rule == "gain_ratio")  # the trusted rule skipped measurements
    with pytest.raises(ValueError, match="log_ridge"):
        GainRatioDamping().load_state_dict({"log_ridge": 1.0})
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert_same_run(a, b)


def test_gain_ratio_edge_cases():
    r = torch.tensor([1.0, 1.0])
    assert gain_ratio(r, torch.zeros(2), torch.tensor([float("nan"), 0.0])) == -math.inf
    assert gain_ratio(r, r, torch.zeros(2)) == 1.0  # no predicted progress, actual progress
    assert gain_ratio(r, torch.zeros(2), torch.tensor([0.5, 0.5])) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(factor=1.0),
        dict(low=0.8, high=0.2),
        dict(min_alpha=0.0),
        dict(check_every=0),
        dict(check_every=2.5),
        dict(trust_after=0),
        dict(trust_after=1.5),
        dict(trust_above=0.1),  # below low: a ratio that raises alpha would keep the trust
        dict(trust_above=0.9),
        dict(recheck_above=0.0),
        dict(recheck_above=math.inf),
        dict(recheck_above=math.nan),
    ],
)
def test_invalid_rules(kwargs):
    with pytest.raises(ValueError):
        GainRatioDamping(**kwargs)


def test_alpha_rule_is_bounded():
    rule = GainRatioDamping(factor=10.0, min_alpha=1e-3, max_alpha=1.0)
    assert rule.next_alpha(0.5, -1.0) == 1.0
    assert rule.next_alpha(2e-3, 0.9) == 1e-3
    assert rule.next_alpha(0.5, 0.5) == 0.5


def test_trusted_steps_are_checked_every_kth_and_equal_the_fixed_alpha_step():
    # a linear model: rho = 1 on every step, so once alpha sits at its floor the rule trusts the
    # linearisation and re-evaluates only every third step; unmeasured steps are exactly the
    # fixed-alpha step and are counted as steps
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    model, twin = nn.Linear(5, 1, dtype=torch.float64), nn.Linear(5, 1, dtype=torch.float64)
    twin.load_state_dict(model.state_dict())
    floor = 1e-3
    rule = GainRatioDamping(factor=10.0, min_alpha=floor, check_every=3)
    opt = GramGaussNewton(model, alpha=floor, adaptive_damping=rule, lam=4.0, momentum=0.5, metric=None)
    fixed = GramGaussNewton(twin, alpha=floor, adaptive_damping=False, lam=4.0, momentum=0.5)
    calls, measured = [0], []
    y_twin = y.clone()

    def closure():
        calls[0] += 1
        return model(x) - y

    for _ in range(7):
        before = calls[0]
        opt.step(closure)
        fixed.step(lambda: twin(x) - y_twin)
        measured.append(calls[0] - before == 2)
        assert opt.last_diagnostics.gain_ratio is None or abs(opt.last_diagnostics.gain_ratio - 1) < 1e-9
    # steps 1-3 measured (alpha at the floor, rho > high: trusted after the third, trust_after=3),
    # then one step in three
    assert measured == [True, True, True, False, False, True, False], measured
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    assert int(opt.state[model.weight]["step"]) == 7


def test_a_failed_check_ends_the_trust():
    rule = GainRatioDamping(min_alpha=1e-3, check_every=4)
    diagnostics = STEP
    for _ in range(3):
        rule.update(1e-3, 0.9, diagnostics)
    assert rule.trusted and not rule.measures_gain_ratio
    for _ in range(3):
        rule.update(1e-3, None, diagnostics)
    assert rule.measures_gain_ratio  # the fifth step is checked: one in every four
    decision = rule.update(1e-3, 0.1, diagnostics)
    assert not rule.trusted and rule.measures_gain_ratio and decision.alpha == pytest.approx(2e-3)


def test_trust_needs_trust_after_good_steps_in_a_row_at_the_floor():
    """A floor at or above the starting ``alpha`` (``min_alpha=1``, ``alpha=0.3``): one good first
    step starts no trust, so the next step is measured and a bad one is rejected (the ratios of
    mnist's first cross-entropy steps, where trust after the first step took the logits to Inf).
    Trust starts after ``trust_after`` good measured steps in a row at the floor; a ratio that
    is not good (here between ``low`` and ``high``, the default ``trust_above``) restarts the count."""
    rule = GainRatioDamping(min_alpha=1.0, check_every=4)
    decision = rule.update(0.3, 0.83, STEP)
    assert decision.alpha == 1.0 and not rule.trusted and rule.measures_gain_ratio
    decision = rule.update(1.0, -82.0, STEP)
    assert not decision.accept and decision.alpha == 2.0 and not rule.trusted
    for ratio in (0.9, 0.9, 0.5, 0.9, 0.9):  # 0.5: alpha stays at the floor, the count restarts
        rule.update(1.0, ratio, STEP)
        assert not rule.trusted and rule.measures_gain_ratio
    rule.update(1.0, 0.9, STEP)
    assert rule.trusted and not rule.measures_gain_ratio
    eager = GainRatioDamping(min_alpha=1.0, check_every=4, trust_after=1)
    eager.update(0.3, 0.83, STEP)
    assert eager.trusted  # the pre-trust_after behaviour, for a rule that asks for it


@pytest.mark.parametrize("trust_above", [None, 0.25])
def test_trust_above_sets_the_ratios_that_keep_the_trust(trust_above):
    """At the floor a ratio between ``low`` and ``high`` leaves ``alpha`` unchanged: with
    ``trust_above=low`` it keeps the trust (no re-evaluation of the next steps), with the default
    (``high``) it ends it; a ratio at or below ``trust_above`` always ends it and raises ``alpha``."""
    rule = GainRatioDamping(min_alpha=1e-3, check_every=4, trust_above=trust_above, trust_after=1)
    rule.update(1e-3, 0.9, STEP)
    assert rule.trusted
    decision = rule.update(1e-3, 0.5, STEP)  # between low and high: alpha stays at the floor
    assert decision.alpha == 1e-3 and decision.accept
    assert rule.trusted == (trust_above is not None) and rule.measures_gain_ratio == (trust_above is None)
    decision = rule.update(1e-3, 0.2, STEP)  # below low: alpha raised, the trust ends in both
    assert decision.alpha == pytest.approx(2e-3) and not rule.trusted and rule.measures_gain_ratio
    rule.update(2e-3, 0.5, STEP)  # above the floor nothing is trusted
    assert not rule.trusted


def test_the_solves_jitter_counts_as_damping():
    """A solve that needed jitter was damped by ``alpha + jitter``: a failed step raises from there
    (on mnist's cross-entropy Gram at ``alpha = 1e-8`` the jitter was 0.03-440, and doubling
    ``1e-8`` took 16 steps, 14 rejected, to change the step); a good step lowers ``alpha`` itself; a good step
    with ``alpha`` at or below the jitter counts as at the floor for the trust."""
    rule = GainRatioDamping()
    assert rule.update(1e-8, 0.1, diagnostics_of(jitter=20.0)).alpha == pytest.approx(2 * (20.0 + 1e-8))
    assert rule.update(1e-8, 0.1, STEP).alpha == pytest.approx(2e-8)
    assert rule.update(1e-6, 0.9, diagnostics_of(jitter=20.0)).alpha == pytest.approx(5e-7)
    assert rule.update(1e-6, 0.5, diagnostics_of(jitter=20.0)).alpha == 1e-6
    cross_validated = CrossValidatedDamping()
    cross_validated.update(1e-8, 0.1, diagnostics_of(jitter=20.0))
    assert cross_validated.floor == pytest.approx(2 * (20.0 + 1e-8))
    for jitter, trusted in ((0.0, False), (1e-3, True), (20.0, True)):
        rule = GainRatioDamping(check_every=4, trust_after=1)
        rule.update(1e-3, 0.9, diagnostics_of(jitter=jitter))
        assert rule.trusted == trusted


def test_a_trusted_step_that_promises_much_of_its_loss_is_measured():
    rule = GainRatioDamping(min_alpha=1e-3, check_every=4, trust_after=1)
    assert rule.measures(diagnostics_of(predicted_decrease=0.01))  # not trusted yet: every step
    rule.update(1e-3, 0.9, STEP)
    assert rule.trusted and not rule.measures(diagnostics_of(predicted_decrease=0.5))
    assert rule.measures(diagnostics_of(predicted_decrease=0.51))
    assert rule.measures(diagnostics_of(predicted_decrease=math.nan))
    never = GainRatioDamping(min_alpha=1e-3, check_every=4, trust_after=1, recheck_above=None)
    never.update(1e-3, 0.9, STEP)
    assert never.trusted and not never.measures(diagnostics_of(predicted_decrease=10.0))


@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_trusted_steps_are_measured_when_they_promise_more_than_recheck_above(lam):
    """A linear model on fresh batches of 4 < 6 parameters, ``alpha`` at the floor: ``rho = 1``,
    trusted after the first step. With ``lam = 1`` each step fits its batch, promising all of its
    loss (more than ``recheck_above = 0.5``): measured anyway; with ``lam = 4`` it promises
    ``1 - (3/4)^2 = 0.4375`` of it: left unmeasured, as the trust says."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1, dtype=torch.float64)
    rule = GainRatioDamping(min_alpha=1e-9, check_every=100, trust_after=1)
    opt = GramGaussNewton(model, alpha=1e-9, adaptive_damping=rule, lam=lam, momentum=0.0)
    calls, measured = [0], []
    for _ in range(4):
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)

        def closure(x=x, y=y):
            calls[0] += 1
            return model(x) - y

        before = calls[0]
        opt.step(closure)
        measured.append(calls[0] - before == 2)
        promised = opt.last_diagnostics.predicted_decrease / opt.last_diagnostics.loss_before
        assert promised == pytest.approx(1.0 if lam == 1 else 1 - 0.75**2, rel=1e-6)
    assert rule.trusted
    assert measured == [True] + [lam == 1.0] * 3


def test_a_rule_named_by_a_mapping_gets_its_arguments():
    """``adaptive_damping={"name": ..., **arguments}`` (a JSON grid's form)
    builds that rule with those arguments; an unknown name or argument is refused."""
    model = nn.Linear(3, 1)
    opt = GramGaussNewton(model, adaptive_damping={"name": "gain_ratio", "check_every": 4, "trust_above": 0.25})
    assert isinstance(opt.damping, GainRatioDamping)
    assert (opt.damping.check_every, opt.damping.trust_above) == (4, 0.25)
    assert isinstance(
        GramGaussNewton(model, adaptive_damping={"name": "cross_validated"}).damping, CrossValidatedDamping
    )
    with pytest.raises(ValueError, match="unknown damping rule"):
        GramGaussNewton(model, adaptive_damping={"name": "bogus"})
    with pytest.raises(TypeError, match="trust"):
        GramGaussNewton(model, adaptive_damping={"name": "gain_ratio", "trust": 0.25})


class FixedMask(nn.Module):
    """Multiplies by a mask drawn once: the function a dropout layer computes for one draw."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask[: x.shape[0]]  # a subset: its rows of the batch's draw (drawn in order on the CPU)


def mlp_with(middle: nn.Module, outputs: int) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), middle, nn.Linear(16, outputs)).double()


@pytest.mark.parametrize(
    "loss,options",
    [
        ("mse", {}),
        ("mse", {"geodesic_acceleration": True}),
        ("mse", {"adaptive_damping": {"name": "gain_ratio", "subset": 5}}),
        ("cross_entropy", {}),
    ],
    ids=["mse", "mse_geodesic", "mse_subset", "cross_entropy"],
)
def test_a_dropout_network_steps_as_the_network_with_its_mask_fixed(loss, options):
    """A closure that draws random numbers (here dropout's mask) is re-evaluated with the draws
    of its first run in the step: the gain ratio, geodesic acceleration's second point and the
    cross-entropy's re-evaluated loss then all see the function the step linearised, so three
    steps of a dropout network equal those of the same network with each step's mask fixed
    (drawn as dropout draws it). Fresh draws at the re-evaluation had made the gain ratio of a
    near-exact step -7.6 and rejected it."""
    torch.manual_seed(0)
    b, p, outputs = 10, 0.5, (3 if loss == "cross_entropy" else 1)
    x = torch.randn(b, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (b,)) if loss == "cross_entropy" else torch.randn(b, 1, dtype=torch.float64)
    dropped, fixed = mlp_with(nn.Dropout(p), outputs), mlp_with(FixedMask(torch.ones(b, 16)), outputs)
    settings = dict(loss=loss, lam=1.0, alpha=1e-3, momentum=0.5, **options)
    opts = GramGaussNewton(dropped, **settings), GramGaussNewton(fixed, **settings)

    def closure(model, rows=slice(None)):
        out = model(x[rows])
        return (out, y[rows]) if loss == "cross_entropy" else out - y[rows]

    for seed in range(3):
        torch.manual_seed(seed)
        fixed[2].mask = nn.functional.dropout(torch.ones(b, 16, dtype=torch.float64), p)  # the draw to come
        torch.manual_seed(seed)
        opts[0].step(lambda rows=slice(None): closure(dropped, rows))
        stream = torch.rand(4)
        opts[1].step(lambda rows=slice(None): closure(fixed, rows))
        first, second = opts[0].last_diagnostics, opts[1].last_diagnostics
        assert first.gain_ratio == pytest.approx(second.gain_ratio, rel=1e-9, abs=1e-12)
        assert first.rejected == second.rejected
        for a, c in zip(dropped.parameters(), fixed.parameters()):
            torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-13)
        # the re-evaluations left the generator where the step's one forward left it
        torch.manual_seed(seed)
        nn.functional.dropout(torch.ones(b, 16, dtype=torch.float64), p)
        assert torch.equal(torch.rand(4), stream)
