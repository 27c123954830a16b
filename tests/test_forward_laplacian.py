"""The forward Laplacian (Taylor-mode input derivatives of an MLP) through the hooks engine.

Ground truth: input derivatives by ``torch.func`` (``jacrev``, ``hessian``) of the eager model,
and the dense float64 Jacobian of the whole residual function by ``torch.func.jacrev`` over the
parameters, with the Laplacian by ``torch.func.hessian`` (no code shared with the forward
propagation under test).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from dense import assert_close
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from gramnewton import GramGaussNewton, forward_laplacian, pinn
from gramnewton.engines import HooksEngine

RTOL = 1e-10


def mlp(d: int, widths: tuple[int, ...], activation: type = nn.Tanh, outputs: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for n_in, n_out in zip((d, *widths), widths):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], outputs)).double()


def func_derivatives(model: nn.Module, x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``u (n, k)``, ``grad u (n, d, k)``, ``Laplace u (n, k)`` by ``torch.func`` per point."""

    def u(xi: Tensor) -> Tensor:
        return model(xi.unsqueeze(0)).squeeze(0)

    grad = vmap(jacrev(u))(x).transpose(1, 2)  # (n, k, d) -> (n, d, k)
    hess = vmap(hessian(u))(x)  # (n, k, d, d)
    lap = torch.diagonal(hess, dim1=2, dim2=3)[..., dims].sum(-1)
    return model(x), grad, lap


ARCHITECTURES = {
    "2d-tanh": (2, (16, 16), nn.Tanh, 1, None),
    "5d-tanh": (5, (12, 10, 8), nn.Tanh, 1, None),
    "3d-sigmoid-2-outputs": (3, (9, 7), nn.Sigmoid, 2, None),
    "2d-sin-time-space": (2, (11,), forward_laplacian.Sin, 1, [1]),
    "4d-identity-tanh": (4, (6,), nn.Identity, 1, [0, 2]),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_forward_laplacian_matches_torch_func(name):
    d, widths, activation, k, dims = ARCHITECTURES[name]
    model = mlp(d, widths, activation, k)
    if activation is nn.Identity:  # a linear-then-tanh stack: Identity and Tanh in one model
        model = nn.Sequential(*model[:-1], nn.Linear(widths[-1], 5), nn.Tanh(), nn.Linear(5, k)).double()
    x = torch.randn(13, d, dtype=torch.float64)
    t = pinn.ForwardLaplacian(model, dims)(x)
    value, grad, lap = func_derivatives(model, x, list(range(d)) if dims is None else dims)
    assert t.value.shape == (13, k) and t.gradient.shape == (13, d, k) and t.laplacian.shape == (13, k)
    assert_close(t.value, value, 1e-13, f"{name} value")
    assert_close(t.gradient, grad, 1e-12, f"{name} gradient")
    assert_close(t.laplacian, lap, 1e-12, f"{name} Laplacian")


def poisson_parts(d: int, n_in: int = 11, n_bd: int = 5, weight: float = 3.0):
    """``-Laplace u = f`` in the unit cube, ``u = g`` on its boundary; ``(forward, dense)`` parts:
    the forward-Laplacian part functions and the per-point ``torch.func`` ones, same points."""
    x_in = pinn.sample_interior(n_in, [0] * d, [1] * d)
    x_bd = pinn.sample_boundary(n_bd, [0] * d, [1] * d)

    def f(x: Tensor) -> Tensor:
        return math.pi**2 * torch.cos(math.pi * x).sum(-1)

    def g(x: Tensor) -> Tensor:
        return torch.cos(math.pi * x).sum(-1)

    forward = ((lambda t, x: -t.laplacian[:, 0] - f(x), x_in), (lambda t, x: t.value[:, 0] - g(x), x_bd, weight))
    dense = ((lambda u, x: -torch.trace(hessian(u)(x)) - f(x), x_in), (lambda u, x: u(x) - g(x), x_bd, weight))
    return forward, dense


def heat_parts(d: int = 2, n_in: int = 9, n_init: int = 5):
    """``u_t - u_xx = 0`` in ``z = (t, x)`` with ``u(0, x) = sin(pi x)`` (weight 10)."""
    z_in = pinn.sample_interior(n_in, [0, 0], [1, 1])
    z_init = torch.stack([torch.zeros(n_init, dtype=torch.float64), torch.rand(n_init, dtype=torch.float64)], 1)
    forward = (
        (lambda t, z: t.gradient[:, 0, 0] - t.laplacian[:, 0], z_in),
        (lambda t, z: t.value[:, 0] - torch.sin(math.pi * z[:, 1]), z_init, 10.0),
    )
    dense = (
        (lambda u, z: jacrev(u)(z)[0] - hessian(u)(z)[1, 1], z_in),
        (lambda u, z: u(z) - torch.sin(math.pi * z[1]), z_init, 10.0),
    )
    return forward, dense


def dense_rows(model: nn.Module, parts) -> tuple[Tensor, Tensor]:
    """Residuals ``(b,)`` and Jacobian ``(b, m)`` of the weighted parts by ``jacrev`` of the whole
    residual function over the parameters."""
    names, params = zip(*model.named_parameters())

    def residuals(*ps: Tensor) -> Tensor:
        def u(xi: Tensor) -> Tensor:
            return functional_call(model, dict(zip(names, ps)), (xi.unsqueeze(0),)).reshape(())

        rows = []
        for fn, x, *weight in parts:
            scale = math.sqrt((weight[0] if weight else 1.0) / x.shape[0])
            rows.append(scale * torch.stack([fn(u, xi) for xi in x]))
        return torch.cat(rows)

    jac = jacrev(residuals, argnums=tuple(range(len(params))))(*params)
    return residuals(*params).detach(), torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


PROBLEMS = {
    "poisson-2d": (lambda: poisson_parts(2), 2, (16, 16), None),
    "poisson-5d": (lambda: poisson_parts(5), 5, (12, 10, 8), None),
    "heat": (heat_parts, 2, (10, 10), [1]),
}


def check_system(model: nn.Module, closure, forward_parts, dense_parts, what: str) -> None:
    """``engine="auto"`` is the hooks engine, routes nothing, warns nothing, and its Gram system
    is the dense one."""
    r, jac = dense_rows(model, dense_parts)
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, adaptive_damping=False, momentum=0.0)
    assert isinstance(opt.engine, HooksEngine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a routing warning would mean the slow reference engine
        system = opt.engine.compute(closure)
    assert opt.engine.reference_reasons == {}
    assert_close(system.residuals.reshape(-1), r, RTOL, f"{what} residuals")
    assert_close(system.gram, jac @ jac.T, RTOL, f"{what} Gram")
    v = torch.randn(jac.shape[0], dtype=torch.float64)
    assert_close(torch.cat([t.reshape(-1) for t in system.jt_times(v)]), jac.T @ v, RTOL, f"{what} J^T v")
    w = [torch.randn_like(p) for p in model.parameters()]
    assert_close(system.j_times(w), jac @ torch.cat([t.reshape(-1) for t in w]), RTOL, f"{what} J w")
    assert_close(system.jacobian_columns(0, jac.shape[1]), jac, RTOL, f"{what} dense J")


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_auto_engine_is_the_exact_hooks_engine_on_a_taylor_residual(problem):
    build, d, widths, dims = PROBLEMS[problem]
    model = mlp(d, widths)
    forward_parts, dense_parts = build()
    check_system(model, pinn.taylor_residual(model, *forward_parts, dims=dims), forward_parts, dense_parts, problem)


def _linear_bias_on_every_channel(layer, value, derivatives):
    out = layer(torch.cat([value.unsqueeze(1), derivatives], 1))
    return out[:, 0], out[:, 1:]


def _tanh_without_curvature(z, t):
    return 1 - t * t, torch.zeros_like(t)


@pytest.mark.parametrize(
    "mutant", [("_linear", _linear_bias_on_every_channel), ("ACTIVATIONS", {nn.Tanh: _tanh_without_curvature})]
)
def test_a_wrong_propagation_fails_the_check(monkeypatch, mutant):
    """The checks above are not vacuous: a bias added to the derivative channels, or the
    ``s''(z) |grad z|^2`` term dropped, gives residuals and a Gram matrix far from the dense ones."""
    monkeypatch.setattr(forward_laplacian, *mutant)
    model = mlp(2, (16, 16))
    forward_parts, dense_parts = poisson_parts(2)
    with pytest.raises(AssertionError, match="relative error"):
        check_system(model, pinn.taylor_residual(model, *forward_parts), forward_parts, dense_parts, "mutant")


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_optimizer_step_on_a_taylor_residual_is_the_dense_formula(momentum):
    """Two steps of ``GramGaussNewton(model)`` (momentum: SPRING's ``J phi`` term) against the
    explicit formula on the dense Jacobian."""
    model = mlp(3, (10, 8))
    forward_parts, dense_parts = poisson_parts(3, n_in=9, n_bd=6)
    lam, alpha = 1.0, 1e-4
    opt = GramGaussNewton(model, lam=lam, alpha=alpha, momentum=momentum, adaptive_damping=False)
    closure = pinn.taylor_residual(model, *forward_parts)
    phi = None
    for step in range(2):
        r, jac = dense_rows(model, dense_parts)
        rhs = r if phi is None else r - momentum * jac @ phi
        expected = jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype), rhs)
        phi = expected if phi is None else momentum * phi + expected
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step(closure)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert_close(before - after, phi, 1e-9, f"step {step}")


def test_bad_models_points_and_parts_are_refused():
    with pytest.raises(ValueError, match="ReLU"):
        pinn.ForwardLaplacian(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="starts with an nn.Linear"):
        pinn.ForwardLaplacian(nn.Sequential(nn.Tanh(), nn.Linear(2, 1)))
    model = mlp(2, (4,))
    with pytest.raises(ValueError, match="dims"):
        pinn.ForwardLaplacian(model, dims=[2])
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        pinn.ForwardLaplacian(model)(torch.rand(3, 3, dtype=torch.float64))
    x = torch.rand(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one part"):
        pinn.taylor_residual(model)
    with pytest.raises(ValueError, match="positive"):
        pinn.taylor_residual(model, (lambda t, x: t.value, x, -1.0))
    with pytest.raises(ValueError, match="takes 2 coordinates"):
        pinn.taylor_residual(model, (lambda t, x: t.value, x), (lambda t, x: t.value, torch.rand(3, 3)))
    closure = pinn.taylor_residual(model, (lambda t, x: t.value[:, 0], x), (lambda t, x: t.gradient[:, :, 0], x))
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, adaptive_damping=False, momentum=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="same number of outputs"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
