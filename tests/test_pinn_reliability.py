"""Reliability of the physics-informed paths: exact or refused, and bad input loses nothing.

Every Gram system is checked in float64 against the dense Jacobian of the whole weighted
residual *function* by ``torch.func.jacrev`` over the parameters, with the input derivatives by
``torch.func.jacrev`` / ``torch.func.hessian`` of the eager model (no code shared with the
forward Laplacian or the functional engine under test). Each refusal test failed on the code
before its fix (the old behaviour is in its docstring).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from dense import assert_close, assert_same_run, cpu_only
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from gramnewton import GramGaussNewton, pinn
from gramnewton.engines import FunctionalEngine, HooksEngine

RTOL = 1e-10
F64 = torch.float64

# A dense part: (fn(u, x) -> (k,) for one point with u(x) -> (k,), points (n, d), weight).
DensePart = tuple[Callable[[Callable[[Tensor], Tensor], Tensor], Tensor], Tensor, float]


def mlp(d: int, widths: tuple[int, ...], activation: Callable[[], nn.Module], k: int = 1, bias: bool = True):
    layers: list[nn.Module] = []
    for n_in, n_out in zip((d, *widths), widths):
        layers += [nn.Linear(n_in, n_out, bias=bias), activation()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], k, bias=bias)).double()


def dense_rows(model: nn.Module, parts: list[DensePart]) -> tuple[Tensor, Tensor]:
    """Residuals ``(b*k,)`` and Jacobian ``(b*k, m)`` (trainable parameters in order) of the parts,
    each row scaled by ``sqrt(weight / n)``, by ``jacrev`` of the whole residual function.

    On a deep copy of ``model``: ``functional_call`` leaves a module called at two places holding
    the substituted tensors (torch 2.13), which must not happen to the model under test."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    model = copy.deepcopy(model)

    def residuals(*ps: Tensor) -> Tensor:
        def u(xi: Tensor) -> Tensor:
            return functional_call(model, dict(zip(names, ps)), (xi.unsqueeze(0),)).reshape(-1)

        rows = [math.sqrt(w / x.shape[0]) * torch.stack([fn(u, xi).reshape(-1) for xi in x]) for fn, x, w in parts]
        return torch.cat(rows).reshape(-1)

    detached = [p.detach() for p in params]
    jac = jacrev(residuals, argnums=tuple(range(len(params))))(*detached)
    return residuals(*detached), torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def dense_laplacian(u: Callable[[Tensor], Tensor], x: Tensor, dims: list[int] | None = None) -> Tensor:
    """``(k,)`` Laplacian over ``dims`` of ``u`` at one point by ``torch.func.hessian``."""
    diagonal = torch.diagonal(hessian(u)(x), dim1=-2, dim2=-1)  # (k, d)
    return diagonal.sum(-1) if dims is None else diagonal[:, dims].sum(-1)


def check_against_dense(model: nn.Module, system, parts: list[DensePart], what: str) -> None:
    """Residuals, Gram, ``J^T v`` and ``J w`` of an engine's system equal the dense ones."""
    r, jac = dense_rows(model, parts)
    assert_close(system.residuals.reshape(-1), r, RTOL, f"{what} residuals")
    assert_close(system.gram, jac @ jac.T, RTOL, f"{what} Gram")
    v = torch.randn(jac.shape[0], dtype=F64)
    assert_close(torch.cat([t.reshape(-1) for t in system.jt_times(v)]), jac.T @ v, RTOL, f"{what} J^T v")
    w = [torch.randn_like(p) for p in model.parameters() if p.requires_grad]
    assert_close(system.j_times(w), jac @ torch.cat([t.reshape(-1) for t in w]), RTOL, f"{what} J w")


def shared_layer_model() -> nn.Sequential:
    """One Linear called twice (weights shared between two positions of the stack)."""
    shared = nn.Linear(7, 7)
    return nn.Sequential(nn.Linear(2, 7), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(7, 1)).double()


def tied_model() -> nn.Sequential:
    """Two Linear modules holding the same weight Parameter."""
    a, b = nn.Linear(7, 7), nn.Linear(7, 7)
    b.weight = a.weight
    return nn.Sequential(nn.Linear(2, 7), nn.Tanh(), a, nn.Sigmoid(), b, nn.Tanh(), nn.Linear(7, 1)).double()


def frozen_unused_model() -> nn.Sequential:
    """First weight frozen, and a parameter the forward pass never reads (a zero column of J)."""
    model = mlp(2, (8, 6), nn.Tanh)
    model[0].weight.requires_grad_(False)
    model.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=F64)))
    return model


def weight_normed_model() -> nn.Sequential:
    model = mlp(2, (8,), nn.Tanh)
    nn.utils.parametrizations.weight_norm(model[0])
    return model


def mixed_activation_model() -> nn.Sequential:
    """SiLU, Sin and a Softplus whose threshold falls inside the data (both of its zones used)."""
    return nn.Sequential(
        nn.Linear(6, 9),
        nn.SiLU(),
        nn.Linear(9, 7),
        pinn.Sin(),
        nn.Linear(7, 5),
        nn.Softplus(beta=2.0, threshold=0.5),
        nn.Linear(5, 1),
    ).double()


# name -> (model builder, d, k, Laplacian dims)
TAYLOR_MODELS = {
    "tanh-3d-deep": (lambda: mlp(3, (9, 8, 7), nn.Tanh), 3, 1, None),
    "sigmoid-4d-nobias": (lambda: mlp(4, (10,), nn.Sigmoid, bias=False), 4, 1, None),
    "sin-1d-wide": (lambda: mlp(1, (24,), pinn.Sin), 1, 1, None),
    "tanh-2d-2-outputs": (lambda: mlp(2, (8, 8), nn.Tanh, k=2), 2, 2, None),
    "tanh-3d-space-dims": (lambda: mlp(3, (9,), nn.Tanh), 3, 1, [1, 2]),
    "softplus-2d": (lambda: mlp(2, (8, 8), nn.Softplus), 2, 1, None),
    "softplus-beta-threshold-2d": (lambda: mlp(2, (8,), lambda: nn.Softplus(beta=3.0, threshold=1.0)), 2, 1, None),
    "silu-3d": (lambda: mlp(3, (8, 6), nn.SiLU), 3, 1, None),
    "shared-layer": (shared_layer_model, 2, 1, None),
    "tied-weights": (tied_model, 2, 1, None),
    "frozen-and-unused": (frozen_unused_model, 2, 1, None),
    "weight-norm": (weight_normed_model, 2, 1, None),
    "mixed-activations-6d": (mixed_activation_model, 6, 1, None),
    "ends-with-tanh": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Tanh()).double(),
        3,
        1,
        None,
    ),
}


def taylor_and_dense_parts(d: int, k: int, dims: list[int] | None):
    """A residual using the input gradient AND the Laplacian (interior), a weighted boundary
    term and a third weighted term, in both forms on the same points."""
    x_in = pinn.sample_interior(8, [0.0] * d, [1.0] * d) * 3 - 1  # spread into softplus's linear zone too
    x_bd = pinn.sample_boundary(5, [0.0] * d, [1.0] * d)
    x_gr = pinn.sample_interior(3, [0.0] * d, [1.0] * d)
    dense_dims = list(range(d)) if dims is None else dims

    def f(x: Tensor) -> Tensor:
        return torch.cos(x).sum(-1, keepdim=True)

    taylor = [
        (lambda t, x: -t.laplacian + t.gradient[:, 0] * t.value - f(x), x_in, 1.0),
        (lambda t, x: t.value - f(x), x_bd, 10.0),
        (lambda t, x: (t.gradient**2).sum(1), x_gr, 0.3),
    ]
    dense = [
        (lambda u, x: -dense_laplacian(u, x, dense_dims) + jacrev(u)(x)[:, 0] * u(x) - f(x), x_in, 1.0),
        (lambda u, x: u(x) - f(x), x_bd, 10.0),
        (lambda u, x: (jacrev(u)(x) ** 2).sum(-1), x_gr, 0.3),
    ]
    return taylor, dense


@pytest.mark.parametrize("name", sorted(TAYLOR_MODELS))
def test_forward_laplacian_through_the_auto_engine_is_the_dense_gram_system(name):
    """``engine="auto"`` on a ``taylor_residual`` equals the dense system on every architecture
    (activations, widths, depths, input dimensions, biases off, several outputs, shared and tied
    weights, a frozen and an unused parameter, a weight-normalised layer), with weighted interior,
    boundary and gradient terms, and routes nothing."""
    build, d, k, dims = TAYLOR_MODELS[name]
    model = build()
    taylor, dense = taylor_and_dense_parts(d, k, dims)
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, adaptive_damping=False, momentum=0.0)
    assert isinstance(opt.engine, HooksEngine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own "batching rule" notes (weight_norm)
        system = opt.engine.compute(pinn.taylor_residual(model, *taylor, dims=dims))
    assert opt.engine.reference_reasons == {}
    check_against_dense(model, system, dense, name)


# name -> (model builder, d)
FUNCTIONAL_MODELS = {
    "tanh-2d": (lambda: mlp(2, (8, 8), nn.Tanh), 2),
    "softplus-3d-nobias": (lambda: mlp(3, (6,), nn.Softplus, bias=False), 3),
    "sin-1d-deep": (lambda: mlp(1, (5, 5, 5), pinn.Sin), 1),
    "sigmoid-4d": (lambda: mlp(4, (7,), nn.Sigmoid), 4),
    "shared-layer": (shared_layer_model, 2),
    "tied-weights": (tied_model, 2),
    "frozen-and-unused": (frozen_unused_model, 2),
    "weight-norm": (weight_normed_model, 2),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL_MODELS))
def test_functional_engine_is_the_dense_gram_system(name):
    """``engine="functional"`` on ``pinn.residual`` (gradient + Laplacian interior term, weighted
    boundary term) equals the dense system, in chunks smaller than a term."""
    build, d = FUNCTIONAL_MODELS[name]
    model = build()
    u = pinn.pointwise(model)
    x_in, x_bd = pinn.sample_interior(7, [0.0] * d, [1.0] * d), pinn.sample_boundary(4, [0.0] * d, [1.0] * d)

    def interior(p, x):
        point = lambda y: u(p, y)  # noqa: E731
        return -pinn.laplacian(point, x) + (pinn.gradient(point, x) ** 2).sum() - x.sum()

    closure = pinn.residual(dict(model.named_parameters()), (interior, x_in), (lambda p, x: u(p, x), x_bd, 5.0))
    dense = [
        (lambda v, x: -dense_laplacian(v, x) + (jacrev(v)(x) ** 2).sum() - x.sum(), x_in, 1.0),
        (lambda v, x: v(x), x_bd, 5.0),
    ]
    engine = FunctionalEngine([p for p in model.parameters() if p.requires_grad], chunk_size=3)
    check_against_dense(model, engine.compute(closure), dense, name)


def test_taylor_residual_follows_points_resampled_in_place():
    """Resampling the collocation points in place (``x.copy_(new)``) between steps.

    Was: the network saw the points copied when the closure was built while the part's function
    saw the new ones, a silently wrong residual (max difference 0.03 on this problem)."""
    model = mlp(2, (8,), nn.Tanh)
    x_in, x_bd = pinn.sample_interior(6, [0, 0], [1, 1]), pinn.sample_boundary(4, [0, 0], [1, 1])
    taylor, dense = (
        [(lambda t, x: -t.laplacian[:, 0] - x.sum(-1), x_in), (lambda t, x: t.value[:, 0] - x[:, 0], x_bd, 4.0)],
        [(lambda u, x: -dense_laplacian(u, x) - x.sum(), x_in, 1.0), (lambda u, x: u(x) - x[0], x_bd, 4.0)],
    )
    closure = pinn.taylor_residual(model, *taylor)
    x_in.copy_(pinn.sample_interior(6, [0, 0], [1, 1]))
    x_bd.copy_(pinn.sample_boundary(4, [0, 0], [1, 1]))
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, adaptive_damping=False, momentum=0.0)
    check_against_dense(model, opt.engine.compute(closure), dense, "resampled in place")


class InputScaled(nn.Sequential):
    """A Sequential whose forward maps ``[0, 1]`` to ``[-1, 1]`` before the layers."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(2 * x - 1)


class SquaredLinear(nn.Linear):
    """A Linear subclass whose forward is not affine."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) ** 2


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    return (2 * args[0] - 1,)


def _double_output(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    return 2 * out


def _hooked(module: nn.Sequential, where: str) -> nn.Sequential:
    if where == "model-pre-hook":
        module.register_forward_pre_hook(_scale_input)
    elif where == "model-hook":
        module.register_forward_hook(_double_output)
    else:
        module[1].register_forward_hook(_double_output)
    return module


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: InputScaled(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double(), id="own-forward"),
        pytest.param(
            lambda: nn.Sequential(SquaredLinear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double(), id="linear-forward"
        ),
        pytest.param(lambda: _hooked(mlp(2, (6,), nn.Tanh), "model-pre-hook"), id="model-pre-hook"),
        pytest.param(lambda: _hooked(mlp(2, (6,), nn.Tanh), "model-hook"), id="model-hook"),
        pytest.param(lambda: _hooked(mlp(2, (6,), nn.Tanh), "activation-hook"), id="activation-hook"),
    ],
)
def test_forward_laplacian_refuses_a_model_it_would_not_follow(build):
    """A Sequential subclass with its own ``forward``, a Linear subclass with a non-affine
    ``forward``, or a forward (pre-)hook on the model or an activation: ``model(x)`` is not what
    the layer-by-layer propagation computes.

    Was: accepted; the forward Laplacian's value differed from ``model(x)`` by 0.11 (own forward),
    0.43 (pre-hook), and the Gram matrix by 0.31 relative (squared Linear), silently."""
    model = build()
    x = pinn.sample_interior(4, [0, 0], [1, 1])
    with pytest.raises(ValueError, match="ForwardLaplacian"):
        pinn.ForwardLaplacian(model)(x)
    with pytest.raises(ValueError, match="ForwardLaplacian"):
        pinn.taylor_residual(model, (lambda t, p: t.value, x))()


def test_forward_laplacian_checks_its_layers_when_called():
    """A layer swapped after the ForwardLaplacian was built. Was: ``KeyError: <class 'ReLU'>``."""
    model = mlp(2, (6,), nn.Tanh)
    taylor = pinn.ForwardLaplacian(model)
    model[1] = nn.ReLU()
    with pytest.raises(ValueError, match="ReLU"):
        taylor(pinn.sample_interior(3, [0, 0], [1, 1]))


def test_mixed_dtypes_are_refused_with_a_clear_message():
    """float32 points for a float64 model (and the reverse). Was: torch's ``RuntimeError: mat1
    and mat2 must have the same dtype`` from inside the first step."""
    model = mlp(2, (6,), nn.Tanh)
    x32 = pinn.sample_interior(4, [0, 0], [1, 1], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"points are torch.float32 but the model's parameters are torch.float64"):
        pinn.taylor_residual(model, (lambda t, x: t.value, x32))
    with pytest.raises(ValueError, match=r"points are torch.float32 but the model's parameters are torch.float64"):
        pinn.ForwardLaplacian(model)(x32)
    with pytest.raises(ValueError, match=r"points are torch.float64 but the model's parameters are torch.float32"):
        pinn.taylor_residual(model.float(), (lambda t, x: t.value, x32.double()))


def _bad_parts(x: Tensor) -> list[tuple[str, tuple, str]]:
    nan_points, inf_points = x.clone(), x.clone()
    nan_points[1, 0], inf_points[0, 1] = float("nan"), float("inf")

    def fn(*args):
        return args[0]

    return [
        ("nan-points", (fn, nan_points), "NaN or Inf"),
        ("inf-points", (fn, inf_points), "NaN or Inf"),
        ("inf-weight", (fn, x, float("inf")), "finite"),
        ("nan-weight", (fn, x, float("nan")), "finite"),
        ("per-point-weights", (fn, x, torch.ones(x.shape[0])), "one number"),
        ("list-points", (fn, x.tolist()), "a tensor"),
        ("integer-points", (fn, x.long()), "floating"),
    ]


@pytest.mark.parametrize("builder", ["taylor", "functional"])
@pytest.mark.parametrize("case", range(7))
def test_bad_parts_are_refused_when_the_closure_is_built(builder, case):
    """NaN/Inf points, a non-finite weight, per-point weights, points given as a list or as
    integers. Was: accepted, then a NonFiniteError at the step (non-finite points/weight), or
    ``TypeError``/``AttributeError``/``RuntimeError`` from deep inside (the others)."""
    model = mlp(2, (6,), nn.Tanh)
    x = pinn.sample_interior(4, [0, 0], [1, 1])
    name, part, message = _bad_parts(x)[case]
    with pytest.raises(ValueError, match=message):
        if builder == "taylor":
            pinn.taylor_residual(model, part)
        else:
            pinn.residual(dict(model.named_parameters()), part)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda t, x: t.laplacian.mean(), "a scalar"),
        (lambda t, x: t.laplacian[:2, 0], "2 rows for 5 points"),
    ],
)
def test_a_part_function_of_the_wrong_shape_is_refused_and_changes_nothing(fn, message):
    """A part that reduces over its points (``.mean()``). Was: ``IndexError: tuple index out of
    range`` from the closure."""
    model = mlp(2, (6,), nn.Tanh)
    closure = pinn.taylor_residual(model, (fn, pinn.sample_interior(5, [0, 0], [1, 1])))
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, adaptive_damping=False, momentum=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_laplacian_helper_refuses_repeated_or_missing_coordinates():
    """``pinn.laplacian(u, x, dims=[1, 1])``. Was: ``2 u_yy``, silently (and ``dims=[]`` gave 0)."""

    def u(x: Tensor) -> Tensor:
        return x[0] ** 2 + 3 * x[1] ** 2

    x = torch.tensor([0.5, 0.25], dtype=F64)
    assert float(pinn.laplacian(u, x, dims=[1])) == pytest.approx(6.0)
    for dims in ([1, 1], [], [2], [-1]):
        with pytest.raises(ValueError, match="dims"):
            pinn.laplacian(u, x, dims=dims)


@pytest.mark.parametrize("sampler", [pinn.sample_interior, pinn.sample_boundary])
@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_samplers_refuse_a_count_that_is_not_positive(sampler, n):
    """Was: ``sample_interior(0, ...)`` returned an empty set (refused later by the closure),
    ``sample_boundary(0, ...)`` raised torch's ``cannot sample n_sample <= 0 samples``."""
    with pytest.raises(ValueError, match="positive"):
        sampler(n, [0, 0], [1, 1])


def test_an_optimizer_step_on_every_weighted_term_is_the_dense_formula():
    """Two steps of ``GramGaussNewton`` (momentum 0.5) on a softplus model with gradient,
    Laplacian, boundary and third terms, against ``-J^T (lam J J^T + alpha I)^{-1} r`` on the
    dense Jacobian (SPRING's momentum term ``J phi`` included)."""
    model = mlp(2, (7, 5), nn.Softplus)
    taylor, dense = taylor_and_dense_parts(2, 1, None)
    lam, alpha, momentum = 1.0, 1e-2, 0.5  # alpha 1e-4: condition 1e15 at step 1, rounding only
    opt = GramGaussNewton(model, lam=lam, alpha=alpha, momentum=momentum, adaptive_damping=False)
    closure, phi = pinn.taylor_residual(model, *taylor), None
    for step in range(2):
        r, jac = dense_rows(model, dense)
        rhs = r if phi is None else r - momentum * jac @ phi
        expected = jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=F64), rhs)
        phi = expected if phi is None else momentum * phi + expected
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.step(closure)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert_close(before - after, phi, 1e-9, f"step {step}")


def test_functional_engine_steps_leave_a_shared_layer_the_models_own():
    """A Linear called twice in the model, trained with ``pinn.residual`` and the functional
    engine, then ``state_dict`` round trip.

    Was: ``functional_call`` (default ``tie_weights=True``) inside ``pinn.pointwise`` left the
    shared layer holding the engine's substituted tensors after the first step: its weight and
    bias were no longer Parameters, no longer the optimizer's, and a new optimizer of
    ``model.parameters()`` saw them as frozen (``requires_grad=False``)."""
    model = shared_layer_model()
    originals = list(model.parameters())
    u = pinn.pointwise(model)
    x_in, x_bd = pinn.sample_interior(6, [0, 0], [1, 1]), pinn.sample_boundary(4, [0, 0], [1, 1])
    closure = pinn.residual(
        dict(model.named_parameters()),
        (lambda p, x: -pinn.laplacian(lambda y: u(p, y), x) - 1.0, x_in),
        (lambda p, x: u(p, x), x_bd, 10.0),
    )
    dense = [(lambda v, x: -dense_laplacian(v, x) - 1.0, x_in, 1.0), (lambda v, x: v(x), x_bd, 10.0)]
    lam, alpha = 1.0, 1e-2
    opt = GramGaussNewton(model, engine="functional", lam=lam, alpha=alpha, momentum=0.0, adaptive_damping=False)
    for step in range(2):
        r, jac = dense_rows(model, dense)
        expected = jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=F64), r)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.step(closure)
        assert [type(p) for p in model.parameters()] == [nn.Parameter] * len(originals)
        assert all(p is q for p, q in zip(model.parameters(), originals)), "the model's parameters were replaced"
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert_close(before - after, expected, 1e-9, f"step {step}")
    copy_ = shared_layer_model()
    copy_.load_state_dict(model.state_dict())
    x = pinn.sample_interior(5, [0, 0], [1, 1])
    assert_same_run(copy_(x), model(x))


@pytest.mark.parametrize("build", [shared_layer_model, tied_model])
def test_functional_engine_differentiates_every_alias_of_a_trained_parameter(build):
    """``pinn.residual(dict(model.named_parameters(remove_duplicate=False)), ...)`` names a shared
    or tied weight twice. Was: ``functional_call got multiple values for keys ['2.weight',
    '4.weight'], which are tied`` (and, with the slot-wise call of ``pinn.pointwise`` alone, a Gram
    matrix 0.47 / 0.33 relative off: the second name held a detached copy)."""
    model = build()
    u = pinn.pointwise(model)
    x_in, x_bd = pinn.sample_interior(6, [0, 0], [1, 1]), pinn.sample_boundary(3, [0, 0], [1, 1])
    closure = pinn.residual(
        dict(model.named_parameters(remove_duplicate=False)),
        (lambda p, x: -pinn.laplacian(lambda y: u(p, y), x), x_in),
        (lambda p, x: u(p, x), x_bd, 2.0),
    )
    dense = [(lambda v, x: -dense_laplacian(v, x), x_in, 1.0), (lambda v, x: v(x), x_bd, 2.0)]
    check_against_dense(model, FunctionalEngine(list(model.parameters())).compute(closure), dense, build.__name__)


@pytest.mark.parametrize("points", [torch.rand(5, 3, dtype=F64), torch.rand(5, 2, 1, dtype=F64)])
def test_pointwise_refuses_points_of_the_wrong_width(points):
    """3-D points for a model of 2-D inputs through ``pinn.residual``. Was: torch's
    ``RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 2x6)`` from inside vmap."""
    model = mlp(2, (6,), nn.Tanh)
    u = pinn.pointwise(model)
    closure = pinn.residual(dict(model.named_parameters()), (lambda p, x: u(p, x), points.reshape(5, -1)))
    if points.dim() == 3:  # a (d, 1) point given to u directly
        with pytest.raises(ValueError, match=r"one point of shape \(2,\)"):
            u(dict(model.named_parameters()), points[0])
        return
    opt = GramGaussNewton(model, engine="functional", alpha=1e-3, adaptive_damping=False)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"one point of shape \(2,\), got \(3,\)"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_taylor_part_that_also_takes_an_autograd_input_gradient_is_routed_and_exact():
    """A part adding ``torch.autograd.grad`` of the value w.r.t. the points to the forward
    Laplacian: the double-backward path bypasses the Linear outputs, so the hooks engine routes
    those parameters to the reference engine (with its warning) and the Gram matrix stays exact."""
    model = mlp(2, (8,), nn.Tanh)
    x = pinn.sample_interior(6, [0, 0], [1, 1]).requires_grad_(True)

    def fn(t, points):
        (g,) = torch.autograd.grad(t.value.sum(), points, create_graph=True)
        return t.laplacian[:, 0] + (g**2).sum(1)

    dense = [(lambda u, p: dense_laplacian(u, p) + (jacrev(u)(p) ** 2).sum(), x.detach(), 1.0)]
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, adaptive_damping=False, momentum=0.0)
    with pytest.warns(UserWarning, match="reference engine"):
        system = opt.engine.compute(pinn.taylor_residual(model, (fn, x)))
    check_against_dense(model, system, dense, "autograd gradient + forward Laplacian")


@cpu_only("benchmarks/pinn.py is a script run, its generators on the CPU")
def test_benchmark_run_with_out_leaves_the_docs_figure_alone(tmp_path, monkeypatch):
    """``benchmarks/pinn.py --out X`` (a smoke run). Was: the figure still went to
    ``docs/figures/pinn_2d.png``, overwriting the committed one."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    figure = root / "docs" / "figures" / "pinn_2d.png"
    stamp = figure.stat().st_mtime_ns if figure.exists() else None
    spec = importlib.util.spec_from_file_location("pinn_benchmark", root / "benchmarks" / "pinn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "smoke.json"
    argv = ["pinn.py", "--problem", "2d", "--seconds", "0.3", "--seeds", "0", "--methods", "ggn", "--adam-lrs"]
    monkeypatch.setattr(sys, "argv", [*argv, "--eval-every", "0.2", "--out", str(out)])
    module.main()
    assert out.exists() and out.with_suffix(".png").exists()
    assert (figure.stat().st_mtime_ns if figure.exists() else None) == stamp


@pytest.mark.parametrize("form", ["taylor", "functional"])
def test_a_state_dict_round_trip_resumes_the_same_steps(form, tmp_path):
    """Two steps, save model and optimizer (momentum, adaptive damping), two more; a fresh model
    and optimizer loaded from the files take the same two steps bit for bit."""

    def setup() -> tuple[nn.Module, GramGaussNewton, Callable]:
        torch.manual_seed(0)
        model = mlp(2, (8,), nn.Tanh)
        x_in, x_bd = pinn.sample_interior(10, [0, 0], [1, 1]), pinn.sample_boundary(4, [0, 0], [1, 1])
        if form == "taylor":
            closure = pinn.taylor_residual(
                model, (lambda t, x: -t.laplacian[:, 0] - 1, x_in), (lambda t, x: t.value[:, 0], x_bd, 3.0)
            )
        else:
            u = pinn.pointwise(model)
            closure = pinn.residual(
                dict(model.named_parameters()),
                (lambda p, x: -pinn.laplacian(lambda y: u(p, y), x) - 1, x_in),
                (lambda p, x: u(p, x), x_bd, 3.0),
            )
        engine = "auto" if form == "taylor" else "functional"
        return model, GramGaussNewton(model, engine=engine, alpha=1e-3, momentum=0.5, adaptive_damping=True), closure

    model, opt, closure = setup()
    for _ in range(2):
        opt.step(closure)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "state.pt")
    for _ in range(2):
        opt.step(closure)
    model2, opt2, closure2 = setup()
    saved = torch.load(tmp_path / "state.pt")
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(2):
        opt2.step(closure2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert_same_run(a, b)


def _softplus_without_linear_zone(layer: nn.Module):
    beta = float(layer.beta)

    def derivatives(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        sig = torch.sigmoid(beta * z)
        return sig, beta * sig * (1 - sig)

    return derivatives


def test_the_softplus_check_is_not_vacuous(monkeypatch):
    """Softplus derivatives that ignore torch's linear zone (``beta z > threshold``) fail the dense
    check on the model whose threshold falls inside the data."""
    from gramnewton import forward_laplacian

    monkeypatch.setitem(forward_laplacian.CONFIGURED, nn.Softplus, _softplus_without_linear_zone)
    with pytest.raises(AssertionError, match="relative error"):
        test_forward_laplacian_through_the_auto_engine_is_the_dense_gram_system("mixed-activations-6d")
