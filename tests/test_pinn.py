"""Residuals with derivatives of the network w.r.t. its inputs (physics-informed residuals).

Ground truth everywhere: the dense float64 Jacobian of the residual *function* by
``torch.func.jacrev`` over the parameters, with the input derivatives taken by ``torch.func``
too, so the reference shares no code with the engines under test.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from dense import assert_close
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from gramnewton import GramGaussNewton
from gramnewton.engines import HooksEngine, ReferenceEngine

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
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1)
    assert isinstance(opt.engine, HooksEngine)
    with pytest.warns(UserWarning, match="input derivative"):
        system = opt.engine.compute(lambda: closure(model, x))
    assert_close(system.gram, jac @ jac.T, RTOL, "Gram of an autograd Laplacian residual")
    v = torch.randn(12, dtype=torch.float64)
    jt_v = torch.cat([t.reshape(-1) for t in system.jt_times(v)])
    assert_close(jt_v, jac.T @ v, RTOL, "J^T v of an autograd Laplacian residual")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time warning: the second step is silent
        opt.engine.compute(lambda: closure(model, x))


def test_reference_engine_is_exact_for_an_autograd_laplacian():
    model = mlp()
    x = torch.rand(7, 2, dtype=torch.float64)
    jac = dense_poisson_jacobian(model, x)
    system = ReferenceEngine(list(model.parameters())).compute(lambda: autograd_poisson_closure(model, x))
    assert_close(system.gram, jac @ jac.T, RTOL, "reference Gram")
