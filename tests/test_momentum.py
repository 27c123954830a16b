"""Sample-space momentum (SPRING), primal/dual solve, damping-rule interface, diagnostics.

Every step is checked in float64 against the explicit dense formula built on ``jacrev``:
``phi_t = mu phi_{t-1} + J^T (lam J J^T + alpha I)^{-1} (r - lam mu J phi_{t-1})``,
``w <- (1 - wd) w - phi_t``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math

import pytest
import torch
from dense import assert_close, assert_same_run, dense_jacobian, dense_step, flat_params
from test_optim import CASES
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.damping import DampingDecision, GainRatioDamping
from gramnewton.engines import ReferenceEngine
from gramnewton.solve import damped_solve
from gramnewton.update import apply_direction

RTOL = 1e-10


def _batches(shape: tuple[int, ...], k: int, b: int, count: int = 3) -> list[tuple[Tensor, Tensor]]:
    return [(torch.randn(b, *shape, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)) for _ in range(count)]


def _set_flat(model: nn.Module, flat: Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def dense_spring(
    model: nn.Module,
    batches: list,
    lam: float,
    alpha: float,
    mu: float,
    wd: float = 0.0,
    bias_correction: bool = False,
    max_step_norm: float | None = None,
    lr: float = 1.0,
) -> tuple[list[Tensor], Tensor]:
    """Parameters after each step of the explicit formula, and the last ``phi``.

    The step is ``w <- (1 - lr wd) w - lr s_t phi_t``, ``s_t = min(b_t, C / ||phi_t||)`` with
    ``b_t = 1 / sqrt(1 - mu^(2t))`` under ``bias_correction`` (else 1) and ``C = max_step_norm``
    (else no bound); the recursion keeps the unscaled ``phi_t``."""
    model = copy.deepcopy(model)
    phi = torch.zeros_like(flat_params(model))
    trajectory = []
    for t, (x, y) in enumerate(batches, start=1):
        jac = dense_jacobian(model, x)
        with torch.no_grad():
            r = (model(x) - y).reshape(-1)
        mat = lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
        phi = mu * phi + jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ phi)
        scale = 1 / math.sqrt(1 - mu ** (2 * t)) if bias_correction else 1.0
        if max_step_norm is not None:
            scale = min(scale, max_step_norm / float(phi.detach().norm()))
        _set_flat(model, (1 - lr * wd) * flat_params(model) - lr * scale * phi)
        trajectory.append(flat_params(model))
    return trajectory, phi


@pytest.mark.parametrize("engine", ["reference", "auto"])
def test_zero_momentum_is_todays_step_bit_for_bit(engine):
    """``momentum=0`` runs Eq. 11 operation for operation: solve, ``-J^T c``, apply."""
    name, build, shape, k, b = CASES[1]
    model = build().double()
    twin = copy.deepcopy(model)
    opt = GramGaussNewton(
        model, lam=0.5, alpha=0.2, momentum=0.0, weight_decay=1e-3, engine=engine, adaptive_damping=False
    )
    twin_engine = GramGaussNewton(twin, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0).engine
    for x, y in _batches(shape, k, b):
        opt.step(lambda: model(x) - y)
        system = twin_engine.compute(lambda: twin(x) - y)
        c, _ = damped_solve(system.gram, system.residuals.reshape(-1), 0.5, 0.2)
        apply_direction(list(twin.parameters()), [-d for d in system.jt_times(c)], 1e-3)
        assert_same_run(flat_params(model), flat_params(twin))
    assert all("momentum_buffer" not in opt.state[p] for p in model.parameters())


def _small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))  # m = 21


def _min_norm_steps(model: nn.Module, batches: list, lam: float) -> list[Tensor]:
    """``alpha = 0``: ``w <- w - J^+ r / lam``, the minimum-norm least-squares step, by SVD."""
    model, trajectory = copy.deepcopy(model), []
    for x, y in batches:
        jac = dense_jacobian(model, x)
        with torch.no_grad():
            r = (model(x) - y).reshape(-1)
        _set_flat(model, flat_params(model) - torch.linalg.pinv(jac) @ r / lam)
        trajectory.append(flat_params(model))
    return trajectory


@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("b", [50, 30, 8], ids=["bk_above_2m", "bk_between_m_and_2m", "m_above_bk"])
@pytest.mark.parametrize("mu,alpha", [(0.0, 0.05), (0.6, 0.05), (0.0, 0.0)])
def test_parameter_space_equals_sample_space(engine, b, mu, alpha):
    torch.manual_seed(3)
    model = _small_mlp().double()
    # alpha = 0: one step (undamped Gauss-Newton steps amplify round-off along a trajectory)
    batches = _batches((3,), 1, b, count=3 if alpha else 1)
    expected = dense_spring(model, batches, 1.3, alpha, mu)[0] if alpha else _min_norm_steps(model, batches, 1.3)
    # alpha = 0: only the parameter space (its rank-revealing SVD gives the minimum-norm step);
    # the sample space's alpha = 0 solve is tested in tests/test_reliability.py
    spaces = ("sample", "parameter", "auto") if alpha else ("parameter",)
    runs = {}
    for space in spaces:
        trial = copy.deepcopy(model)
        opt = GramGaussNewton(
            trial, lam=1.3, alpha=alpha, momentum=mu, engine=engine, solve_space=space, adaptive_damping=False
        )
        for t, (x, y) in enumerate(batches):
            opt.step(lambda: trial(x) - y)
            assert_close(flat_params(trial), expected[t], 1e-9, f"{space} space, step {t + 1}")
        runs[space] = opt.last_diagnostics.solve_space
        # every engine leaves out the (b, b) Gram of a parameter-space step: nothing needs it
        assert (opt.last_step.gram is None) == (runs[space] == "parameter"), space
    expected_spaces = {"sample": "sample", "parameter": "parameter", "auto": "parameter" if b == 50 else "sample"}
    assert runs == {space: expected_spaces[space] for space in spaces}


@pytest.mark.parametrize(
    "dtype,solve_dtype,b,space",
    [
        (torch.float32, None, 30, "parameter"),  # m < b*k <= 2m: the float64 normal equations
        (torch.float32, None, 21, "sample"),  # b*k = m
        (torch.float32, torch.float32, 30, "sample"),  # a solve_dtype: the QR, which pays off only past 2m
        (torch.float64, None, 30, "sample"),  # a float64 J: the QR
        (torch.float64, None, 50, "parameter"),
    ],
)
def test_auto_solve_space_switches_where_its_solver_is_cheaper(dtype, solve_dtype, b, space):
    """``"auto"``: the parameter space past ``b*k > m`` when it is solved by the float64 normal
    equations, past ``2 m`` by the QR (m = 21 here); the step equals the forced other space's."""
    torch.manual_seed(4)
    model = _small_mlp().to(dtype)
    x, y = (t.to(dtype) for t in _batches((3,), 1, b, count=1)[0])
    steps = {}
    for choice in ("auto", "sample" if space == "parameter" else "parameter"):
        trial = copy.deepcopy(model)
        opt = GramGaussNewton(
            trial,
            lam=1.3,
            alpha=0.05,
            momentum=0.0,
            solve_space=choice,
            solve_dtype=solve_dtype,
            adaptive_damping=False,
        )
        opt.step(lambda: trial(x) - y)
        steps[choice] = flat_params(trial).double()
        if choice == "auto":
            assert opt.last_diagnostics.solve_space == space
    other = steps["sample" if space == "parameter" else "parameter"]
    assert_close(steps["auto"], other, 1e-4 if dtype == torch.float32 else 1e-9, "auto against the forced space")


@pytest.mark.parametrize(
    "solve_dtype,method,tolerance", [(None, "normal_equations", 1e-4), (torch.float32, "qr", 1e-3)]
)
def test_parameter_space_solve_is_accurate_in_float32(solve_dtype, method, tolerance):
    """Max-norm relative error of the float32 step against the float64 one: the default float64
    normal equations 1.9e-5 here, the float32 QR of ``[sqrt(lam) J; sqrt(alpha) I]`` 8.8e-5; an SVD
    of ``J`` alone (no cut-off) was off by 1.4e-3, the normal equations ``J^T J`` in float32 by 0.74."""
    torch.manual_seed(0)
    with torch.device("cpu"):  # the CPU's draws on any default device: the errors above are theirs
        model = nn.Sequential(nn.Linear(1, 20), nn.Tanh(), nn.Linear(20, 1))  # the sinc network, m = 61
        x = 2 * torch.rand(1000, 1) - 1
    model, x = model.to(torch.get_default_device()), x.to(torch.get_default_device())
    y = torch.sinc(10 * x)
    steps = {}
    for dtype in (torch.float32, torch.float64):
        trial = copy.deepcopy(model).to(dtype)
        before = flat_params(trial).double()
        opt = GramGaussNewton(
            trial,
            alpha=1e-3,
            solve_space="parameter",
            lam=1.0,
            adaptive_damping=False,
            momentum=0.0,
            solve_dtype=solve_dtype if dtype == torch.float32 else None,
        )
        opt.step(lambda: trial(x.to(dtype)) - y.to(dtype))
        assert opt.last_diagnostics.solve_method == (method if dtype == torch.float32 else "qr")
        steps[dtype] = flat_params(trial).double() - before
    # on an H200 the float32 Jacobian is 1.1e-7 off the float64 one (5e-8 on the CPU), and the
    # conditioning (alpha = 1e-3) takes both methods' steps to 3.3e-4 and 4.2e-4 (forty-eighth session)
    off_cpu = 1e-3 if torch.get_default_device().type != "cpu" else tolerance
    assert_close(steps[torch.float32], steps[torch.float64], off_cpu, "float32 parameter-space step")


class _Scripted:
    """A damping rule that accepts or rejects as scripted and records what it was given."""

    def __init__(self, accepts: list[bool]):
        self.accepts, self.seen = list(accepts), []

    def update(self, alpha, gain_ratio, diagnostics):
        self.seen.append((alpha, gain_ratio, diagnostics))
        return DampingDecision(alpha * 2, self.accepts.pop(0))


@pytest.mark.parametrize("engine", ["reference", "auto"])
def test_rejected_step_leaves_parameters_and_momentum_unchanged(engine):
    name, build, shape, k, b = CASES[0]
    model = build().double()
    x1, y1, x2, y2, x3, y3 = (t for batch in _batches(shape, k, b) for t in batch)
    opt = GramGaussNewton(
        model,
        alpha=0.2,
        momentum=0.7,
        engine=engine,
        adaptive_damping=_Scripted([True, False, True]),
        lam=1.0,
        metric=None,
    )
    opt.step(lambda: model(x1) - y1)
    params, state = flat_params(model), copy.deepcopy(opt.state_dict()["state"])
    opt.step(lambda: model(x2) - y2)  # rejected
    assert opt.last_diagnostics.rejected and opt.param_groups[0]["alpha"] == pytest.approx(0.8)
    assert torch.equal(flat_params(model), params)
    after = opt.state_dict()["state"]
    for key in state:
        assert torch.equal(after[key]["momentum_buffer"], state[key]["momentum_buffer"])
        assert int(after[key]["step"]) == 1
    # the next accepted step continues from phi_1 as if the rejected batch had not been seen
    opt.step(lambda: model(x3) - y3)
    twin = copy.deepcopy(model)
    _set_flat(twin, params)
    expected = _continue(twin, state, (x3, y3), lam=1.0, alpha=0.8, mu=0.7)
    assert_close(flat_params(model), expected, RTOL, "step after a rejected one")


def _continue(model: nn.Module, state: dict, batch: tuple[Tensor, Tensor], lam: float, alpha: float, mu: float):
    x, y = batch
    phi = torch.cat([state[i]["momentum_buffer"].reshape(-1) for i in sorted(state)])
    jac = dense_jacobian(model, x)
    with torch.no_grad():
        r = (model(x) - y).reshape(-1)
    mat = lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
    return flat_params(model) - (mu * phi + jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ phi))


def test_rule_errors_restore_parameters():
    class Broken:
        def update(self, alpha, gain_ratio, diagnostics):
            raise RuntimeError("rule failed")

    model = _small_mlp().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, momentum=0.5, adaptive_damping=Broken(), lam=1.0)
    before = flat_params(model)
    with pytest.raises(RuntimeError, match="rule failed"):
        opt.step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before)
    assert all(not opt.state[p] for p in model.parameters())


def test_state_dict_round_trip_with_momentum_gives_identical_steps():
    name, build, shape, k, b = CASES[2]
    model = build().double()
    batches = _batches(shape, k, b, count=4)
    opt = GramGaussNewton(model, lam=0.9, alpha=0.4, momentum=0.6, adaptive_damping=True)
    for x, y in batches[:2]:
        opt.step(lambda: model(x) - y)
    twin = copy.deepcopy(model)
    twin_opt = GramGaussNewton(twin, adaptive_damping=True, lam=1.0, momentum=0.0)
    twin_opt.load_state_dict(opt.state_dict())
    assert twin_opt.param_groups[0]["momentum"] == 0.6
    for x, y in batches[2:]:
        opt.step(lambda: model(x) - y)
        twin_opt.step(lambda: twin(x) - y)
        assert_same_run(flat_params(model), flat_params(twin))


def test_diagnostics_are_consistent():
    model = nn.Linear(6, 1, dtype=torch.float64)  # linear: the linearised model is exact
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    rule = _Scripted([True])
    opt = GramGaussNewton(model, lam=2.0, alpha=0.5, momentum=0.3, adaptive_damping=rule)
    before = flat_params(model)
    loss = opt.step(lambda: model(x) - y)
    d = opt.last_diagnostics
    assert rule.seen[0][2].gain_ratio == d.gain_ratio and rule.seen[0][0] == 0.5
    assert d.loss_before == pytest.approx(float(loss), rel=1e-14)
    assert d.loss_after == pytest.approx(float((model(x) - y).detach().pow(2).mean()), rel=1e-12)
    assert d.predicted_decrease == pytest.approx(d.loss_before - d.loss_after, rel=1e-9)
    assert d.gain_ratio == pytest.approx(1.0, abs=1e-9)
    assert d.step_norm == pytest.approx(float((flat_params(model) - before).norm()), rel=1e-12)
    assert (d.alpha, d.lam, d.momentum, d.rejected, d.solve_space) == (0.5, 2.0, 0.3, False, "sample")
    jac = dense_jacobian(model, x)
    eig = torch.linalg.eigvalsh(2.0 * jac @ jac.T + 0.5 * torch.eye(4, dtype=torch.float64))
    true_condition = float(eig.max() / eig.min())
    assert 1.0 <= d.condition <= true_condition * (1 + 1e-9) and d.solve_method == "cholesky"
    plain = GramGaussNewton(_small_mlp().double(), lam=1.0, adaptive_damping=False, momentum=0.0)
    plain.step(lambda: plain.model(x[:, :3]) - y)
    assert plain.last_diagnostics.loss_after is None and plain.last_diagnostics.gain_ratio is None


def test_gain_ratio_rule_rejects_with_momentum():
    class Sine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.4], dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return torch.sin(3 * self.w * x)

    model = Sine()
    x, y = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, alpha=1e-3, momentum=0.5, adaptive_damping=GainRatioDamping(), lam=1.0)
    opt.step(lambda: model(x) - y)
    assert opt.last_diagnostics.rejected and float(model.w.detach()) == 0.4
    assert "momentum_buffer" not in opt.state[model.w] and "step" not in opt.state[model.w]


def test_engine_without_j_times_refuses_momentum_and_changes_nothing():
    class NoJv(ReferenceEngine):
        def compute(self, closure, **options):
            return dataclasses.replace(super().compute(closure, **options), j_times=None, jacobian_columns=None)

    model = _small_mlp().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, momentum=0.5, engine=NoJv(list(model.parameters())), lam=1.0, adaptive_damping=False)
    opt.step(lambda: model(x) - y)  # the first step has no phi_{t-1}: no J v needed
    before = flat_params(model)
    with pytest.raises(ValueError, match="j_times"):
        opt.step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before)
    with pytest.raises(ValueError, match="dense Jacobian"):
        GramGaussNewton(
            model,
            engine=NoJv(list(model.parameters())),
            solve_space="parameter",
            lam=1.0,
            adaptive_damping=False,
            momentum=0.0,
        ).step(lambda: model(x) - y)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"), (dict(solve_space="dual"), "solve_space")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GramGaussNewton(_small_mlp(), **{"momentum": 0.0, **kwargs})


@pytest.mark.parametrize("space", ["sample", "parameter"])
def test_momentum_with_cross_entropy_matches_dense_formula(space):
    """For a general loss the same minimiser: ``(lam J^T H J + alpha I) phi_t = J^T g + alpha mu phi_{t-1}``."""
    from test_classification import _derivatives, _mlp, _sum_loss

    model = _mlp(3).double()
    twin = copy.deepcopy(model)
    lam, alpha, mu = 0.8, 0.4, 0.7
    opt = GramGaussNewton(
        model,
        lam=lam,
        alpha=alpha,
        momentum=mu,
        loss="cross_entropy",
        curvature="exact",
        solve_space=space,
        adaptive_damping=False,
    )
    phi = torch.zeros_like(flat_params(model))
    for _ in range(3):
        x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
        jac, _, g, h = _derivatives(twin, x, _sum_loss("cross_entropy", y))
        mat = lam * jac.T @ h @ jac + alpha * torch.eye(jac.shape[1], dtype=jac.dtype)
        phi = torch.linalg.solve(mat, jac.T @ g + alpha * mu * phi)
        _set_flat(twin, flat_params(twin) - phi)
        opt.step(lambda: (model(x), y))
        assert_close(flat_params(model), flat_params(twin), 1e-9, f"cross-entropy momentum step ({space} space)")
    assert opt.last_diagnostics.solve_space == space


class _BatchChosen:
    """A rule that sets alpha from the system before the solve and never re-evaluates."""

    measures_gain_ratio = False

    def __init__(self, alpha: float):
        self.alpha, self.systems, self.seen = alpha, [], []

    def choose_alpha(self, alpha, system, lam):
        self.systems.append((alpha, system))
        return self.alpha

    def update(self, alpha, gain_ratio, diagnostics):
        self.seen.append((alpha, gain_ratio))
        return DampingDecision(0.123, True)


@pytest.mark.parametrize("engine", ["reference", "auto"])
def test_rule_chooses_alpha_before_the_solve_without_reevaluation(engine):
    name, build, shape, k, b = CASES[1]
    model = build().double()
    x, y = torch.randn(b, *shape, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)
    rule = _BatchChosen(2.5)
    expected, _ = dense_spring(model, [(x, y)], 0.9, 2.5, 0.0)
    jac = dense_jacobian(model, x)
    calls = []
    opt = GramGaussNewton(model, lam=0.9, alpha=0.4, engine=engine, adaptive_damping=rule, momentum=0.0, metric=None)
    opt.step(lambda: calls.append(1) or model(x) - y)
    assert_close(flat_params(model), expected[0], RTOL, "step with the rule's alpha")
    assert len(calls) == 1, "the batch was re-evaluated"
    assert rule.systems[0][0] == 0.4 and rule.seen == [(2.5, None)]
    assert_close(rule.systems[0][1].gram, jac @ jac.T, RTOL, "the Gram the rule saw")
    d = opt.last_diagnostics
    assert (d.alpha, d.gain_ratio, d.loss_after, opt.param_groups[0]["alpha"]) == (2.5, None, None, 0.123)


def test_rule_choosing_an_invalid_alpha_changes_nothing():
    model = _small_mlp().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, adaptive_damping=_BatchChosen(-1.0), lam=1.0, momentum=0.0)
    before = flat_params(model)
    with pytest.raises(ValueError, match="alpha"):
        opt.step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before) and not opt.state


def test_step_after_two_rejections_restarts_momentum():
    # raising alpha never shrinks mu * phi_{t-1}: a momentum step that keeps failing would be
    # retried and rejected forever, so after two rejections in a row the next step starts from
    # phi_{t-1} = 0 (each rejected step leaves parameters and phi as they were; after a single
    # rejection the next step continues from phi, as the test above checks)
    torch.manual_seed(0)
    model = _small_mlp().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    opt = GramGaussNewton(
        model, lam=2.0, alpha=0.3, momentum=0.8, adaptive_damping=_Scripted([True, False, False, True]), metric=None
    )
    opt.step(lambda: model(x) - y)
    phi = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    before = flat_params(model)
    for _ in range(2):
        opt.step(lambda: model(x) - y)
        assert opt.last_diagnostics.rejected and torch.equal(flat_params(model), before)
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), phi))
    alpha = opt.param_groups[0]["alpha"]
    expected = before + dense_step(model, x, y, 2.0, alpha)  # the momentum-free step of Eq. 11
    opt.step(lambda: model(x) - y)
    assert_close(flat_params(model), expected, 1e-10, "restarted step")
    assert opt.rejections_in_a_row == 0


@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("bias_correction,bound", [(False, None), (True, None), (False, 0.5), (True, 0.5)])
@pytest.mark.parametrize("name,build,shape,k,b", CASES, ids=[c[0] for c in CASES])
def test_momentum_steps_match_dense_formula(name, build, shape, k, b, engine, bias_correction, bound):
    """The SPRING step over 4 batches against :func:`dense_spring`: with ``bias_correction=False,
    max_step_norm=None`` exactly the formula ``phi_t = mu phi_{t-1} + J^T (lam G + alpha I)^{-1}
    (r - lam mu J phi_{t-1})``; else ``s_t phi_t`` taken and the unscaled ``phi_t`` kept, the bound
    set below the longest unbounded step so that it binds on some steps and not on others."""
    model = build().double()
    batches = _batches(shape, k, b, count=4)
    lam, alpha, mu, wd = 0.7, 0.3, 0.8, 1e-3
    max_step_norm = None
    if bound is not None:
        free, _ = dense_spring(model, batches, lam, alpha, mu, wd, bias_correction)
        starts = [flat_params(model)] + free[:-1]
        lengths = [float(((1 - wd) * w0 - w1).norm()) for w0, w1 in zip(starts, free)]
        max_step_norm = bound * (min(lengths) + max(lengths))  # binds on the long steps only
        assert min(lengths) < max_step_norm < max(lengths), (name, lengths)
    expected, phi = dense_spring(model, batches, lam, alpha, mu, wd, bias_correction, max_step_norm)
    opt = GramGaussNewton(
        model,
        lam=lam,
        alpha=alpha,
        momentum=mu,
        weight_decay=wd,
        engine=engine,
        solve_space="sample",
        adaptive_damping=False,
        bias_correction=bias_correction,
        max_step_norm=max_step_norm,
    )
    for t, (x, y) in enumerate(batches):
        opt.step(lambda: model(x) - y)
        assert_close(flat_params(model), expected[t], RTOL, f"{name} parameters after step {t + 1}")
    buffers = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    assert_close(buffers, phi, RTOL, f"{name} momentum buffer")


def test_scaled_step_keeps_the_gain_ratio_exact_and_restarts_the_count():
    """A linear model: the scaled step's predicted decrease is its true decrease (gain ratio 1),
    the step length is the bound; after two rejections the bias correction restarts at t = 1."""
    model = nn.Linear(6, 1, dtype=torch.float64)
    x, y = torch.randn(4, 6, dtype=torch.float64), 10 * torch.randn(4, 1, dtype=torch.float64)
    rule = _Scripted([True, True, False, False, True])
    opt = GramGaussNewton(
        model, lam=2.0, alpha=0.5, momentum=0.6, adaptive_damping=rule, bias_correction=True, max_step_norm=0.05
    )
    before = flat_params(model)
    opt.step(lambda: model(x) - y)
    d = opt.last_diagnostics
    assert d.gain_ratio == pytest.approx(1.0, abs=1e-9)
    assert d.predicted_decrease == pytest.approx(d.loss_before - d.loss_after, rel=1e-9)
    assert d.step_norm == pytest.approx(0.05, rel=1e-12)
    assert float((flat_params(model) - before).norm()) == pytest.approx(0.05, rel=1e-12)
    opt.step(lambda: model(x) - y)
    assert float(opt.state[model.weight]["momentum_count"]) == 2
    opt.step(lambda: model(x) - y)
    opt.step(lambda: model(x) - y)  # two rejections: count and phi unchanged
    assert float(opt.state[model.weight]["momentum_count"]) == 2
    opt.step(lambda: model(x) - y)  # restarts from phi = 0
    assert float(opt.state[model.weight]["momentum_count"]) == 1


def assert_resumed_steps_are_identical(options: dict, case: tuple = CASES[2]) -> None:
    """Two steps with ``options``, the state saved with ``torch.save`` and loaded into a fresh
    optimizer with ``torch.load(..., weights_only=True)``: the next two steps of both are equal
    bit for bit."""
    name, build, shape, k, b = case
    model = build().double()
    batches = _batches(shape, k, b, count=4)
    opt = GramGaussNewton(model, **options)
    for x, y in batches[:2]:
        opt.step(lambda: model(x) - y)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = GramGaussNewton(twin, **options)
    twin_opt.load_state_dict(torch.load(saved, weights_only=True))
    for x, y in batches[2:]:
        opt.step(lambda: model(x) - y)
        twin_opt.step(lambda: twin(x) - y)
        assert_same_run(flat_params(model), flat_params(twin), name)


def test_state_dict_round_trip_with_bias_correction_gives_identical_steps():
    assert_resumed_steps_are_identical(
        dict(lam=0.9, alpha=0.4, momentum=0.6, adaptive_damping=False, bias_correction=True)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_step_norm=0.0),
        dict(max_step_norm=-1.0),
        dict(max_step_norm=float("inf")),
        dict(max_step_norm=float("nan")),
        dict(max_step_norm=True),
        dict(max_step_norm="1"),
        dict(bias_correction=1),
    ],
)
def test_invalid_step_scaling_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        GramGaussNewton(_small_mlp(), **kwargs)


@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("mu,bias_correction,bound", [(0.0, False, None), (0.7, True, 0.5)], ids=["eq11", "spring"])
def test_lr_scales_the_step_taken_and_the_decay(engine, mu, bias_correction, bound):
    """``lr`` multiplies the step taken and the decay, ``w <- (1 - lr wd) w - lr s_t phi_t``, the
    recursion keeping the unscaled ``phi_t``: three steps against the dense formula (float64)."""
    name, build, shape, k, b = CASES[1]
    model = build().double()
    batches = _batches(shape, k, b)
    options = dict(bias_correction=bias_correction, max_step_norm=bound)
    opt = GramGaussNewton(
        model,
        lam=0.8,
        alpha=0.3,
        momentum=mu,
        weight_decay=0.1,
        lr=0.4,
        engine=engine,
        adaptive_damping=False,
        **options,
    )
    expected, _ = dense_spring(model, batches, 0.8, 0.3, mu, 0.1, bias_correction, bound, lr=0.4)
    for (x, y), want in zip(batches, expected):
        opt.step(lambda: model(x) - y)
        assert_close(flat_params(model), want, 1e-10, f"{name}, lr 0.4")


def test_lr_schedulers_drive_the_step():
    """``torch.optim.lr_scheduler`` reads and writes ``param_groups[i]["lr"]``: a scheduler's
    halving halves the next step (no momentum, fixed ``alpha``), ``ReduceLROnPlateau`` attaches,
    and a state_dict without ``lr`` (saved before it existed) loads as ``lr = 1``."""
    name, build, shape, k, b = CASES[1]
    model = build().double()
    ((x, y),) = _batches(shape, k, b, count=1)
    opt = GramGaussNewton(model, lam=0.8, alpha=0.3, momentum=0.0, adaptive_damping=False)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5
    before = flat_params(model)
    expected = before + 0.5 * dense_step(model, x, y, 0.8, 0.3)
    opt.step(lambda: model(x) - y)
    assert_close(flat_params(model), expected, 1e-10, "after StepLR's halving")
    torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5).step(1.0)
    old = opt.state_dict()
    del old["param_groups"][0]["lr"]
    twin = GramGaussNewton(copy.deepcopy(model), momentum=0.0, adaptive_damping=False)
    twin.load_state_dict(old)
    twin.step(lambda: twin.model(x) - y)
    assert twin.param_groups[0]["lr"] == 1.0


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf"), True, "1", 20.0])
def test_bad_lr_is_refused_and_changes_nothing(lr):
    model = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="Invalid lr"):
        GramGaussNewton(model, lr=lr, weight_decay=0.1)
    opt = GramGaussNewton(model, weight_decay=0.1)
    opt.param_groups[0]["lr"] = lr  # as a scheduler or a user would set it
    before = flat_params(model)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before)


@pytest.mark.parametrize("change", ["unfreeze", "add_param_group"])
def test_a_parameter_new_to_the_steps_starts_from_zero_momentum(change):
    """A parameter that joins the steps (unfrozen, or added by ``add_param_group``) enters the
    recursion with ``phi_{t-1} = 0`` while the others keep theirs: the step equals
    ``phi_t = mu phi_{t-1} + J^T (lam G + alpha I)^{-1} (r - lam mu J phi_{t-1})`` with that
    ``phi_{t-1}`` (float64). Unfrozen, its own ``phi`` from before it was frozen was reused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    ((x, y),) = _batches((3,), 2, 16, count=1)
    lam, alpha, mu = 0.7, 0.2, 0.9
    if change == "unfreeze":
        opt = GramGaussNewton(model, lam=lam, alpha=alpha, momentum=mu, adaptive_damping=False)
        opt.step(lambda: model(x) - y)  # the last weight gets a phi, then is frozen for two steps
        model[2].weight.requires_grad_(False)
        for _ in range(2):
            opt.step(lambda: model(x) - y)
        model[2].weight.requires_grad_(True)
    else:
        head = list(model[2].parameters())
        opt = GramGaussNewton(list(model[0].parameters()), lam=lam, alpha=alpha, momentum=mu, adaptive_damping=False)
        for _ in range(2):
            opt.step(lambda: model(x) - y)
        opt.add_param_group({"params": head})
    joined = [model[2].weight] if change == "unfreeze" else list(model[2].parameters())
    previous = torch.cat(
        [
            torch.zeros(p.numel(), dtype=torch.float64)
            if any(p is q for q in joined)
            else opt.state[p]["momentum_buffer"].reshape(-1)
            for p in model.parameters()
        ]
    )
    jac = dense_jacobian(model, x)
    with torch.no_grad():
        r = (model(x) - y).reshape(-1)
    mat = lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
    phi = mu * previous + jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ previous)
    expected = flat_params(model) - phi
    opt.step(lambda: model(x) - y)
    assert_close(flat_params(model), expected, 1e-10, f"{change}: the step after it joined")
