"""Geodesic acceleration (``geodesic_acceleration=``), checked in float64 against the dense formula.

With ``phi_t`` the step of the plain optimizer (momentum included), ``v = -phi_t``,
``r_vv = (2/h) ((r(w + h v) - r) / h - J v)``, ``a = -J^T (lam J J^T + alpha I)^{-1} lam r_vv``:
the step taken is ``v + a/2`` when ``2 ||a|| / ||v|| <= max_ratio``, else ``v``; the momentum
keeps the step taken.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from dense import assert_close, assert_same_run, dense_jacobian, flat_params
from test_momentum import _batches, _set_flat
from test_optim import CASES
from torch import Tensor, nn

from gramnewton import FunctionalResidual, GeodesicAcceleration, GramGaussNewton, Term
from gramnewton.update import _residuals_along

RTOL = 1e-10


def dense_accelerated(
    model: nn.Module, batches: list, lam: float, alpha: float, mu: float, h: float, max_ratio: float
) -> tuple[list[Tensor], list[float]]:
    """Parameters after each step of the explicit formula, and each step's ``2 ||a|| / ||v||``."""
    model = copy.deepcopy(model)
    phi = torch.zeros_like(flat_params(model))
    trajectory, ratios = [], []
    for x, y in batches:
        jac = dense_jacobian(model, x)
        w = flat_params(model)
        with torch.no_grad():
            r = (model(x) - y).reshape(-1)
        mat = lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
        v = -(mu * phi + jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ phi))
        _set_flat(model, w + h * v)
        with torch.no_grad():
            displaced = (model(x) - y).reshape(-1)
        second = (2 / h) * ((displaced - r) / h - jac @ v)
        a = -jac.T @ torch.linalg.solve(mat, lam * second)
        ratio = float(2 * a.detach().norm() / v.detach().norm())
        step = v + a / 2 if ratio <= max_ratio else v
        phi = -step
        _set_flat(model, w + step)
        trajectory.append(flat_params(model))
        ratios.append(ratio)
    return trajectory, ratios


@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("name,build,shape,k,b", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mu", [0.0, 0.6])
def test_accelerated_steps_match_dense_formula(name, build, shape, k, b, mu, engine):
    torch.manual_seed(5)
    model = build().double()
    batches = _batches(shape, k, b)
    acceleration = GeodesicAcceleration(step_size=0.3, max_ratio=10.0)  # every acceleration taken
    expected, ratios = dense_accelerated(model, batches, 0.7, 0.4, mu, 0.3, 10.0)
    opt = GramGaussNewton(
        model,
        lam=0.7,
        alpha=0.4,
        momentum=mu,
        engine=engine,
        adaptive_damping=False,
        solve_space="sample",
        geodesic_acceleration=acceleration,
    )
    for (x, y), want, ratio in zip(batches, expected, ratios):
        opt.step(lambda: model(x) - y)
        assert_close(flat_params(model), want, RTOL, f"{name} parameters after an accelerated step")
        assert opt.last_diagnostics.acceleration_ratio == pytest.approx(ratio, rel=1e-8)
    assert any(r > 1e-6 for r in ratios)  # the acceleration changed the steps


@pytest.mark.parametrize("space", ["sample", "parameter"])
def test_parameter_space_acceleration_equals_sample_space(space):
    """More residuals than parameters (``b = 40``, ``m = 21``): both spaces give the dense step."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    batches = _batches((3,), 1, 40)
    expected, _ = dense_accelerated(model, batches, 1.0, 0.05, 0.0, 0.1, 10.0)
    opt = GramGaussNewton(
        model,
        lam=1.0,
        alpha=0.05,
        momentum=0.0,
        adaptive_damping=False,
        solve_space=space,
        geodesic_acceleration=GeodesicAcceleration(max_ratio=10.0),
    )
    for (x, y), want in zip(batches, expected):
        opt.step(lambda: model(x) - y)
        assert opt.last_diagnostics.solve_space == space
        assert_close(flat_params(model), want, RTOL, f"{space}-space accelerated step")


@pytest.mark.parametrize(
    "space,dtype,factorisation",
    [
        ("sample", torch.float64, "cholesky_ex"),
        ("parameter", torch.float64, "geqrf"),  # a float64 J: the QR
        ("parameter", torch.float32, "cholesky_ex"),  # a float32 J: the float64 normal equations
    ],
)
def test_accelerated_step_factorises_its_system_once(space, dtype, factorisation, monkeypatch):
    """The acceleration's solve reuses the factorisation of the step's own system (the same
    matrix): one Cholesky or QR per accelerated step, as a plain step (two before)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    (x, y), *_ = _batches((3,), 1, 40)
    x, y = x.to(dtype), y.to(dtype)
    opt = GramGaussNewton(
        model, lam=1.0, alpha=0.05, momentum=0.0, adaptive_damping=False, solve_space=space, geodesic_acceleration=True
    )
    opt.step(lambda: model(x) - y)  # the first step's one-time checks outside the count
    module = torch.linalg if factorisation == "cholesky_ex" else torch
    original, calls = getattr(module, factorisation), []
    monkeypatch.setattr(module, factorisation, lambda *args: calls.append(1) or original(*args))
    for _ in range(3):
        opt.step(lambda: model(x) - y)
        assert opt.last_diagnostics.acceleration_ratio is not None
    assert opt.last_diagnostics.solve_space == space and len(calls) == 3


def test_functional_engine_accelerated_steps_match_dense_formula():
    """A :class:`FunctionalResidual` closure reads the parameters it is called with, so the
    evaluation along the step sees the displaced ones (the physics-informed residuals' path)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    batches = _batches((2,), 1, 10)
    expected, _ = dense_accelerated(model, batches, 1.0, 0.2, 0.0, 0.1, 10.0)
    params = dict(model.named_parameters())
    opt = GramGaussNewton(
        model,
        lam=1.0,
        alpha=0.2,
        momentum=0.0,
        engine="functional",
        adaptive_damping=False,
        geodesic_acceleration=GeodesicAcceleration(max_ratio=10.0),
    )

    def fn(p, x, y):
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0) - y

    for (x, y), want in zip(batches, expected):
        opt.step(FunctionalResidual(params, Term(fn, (x, y))))
        assert_close(flat_params(model), want, RTOL, "functional-engine accelerated step")


def test_acceleration_over_max_ratio_is_the_plain_step():
    """A refused acceleration leaves the step ``v``: the run equals one without acceleration (to
    round-off: the extra evaluation's allocations may shift MKL's summation order)."""
    name, build, shape, k, b = CASES[1]
    torch.manual_seed(7)
    model = build().double()
    twin = copy.deepcopy(model)
    kwargs = dict(lam=1.0, alpha=0.3, momentum=0.5, adaptive_damping=False)
    opt = GramGaussNewton(model, geodesic_acceleration=GeodesicAcceleration(max_ratio=1e-300), **kwargs)
    plain = GramGaussNewton(twin, **kwargs)
    for x, y in _batches(shape, k, b):
        opt.step(lambda: model(x) - y)
        plain.step(lambda: twin(x) - y)
        assert opt.last_diagnostics.acceleration_ratio > 1e-300
        assert plain.last_diagnostics.acceleration_ratio is None
        assert_close(flat_params(model), flat_params(twin), 1e-12, "step with a refused acceleration")


def test_the_evaluation_along_the_step_restores_the_parameters_bit_for_bit():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    direction = [torch.randn_like(p) for p in params]
    displaced = _residuals_along(params, direction, 0.3, lambda: model(x) - y)
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(twin.parameters(), direction):
            p.add_(d, alpha=0.3)
        assert_same_run(displaced, twin(x) - y)


def test_gain_ratio_judges_the_accelerated_step():
    """With the gain-ratio rule the batch is re-evaluated after the step taken (``v + a/2``)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, momentum=0.0, adaptive_damping=True, geodesic_acceleration=True)
    opt.step(lambda: model(x) - y)
    with torch.no_grad():
        after = float((model(x) - y).pow(2).mean())
    assert not opt.last_diagnostics.rejected
    assert opt.last_diagnostics.loss_after == pytest.approx(after, rel=1e-12)


def test_closure_error_at_the_displaced_point_restores_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, momentum=0.0, adaptive_damping=False, geodesic_acceleration=True)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # the evaluation along the step
            raise RuntimeError("closure failed")
        return model(x) - y

    before = flat_params(model)
    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(closure)
    assert torch.equal(flat_params(model), before)
    assert all(not opt.state[p] for p in model.parameters())


@pytest.mark.parametrize(
    "value,match",
    [
        ("yes", "Invalid geodesic_acceleration"),
        (1, "Invalid geodesic_acceleration"),
    ],
)
def test_bad_geodesic_acceleration_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        GramGaussNewton(nn.Linear(2, 1), geodesic_acceleration=value)


@pytest.mark.parametrize("field", ["step_size", "max_ratio"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_acceleration_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"geodesic acceleration {field}"):
        GeodesicAcceleration(**{field: value})


def test_acceleration_needs_the_square_loss():
    with pytest.raises(ValueError, match="square loss"):
        GramGaussNewton(nn.Linear(2, 3), loss="cross_entropy", geodesic_acceleration=True)


def test_acceleration_is_refused_with_distributed_training():
    with socket.socket() as probe:  # a free port on 127.0.0.1 for a one-process gloo group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="not supported with distributed"):
            GramGaussNewton(nn.Linear(2, 1), distributed="exact", geodesic_acceleration=True)
    finally:
        dist.destroy_process_group()
