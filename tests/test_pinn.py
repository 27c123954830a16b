"""Residuals with derivatives of the network w.r.t. its inputs (physics-informed residuals).

Ground truth everywhere: the dense float64 Jacobian of the residual *function* by
``torch.func.jacrev`` over the parameters, with the input derivatives taken by ``torch.func``
too, so the reference shares no code with the engines under test.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from dense import assert_close, cpu_only, seeded
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from gramnewton import GramGaussNewton, full_batch_step, pinn
from gramnewton.engines import FunctionalEngine, FunctionalResidual, HooksEngine, ReferenceEngine, Term

RTOL = 1e-10


def mlp(d: int = 2, width: int = 16, depth: int = 2) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).double()


def source(x: Tensor) -> Tensor:
    """``f = -Laplace u*`` for ``u* = prod_i sin(pi x_i)``."""
    return x.shape[-1] * math.pi**2 * torch.sin(math.pi * x).prod(-1)


def autograd_poisson_closure(model: nn.Module, x: Tensor) -> Tensor:
    """``-Laplace u - f`` with the Laplacian by ``torch.autograd.grad(create_graph=True)``, ``(b,)``."""
    x = x.detach().requires_grad_(True)
    u = model(x).squeeze(-1)
    (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    return -lap - source(x)


def func_poisson_closure(model: nn.Module, x: Tensor) -> Tensor:
    """The same residual with the Laplacian by ``torch.func.hessian`` on the eager model, ``(b,)``."""

    def u(xi: Tensor) -> Tensor:
        return model(xi.unsqueeze(0)).squeeze()

    return -vmap(lambda xi: torch.trace(hessian(u)(xi)))(x) - source(x)


def dense_poisson_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """``(b, m)`` Jacobian of ``-Laplace u(x_i) - f(x_i)`` by ``torch.func`` only."""
    names, params = zip(*model.named_parameters())

    def residuals(*ps: Tensor) -> Tensor:
        def u(xi: Tensor) -> Tensor:
            return functional_call(model, dict(zip(names, ps)), (xi.unsqueeze(0),)).squeeze()

        lap = vmap(lambda xi: torch.trace(hessian(u)(xi)))(x)
        return -lap - source(x)

    jac = jacrev(residuals, argnums=tuple(range(len(params))))(*params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


@pytest.mark.parametrize("closure", [autograd_poisson_closure, func_poisson_closure])
@pytest.mark.parametrize("depth", [1, 2])
def test_auto_engine_is_exact_for_a_laplacian_residual(depth, closure):
    """Issue 11 item 1: the hooks engine returned a Gram with relative error 0.9 here, silently."""
    model = mlp(depth=depth)
    x = torch.rand(12, 2, dtype=torch.float64)
    jac = dense_poisson_jacobian(model, x)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, adaptive_damping=False, momentum=0.0)
    assert isinstance(opt.engine, HooksEngine)
    with pytest.warns(UserWarning, match="input derivative"):
        system = opt.engine.compute(lambda: closure(model, x))
    assert_close(system.gram, jac @ jac.T, RTOL, "Gram of an autograd Laplacian residual")
    v = torch.randn(12, dtype=torch.float64)
    jt_v = torch.cat([t.reshape(-1) for t in system.jt_times(v)])
    assert_close(jt_v, jac.T @ v, RTOL, "J^T v of an autograd Laplacian residual")
    u = [torch.randn_like(p) for p in model.parameters()]
    assert_close(system.j_times(u), jac @ torch.cat([t.reshape(-1) for t in u]), RTOL, "J u, autograd Laplacian")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time warning: the second step is silent
        opt.engine.compute(lambda: closure(model, x))


def test_reference_engine_is_exact_for_an_autograd_laplacian():
    model = mlp()
    x = torch.rand(7, 2, dtype=torch.float64)
    jac = dense_poisson_jacobian(model, x)
    system = ReferenceEngine(list(model.parameters())).compute(lambda: autograd_poisson_closure(model, x))
    assert_close(system.gram, jac @ jac.T, RTOL, "reference Gram")


# ---- the functional engine and gramnewton.pinn ----------------------------------------------


def poisson_parts(model: nn.Module, n_in: int = 10, n_bd: int = 6, weight: float = 3.0):
    """2-D Poisson, ``-Laplace u = f`` inside, ``u = 0`` on the boundary of the unit square."""
    u = pinn.pointwise(model)
    x_in = pinn.sample_interior(n_in, [0, 0], [1, 1])
    x_bd = pinn.sample_boundary(n_bd, [0, 0], [1, 1])
    interior = (lambda p, x: -pinn.laplacian(lambda y: u(p, y), x) - source(x), x_in)
    boundary = (lambda p, x: u(p, x), x_bd, weight)
    return interior, boundary


def heat_parts(model: nn.Module, n_in: int = 9, n_init: int = 5, n_bd: int = 4):
    """1-D heat equation in ``z = (t, x)``: ``u_t - u_xx = 0``, ``u(0, x) = sin(pi x)``, ``u(t, 0) = u(t, 1) = 0``."""
    u = pinn.pointwise(model)

    def pde(p, z):
        def v(y):
            return u(p, y)

        return pinn.gradient(v, z)[0] - pinn.laplacian(v, z, dims=[1])

    z_in = pinn.sample_interior(n_in, [0, 0], [1, 1])
    z_init = torch.stack([torch.zeros(n_init, dtype=torch.float64), torch.rand(n_init, dtype=torch.float64)], 1)
    z_bd = torch.stack([torch.rand(n_bd, dtype=torch.float64), (torch.arange(n_bd) % 2).double()], 1)
    return (
        (pde, z_in),
        (lambda p, z: u(p, z) - torch.sin(math.pi * z[1]), z_init, 10.0),
        (lambda p, z: u(p, z), z_bd, 2.0),
    )


def dense_rows(model: nn.Module, parts) -> tuple[Tensor, Tensor]:
    """Residuals ``(b,)`` and ``(b, m)`` Jacobian of the weighted parts, by ``jacrev`` of the whole
    batch at once (no per-sample ``vmap`` of a Jacobian, unlike the engine)."""
    names, params = zip(*model.named_parameters())

    def residuals(*ps: Tensor) -> Tensor:
        p = dict(zip(names, ps))
        rows = []
        for fn, x, *weight in parts:
            scale = math.sqrt((weight[0] if weight else 1.0) / x.shape[0])
            rows.append(scale * torch.stack([fn(p, xi) for xi in x]))
        return torch.cat(rows)

    jac = jacrev(residuals, argnums=tuple(range(len(params))))(*params)
    return residuals(*params).detach(), torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


PROBLEMS = {"poisson": (poisson_parts, 2), "heat": (heat_parts, 2)}


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_functional_engine_matches_dense_jacrev(problem, chunk):
    build, d = PROBLEMS[problem]
    model = mlp(d=d)
    parts = build(model)
    r, jac = dense_rows(model, parts)
    closure = pinn.residual(dict(model.named_parameters()), *parts)
    system = FunctionalEngine(list(model.parameters()), chunk_size=chunk).compute(closure)
    assert_close(system.residuals.reshape(-1), r, RTOL, f"{problem} residuals")
    assert_close(system.gram, jac @ jac.T, RTOL, f"{problem} Gram")
    v = torch.randn(jac.shape[0], dtype=torch.float64)
    jt_v = torch.cat([t.reshape(-1) for t in system.jt_times(v)])
    assert_close(jt_v, jac.T @ v, RTOL, f"{problem} J^T v")
    u = [torch.randn_like(p) for p in model.parameters()]
    assert_close(system.j_times(u), jac @ torch.cat([t.reshape(-1) for t in u]), RTOL, f"{problem} J u")
    assert_close(system.jacobian_columns(0, jac.shape[1]), jac, RTOL, f"{problem} dense J")
    assert_close(closure().reshape(-1), r, RTOL, f"{problem} residuals of the eager closure")


@pytest.mark.parametrize("engine", ["auto", "reference", "functional"])
def test_every_engine_takes_the_step_of_the_dense_formula(engine):
    """The same weighted Poisson residual through GramGaussNewton: Eq. 11 by the explicit formula."""
    model = mlp()
    parts = poisson_parts(model)
    r, jac = dense_rows(model, parts)
    lam, alpha = 1.0, 1e-3
    expected = -jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype), r)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = GramGaussNewton(model, lam=lam, alpha=alpha, engine=engine, adaptive_damping=False, momentum=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto: the routing warning, tested above
        opt.step(pinn.residual(dict(model.named_parameters()), *parts))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert_close(after - before, expected, 1e-9, f"{engine} step")


def test_functional_engine_leaves_out_the_gram_of_a_parameter_space_step():
    """More than twice as many rows as parameters: ``"auto"`` solves in parameter space, which needs
    only ``J``; the functional engine (and its reference fall-back) then skips ``J J^T``, and the
    step is Eq. 11's."""
    model = mlp(width=4, depth=1)
    m = sum(p.numel() for p in model.parameters())
    parts = poisson_parts(model, n_in=2 * m + 7, n_bd=8)  # a float64 J: the QR's rule, rows > 2 m
    r, jac = dense_rows(model, parts)
    lam, alpha = 1.0, 1e-3
    expected = -jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype), r)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = GramGaussNewton(model, lam=lam, alpha=alpha, engine="functional", adaptive_damping=False, momentum=0.0)
    opt.step(pinn.residual(dict(model.named_parameters()), *parts))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert opt.last_diagnostics.solve_space == "parameter" and opt.last_step.gram is None
    assert_close(after - before, expected, 1e-9, "parameter-space step")
    x = torch.rand(8, 2, dtype=torch.float64)
    engine = FunctionalEngine(list(model.parameters()))
    with pytest.warns(UserWarning, match="reference engine"):  # a plain closure: the fall-back
        system = engine.compute(lambda: autograd_poisson_closure(model, x), form_gram=lambda rows: False)
    assert system.gram is None and system.jacobian_columns(0, m).shape == (8, m)


def test_functional_engine_refuses_parameters_the_closure_lacks():
    """A parameter the residual does not name may still be reached by its function (a learned PDE
    coefficient captured by the closure): its columns cannot be formed, so the system is refused
    (it was given zero columns); a parameter no residual uses is left out of the optimizer."""
    model = mlp()
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    parts = poisson_parts(model)
    with pytest.raises(ValueError, match=r"1 trained parameter\(s\) of shapes \[\(3,\)\] are not among"):
        FunctionalEngine([*model.parameters(), extra]).compute(pinn.residual(dict(model.named_parameters()), *parts))


def test_functional_engine_routes_a_plain_closure_to_the_reference_engine():
    model = mlp()
    x = torch.rand(8, 2, dtype=torch.float64)
    jac = dense_poisson_jacobian(model, x)
    engine = FunctionalEngine(list(model.parameters()))
    with pytest.warns(UserWarning, match="reference engine"):
        system = engine.compute(lambda: autograd_poisson_closure(model, x))
    assert_close(system.gram, jac @ jac.T, RTOL, "fallback Gram")


def test_functional_engine_refuses_non_finite_residuals_and_changes_nothing():
    model = mlp()
    x = pinn.sample_interior(5, [0, 0], [1, 1])
    closure = pinn.residual(dict(model.named_parameters()), (lambda p, xi: pinn.pointwise(model)(p, xi) / 0.0, x))
    before = [p.detach().clone() for p in model.parameters()]
    opt = GramGaussNewton(model, engine="functional", lam=1.0, adaptive_damping=False, momentum=0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_term_and_residual_validate_their_arguments():
    x = torch.rand(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="dimension 0"):
        Term(lambda p, a, b: a, (x, torch.rand(3, 2)))
    with pytest.raises(ValueError, match="at least one Term"):
        FunctionalResidual({})
    with pytest.raises(ValueError, match="positive"):
        pinn.residual({}, (lambda p, xi: xi.sum(), x, 0.0))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        pinn.residual({}, (lambda p, xi: xi.sum(), x[0]))
    with pytest.raises(ValueError, match="chunk_size"):
        FunctionalEngine([], chunk_size=0)


def test_sampling_with_a_generator_draws_on_its_device_whatever_the_default_device():
    """``sample_interior``/``sample_boundary`` with a CPU generator under another default device
    (``torch.set_default_device("cuda")``, here ``meta``): the points on the generator's device,
    the same as under the CPU default (was: torch refused the CPU generator's draw on the
    default device, "Expected a 'cuda' device type for generator", seen on a GPU)."""
    low, high = [0.0, -1.0], [1.0, 2.0]
    want = [
        sample(7, low, high, generator=torch.Generator().manual_seed(3))
        for sample in (pinn.sample_interior, pinn.sample_boundary)
    ]
    with torch.device("meta"):
        got = [
            sample(7, low, high, generator=torch.Generator().manual_seed(3))
            for sample in (pinn.sample_interior, pinn.sample_boundary)
        ]
    for g, w in zip(got, want):
        assert g.device.type == "cpu" and torch.equal(g, w)


def test_sampling_stays_in_the_box_and_on_its_faces():
    low, high = [0.0, -1.0, 2.0], [1.0, 1.0, 2.5]
    lo, hi = torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64)
    inside = pinn.sample_interior(500, low, high)
    assert inside.shape == (500, 3) and bool(((inside >= lo) & (inside <= hi)).all())
    edge = pinn.sample_boundary(2000, low, high)
    on_face = (edge == lo) | (edge == hi)
    assert bool(((edge >= lo) & (edge <= hi)).all()) and bool((on_face.sum(1) >= 1).all())
    # faces chosen in proportion to their areas: normal to x0: 2*0.5, to x1: 1*0.5, to x2: 1*2
    share = on_face.double().mean(0) / on_face.double().mean(0).sum()
    assert torch.allclose(share, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64) / 3.5, atol=0.05)
    with pytest.raises(ValueError, match="low < high"):
        pinn.sample_interior(3, [0.0, 1.0], [1.0, 1.0])


def test_derivative_helpers_and_relative_error():
    def u(x):
        return torch.sin(x[0]) * torch.cos(2 * x[1]) + x[2] ** 3

    x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    s, c = math.sin(0.3), math.cos(-1.4)
    expected = torch.tensor([math.cos(0.3) * c, -2 * s * math.sin(-1.4), 3 * 1.1**2], dtype=torch.float64)
    assert_close(pinn.gradient(u, x), expected, 1e-14, "gradient")
    assert abs(float(pinn.laplacian(u, x)) - (-s * c - 4 * s * c + 6 * 1.1)) < 1e-13
    assert abs(float(pinn.laplacian(u, x, dims=[2])) - 6 * 1.1) < 1e-13
    exact = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert pinn.relative_l2(exact + torch.tensor([0.3, -0.4], dtype=torch.float64), exact) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shape"):
        pinn.relative_l2(exact, exact[:1])


@cpu_only("examples/poisson.py runs on the CPU: its points come from CPU generators")
@pytest.mark.parametrize(("form", "momentum"), [("taylor", 0.0), ("taylor", 0.3), ("functional", 0.0)])
def test_example_line_search_ggn_solves_a_small_poisson_problem(form, momentum):
    """``examples/poisson.py``'s ENGD-W / SPRING-style optimizer on both residual forms (forward
    Laplacian with the hooks engine, ``torch.func`` with the functional engine): in 60 steps the
    loss falls by eight orders of magnitude and the relative L2 error below 1e-3 (a wrong
    direction, step length or momentum would not).

    ``alpha = 1e-8``, not the example's 1e-10: on this small problem (129 parameters, 200 points)
    the 1e-10 damping lets rounding steer the path. Seeds 0-3 at 1 thread end at ratios 5e-12 to
    1.1e-7 with 1e-10 (two forms of the same residual differ by 100x), 1.6e-12 to 1.3e-9 with 1e-8
    (both forms agree to two digits; 2 threads the same)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from poisson import PROBLEMS, LineSearchGGN, make_error, make_model, make_residual

    problem = PROBLEMS[2][0]
    model = make_model(2, (32,), seed=0)
    residual = make_residual(model, problem, 150, 50, seeded(0), form)
    error = make_error(model, problem, n_eval=500)
    opt = LineSearchGGN(model, alpha=1e-8, momentum=momentum, form=form)
    losses = [float(opt.step(residual)) for _ in range(60)]
    assert losses[-1] < 1e-8 * losses[0]
    assert error() < 1e-3


@pytest.mark.parametrize(
    "engine",
    [
        # torch.func.hessian under torch.device("meta") with a CUDA default device fails inside
        # PyTorch (aten::detach_ of a captured tensor in its standard basis) before it calls u
        pytest.param("functional", marks=cpu_only("torch.func.hessian under a meta device over a CUDA default")),
        "hooks_laplacian",
        "full_batch",
    ],
)
def test_pinn_steps_follow_the_model_not_torchs_default_device(engine: str) -> None:
    """As ``test_reliability.py::test_a_step_follows_the_model_not_torchs_default_device``, for the
    physics-informed paths: the functional engine, the hooks engine on an autograd Laplacian (its
    parameters reach the reference engine), and ``full_batch_step`` at ``alpha = 0`` (the SVD)."""
    torch.manual_seed(0)
    model = mlp()
    x = torch.rand(12, 2, dtype=torch.float64)
    if engine == "functional":
        u = pinn.pointwise(model)
        parts = [(lambda p, xi: -pinn.laplacian(lambda y: u(p, y), xi) - source(xi), x)]
        closure = pinn.residual(dict(model.named_parameters()), *parts)
    else:
        closure = lambda: autograd_poisson_closure(model, x)  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    home = torch.get_default_device().type  # the model's: the CPU, or the tests' default device
    with torch.device("meta"):
        if engine == "full_batch":
            full_batch_step(model.parameters(), closure)
        else:
            opt = GramGaussNewton(model, engine="functional" if engine == "functional" else "auto")
            for _ in range(2):
                opt.step(closure)
    assert all(p.device.type == home and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("options", [{}, {"geodesic_acceleration": True}], ids=["defaults", "acceleration"])
def test_re_evaluations_of_an_autograd_laplacian_closure(options: dict) -> None:
    """The gain ratio's re-evaluation and the acceleration's point along the step run the closure
    for values, without autograd; a closure taking ``torch.autograd.grad`` of the network raised
    there ("element 0 of tensors does not require grad"), so ``GramGaussNewton(model)`` failed on
    its first re-evaluated step. It is now run again with autograd."""
    torch.manual_seed(0)
    model = mlp()
    x = torch.rand(24, 2, dtype=torch.float64)
    opt = GramGaussNewton(model, **options)
    closure = lambda: autograd_poisson_closure(model, x)  # noqa: E731
    first = float(closure().pow(2).mean())
    measured = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the routing warning of the autograd Laplacian
        for _ in range(6):
            opt.step(closure)
            measured += opt.last_diagnostics.gain_ratio is not None
    assert measured > 0
    assert float(closure().pow(2).mean()) < first
