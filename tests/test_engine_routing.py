"""Routing of the hooks engine: which parameter each step's Gram takes from which engine.

Every case compares ``engine.compute(closure)`` (Gram, ``J^T v``, ``J v``) with the dense
float64 Jacobian of the closure's residuals, one autograd row per residual (exact), over the
engine's own ``params`` (a parameter the residuals do not use has zero columns). Cases change the
model after the engine was built, as a training script may (a weight tied or replaced after the
optimizer was made): the engine must route what it can no longer see, or stay exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from dense import autograd_rows, seeded
from torch import Tensor, nn
from torch.func import functional_call

from gramnewton.engines import HooksEngine
from gramnewton.engines.select import select_engine

D = torch.float64
RTOL = 1e-10


def assert_exact(engine: HooksEngine, closure: Callable[[], Tensor]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routing warns once; exactness is what is checked
        system = engine.compute(closure)
    jac = autograd_rows(engine.params, closure)
    gen = seeded(1)
    v = torch.randn(jac.shape[0], dtype=D, generator=gen)
    u = [torch.randn(p.shape, dtype=D, generator=gen) for p in engine.params]
    pairs = {
        "gram": (system.gram, jac @ jac.T),
        "J^T v": (torch.cat([t.reshape(-1) for t in system.jt_times(v)]), jac.T @ v),
        "J v": (system.j_times(u), jac @ torch.cat([t.reshape(-1) for t in u])),
    }
    for what, (got, want) in pairs.items():
        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
        assert rel < RTOL, f"{what}: relative error {rel:.3g}"


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)


def test_a_parameter_replaced_on_its_module_after_the_engine_was_built() -> None:
    """``model[2].weight = nn.Parameter(...)`` after the optimizer was made: the engine's (and the
    optimizer's) tensor is the old one, which the residuals no longer use (zero rows). Before,
    the hooks took the module's rows for the old tensor (Gram 5.5% off, no warning)."""
    model = mlp()
    x = torch.randn(5, 3, dtype=D)
    engine = select_engine(list(model.parameters()), model, "auto")
    assert isinstance(engine, HooksEngine)
    assert_exact(engine, lambda: model(x))
    model[2].weight = nn.Parameter(torch.randn(2, 4, dtype=D))
    assert_exact(engine, lambda: model(x))


def test_a_weight_tied_after_the_engine_was_built() -> None:
    """``b.weight = a.weight`` after the engine was built: ``b``'s old weight is unused, ``a``'s
    is used by two modules. Before, the old weight got ``b``'s rows (Gram 43% off, though a
    warning routed ``a.weight``)."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Two().to(D)
    x = torch.randn(5, 3, dtype=D)
    engine = select_engine(list(model.parameters()), model, "auto")
    assert_exact(engine, lambda: model(x))
    model.b.weight = model.a.weight
    assert_exact(engine, lambda: model(x))


@pytest.mark.parametrize("name", ["auto", "hooks", "reference"])
def test_a_model_cast_to_float64_after_the_engine_was_built(name: str) -> None:
    """``model.double()`` after the optimizer was made (the same parameter tensors, cast in
    place): the engine follows the parameters' dtype. Before, every engine had read it once when
    built and refused the float64 residuals ("the parameters are torch.float32")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    engine = select_engine(list(model.parameters()), model, name)
    engine.compute(lambda: model(x))
    model.double()
    assert_exact(engine, lambda: model(x.double()))


def test_a_closure_that_mixes_samples_from_its_third_forward_on() -> None:
    """The closure subtracts a mean over the outputs for two steps, then over the batch: the same
    node types, and the signature held only those, so the 3rd forward (no row check there) used
    the cached verdict (rows are samples): Gram 100% off, no warning. The signature now holds each
    node's reduction dimension too."""
    model = mlp()
    x = torch.randn(5, 3, dtype=D)
    engine = select_engine(list(model.parameters()), model, "auto")
    for dim in (1, 1, 0):

        def closure(dim: int = dim) -> Tensor:
            h = model(x)
            return h - h.mean(dim, keepdim=True)

        assert_exact(engine, closure)


def test_a_module_called_with_another_models_parameters() -> None:
    """``torch.func.functional_call(model, other.named_parameters(), x)``: the module runs with
    tensors that are not the engine's, which the residuals do not depend on (zero rows). Before,
    the hooks took the calls' rows for the model's own parameters: a Gram of a network the
    residuals do not depend on, no warning."""
    model, other = mlp(), mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    x = torch.randn(5, 3, dtype=D)
    engine = select_engine(list(model.parameters()), model, "auto")

    def closure() -> Tensor:
        return functional_call(model, dict(other.named_parameters()), (x,))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        system = engine.compute(closure)
    assert float(system.gram.abs().max()) == 0.0
    assert all(float(t.abs().max()) == 0.0 for t in system.jt_times(torch.ones(10, dtype=D)))
