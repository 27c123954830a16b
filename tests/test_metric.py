"""The Gram-Gauss-Newton step in a diagonal metric (``gramnewton.metric``).

Every step is checked in float64 against the explicit dense formula built on ``jacrev``, with
the metric written out here independently of the library: ``g = J^T r / b``, ``v <- beta2 v +
(1 - beta2) g^2``, ``s = sqrt(v / (1 - beta2^t))``, ``D = (s + eps mean s)^(-p) / mean(...)``,
``phi_t = mu phi_{t-1} + D J^T (lam J D J^T + alpha I)^{-1} (r - lam mu J phi_{t-1})``,
``w <- w - phi_t``; per tensor ``l``: ``D_l = (sqrt(mean_l s^2) + eps mean s)^(-p)``, normalised
over the entries. The optimizer keeps the root ``sqrt(v)`` (``metric_root_moment``).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from dense import assert_close, assert_same_run, dense_jacobian, flat_params
from test_classification import MODEL_IDS, MODELS, _blockdiag, _blocks, _derivatives, _sum_loss, _top_c_hessian
from test_momentum import _batches, _Scripted, _set_flat, assert_resumed_steps_are_identical
from test_optim import CASES
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.engines import HooksEngine, ReferenceEngine
from gramnewton.metric import SecondMomentMetric, metric_from, metric_system

RTOL = 1e-10
BETA2, EPS = 0.999, 1e-3


def dense_metric(
    moment: Tensor, gradient: Tensor, t: int, power: float, sizes: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """The second moment after ``gradient`` (the ``t``-th) and the metric ``D`` it gives: one
    weight per entry, or with ``sizes`` (the tensors' numbers of entries) one per tensor."""
    moment = BETA2 * moment + (1 - BETA2) * gradient**2
    scale = torch.sqrt(moment / (1 - BETA2**t))
    if sizes is None:
        weight = (scale + EPS * scale.mean()) ** (-power)
    else:
        rms = [float(torch.sqrt(torch.mean(part**2))) for part in scale.split(sizes)]
        weight = torch.cat(
            [scale.new_full((n,), (r + float(EPS * scale.mean())) ** (-power)) for n, r in zip(sizes, rms)]
        )
    return moment, weight / weight.mean()


def dense_metric_steps(
    model: nn.Module,
    batches: list,
    lam: float,
    alpha: float | list[float],
    mu: float,
    power: float,
    per_tensor: bool = False,
) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
    """Parameters after each step of the explicit formula, the last ``phi``, the second moment,
    and each step's ``D``; ``alpha`` one value, or one per step."""
    sizes = [p.numel() for p in model.parameters()] if per_tensor else None
    alphas = alpha if isinstance(alpha, list) else [alpha] * len(batches)
    model = copy.deepcopy(model)
    phi = torch.zeros_like(flat_params(model))
    moment = torch.zeros_like(phi)
    trajectory, metrics = [], []
    for t, (x, y) in enumerate(batches, start=1):
        jac = dense_jacobian(model, x)
        with torch.no_grad():
            r = (model(x) - y).reshape(-1)
        moment, d = dense_metric(moment, jac.T @ r / x.shape[0], t, power, sizes)
        mat = lam * (jac * d) @ jac.T + alphas[t - 1] * torch.eye(jac.shape[0], dtype=jac.dtype)
        phi = mu * phi + d * (jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ phi))
        _set_flat(model, flat_params(model) - phi)
        trajectory.append(flat_params(model))
        metrics.append(d)
    return trajectory, phi, moment, metrics


def _state(opt: GramGaussNewton, model: nn.Module, key: str) -> Tensor:
    return torch.cat([opt.state[p][key].reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_entry", "per_tensor"])
@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("power", [0.5, 1.0])
@pytest.mark.parametrize("name,build,shape,k,b", CASES, ids=[c[0] for c in CASES])
def test_metric_steps_match_dense_formula(name, build, shape, k, b, power, engine, per_tensor):
    """Three momentum steps in the metric against :func:`dense_metric_steps` (the hooks engine's
    rows of linear layers, convolutions, GroupNorm and the Fixup network's scalars, per tensor
    through its weighted Gram; the reference engine's dense ``J``), and the second moment kept in
    the state."""
    model = build().double()
    batches = _batches(shape, k, b)
    lam, alpha, mu = 0.7, 0.3, 0.8
    expected, phi, moment, metrics = dense_metric_steps(model, batches, lam, alpha, mu, power, per_tensor)
    assert all(float(d.detach().max() / d.detach().min()) > 1.5 for d in metrics), (
        "the metric must differ from the Euclidean one"
    )
    opt = GramGaussNewton(
        model,
        lam=lam,
        alpha=alpha,
        momentum=mu,
        engine=engine,
        adaptive_damping=False,
        metric={"name": "second_moment", "power": power, "per_tensor": per_tensor},
    )
    for t, (x, y) in enumerate(batches):
        opt.step(lambda: model(x) - y)
        assert_close(flat_params(model), expected[t], RTOL, f"{name} parameters after step {t + 1}")
    assert_close(_state(opt, model, "momentum_buffer"), phi, RTOL, f"{name} momentum buffer")
    assert_close(_state(opt, model, "metric_root_moment"), moment.sqrt(), RTOL, f"{name} root second moment")
    assert int(opt.state[next(model.parameters())]["metric_count"]) == len(batches)


@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_entry", "per_tensor"])
@pytest.mark.parametrize("engine", [ReferenceEngine, HooksEngine])
@pytest.mark.parametrize("name,build,shape,k,b", CASES, ids=[c[0] for c in CASES])
def test_metric_system_matches_dense(name, build, shape, k, b, engine, per_tensor):
    """``metric_system``'s Gram ``J D J^T``, ``D J^T v`` and plain ``J u``
    against the dense ``J``, for a ``D`` spread over four orders of magnitude (per tensor: one
    value per parameter, the hooks engine's weighted Gram)."""
    model = build().double()
    params = list(model.parameters())
    x, y = _batches(shape, k, b, count=1)[0]
    jac = dense_jacobian(model, x)
    if per_tensor:
        levels = torch.logspace(-2, 2, len(params), dtype=torch.float64)[torch.randperm(len(params))]
        scaling = torch.cat([levels[i].expand(p.numel()) for i, p in enumerate(params)])
    else:
        scaling = torch.logspace(-2, 2, jac.shape[1], dtype=torch.float64)[torch.randperm(jac.shape[1])]
    built = engine(params) if engine is ReferenceEngine else engine(model, params)
    system = built.compute(lambda: model(x) - y, form_gram=lambda rows: False)
    system = metric_system(system, params, scaling, per_tensor=per_tensor)
    assert_close(system.gram, (jac * scaling) @ jac.T, RTOL, f"{name} J D J^T")
    assert_close(system.gram, system.gram.T, 1e-14, f"{name} symmetry")
    v = torch.randn(jac.shape[0], dtype=torch.float64)
    got = torch.cat([t.reshape(-1) for t in system.jt_times(v)])
    assert_close(got, scaling * (jac.T @ v), RTOL, f"{name} D J^T v")
    u = torch.randn(jac.shape[1], dtype=torch.float64)
    chunks = [c.view_as(p) for c, p in zip(u.split([p.numel() for p in params]), params)]
    assert_close(system.j_times(chunks), jac @ u, RTOL, f"{name} J u")
    assert system.jacobian is None and system.jacobian_columns is None  # solved in sample space


@pytest.mark.parametrize("per_tensor", [False, True], ids=["per_entry", "per_tensor"])
@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("curvature", ["exact", "gradient"])
@pytest.mark.parametrize("name,build,shape,k,b", MODELS, ids=MODEL_IDS)
def test_cross_entropy_steps_in_the_metric_match_dense_formula(name, build, shape, k, b, curvature, engine, per_tensor):
    """Three momentum steps of the cross-entropy in the metric against the parameter-space formula
    written out from autograd's output gradient ``g`` and Hessian ``H`` (for ``"gradient"``, ``H``
    projected on ``g``): ``phi_t = (lam J^T H J + alpha D^{-1})^{-1} (J^T g + alpha mu D^{-1}
    phi_{t-1})``, the minimiser of the step's quadratic model plus ``alpha ||phi - mu
    phi_{t-1}||^2_{D^{-1}}``, with ``D`` from the mean loss's gradient ``J^T g / b``."""
    model = build(k).double()
    twin = copy.deepcopy(model)
    lam, alpha, mu, power = 0.7, 0.3, 0.8, 1.0
    sizes = [p.numel() for p in model.parameters()] if per_tensor else None
    batches = [(torch.randn(b, *shape, dtype=torch.float64), torch.randint(0, k, (b,))) for _ in range(3)]
    phi = torch.zeros_like(flat_params(twin))
    moment = torch.zeros_like(phi)
    expected = []
    for t, (x, y) in enumerate(batches, start=1):
        jac, _, g, h = (v.detach() for v in _derivatives(twin, x, _sum_loss("cross_entropy", y)))
        if curvature == "gradient":
            h = _blockdiag(_top_c_hessian(_blocks(h, b, k), g.reshape(b, k), 0))
        moment, d = dense_metric(moment, jac.T @ g / b, t, power, sizes)
        mat = lam * jac.T @ h @ jac + alpha * torch.diag(1 / d)
        phi = torch.linalg.solve(mat, jac.T @ g + alpha * mu * phi / d)
        _set_flat(twin, flat_params(twin) - phi)
        expected.append(flat_params(twin))
    opt = GramGaussNewton(
        model,
        lam=lam,
        alpha=alpha,
        momentum=mu,
        engine=engine,
        loss="cross_entropy",
        curvature=curvature,
        adaptive_damping=False,
        metric={"name": "second_moment", "power": power, "per_tensor": per_tensor},
    )
    for t, (x, y) in enumerate(batches):
        opt.step(lambda: (model(x), y))
        assert_close(flat_params(model), expected[t], 1e-9, f"{name} {curvature} step {t + 1} in the metric")
    assert_close(_state(opt, model, "metric_root_moment"), moment.sqrt(), 1e-9, f"{name} root second moment")
    assert float(d.max() / d.min()) > 1.5, "the metric must differ from the Euclidean one"


def test_power_zero_is_the_euclidean_step():
    name, build, shape, k, b = CASES[1]
    model = build().double()
    twin = copy.deepcopy(model)
    batches = _batches(shape, k, b)
    opts = [
        GramGaussNewton(m, lam=0.7, alpha=0.3, momentum=0.8, adaptive_damping=False, metric=metric)
        for m, metric in ((model, {"name": "second_moment", "power": 0}), (twin, None))
    ]
    for x, y in batches:
        for m, opt in zip((model, twin), opts):
            opt.step(lambda: m(x) - y)
    assert_close(flat_params(model), flat_params(twin), 1e-12, "power 0 against no metric")


def test_rejected_step_leaves_the_second_moment_unchanged():
    """A rejected step leaves the parameters, ``phi`` and the second moment as they were: the next
    accepted step is the dense formula's second step, as if the rejected batch had not been seen."""
    name, build, shape, k, b = CASES[0]
    model = build().double()
    initial = copy.deepcopy(model)
    batches = _batches(shape, k, b)
    rule = _Scripted([True, False, True])  # alpha 0.2, then doubled at every verdict: 0.8 at the third step
    opt = GramGaussNewton(model, lam=1.0, alpha=0.2, momentum=0.7, adaptive_damping=rule, metric="second_moment")
    opt.step(lambda: model(batches[0][0]) - batches[0][1])
    params, state = flat_params(model), copy.deepcopy(opt.state_dict()["state"])
    opt.step(lambda: model(batches[1][0]) - batches[1][1])  # rejected
    assert opt.last_diagnostics.rejected and torch.equal(flat_params(model), params)
    after = opt.state_dict()["state"]
    for key in state:
        for entry in ("momentum_buffer", "metric_root_moment"):
            assert torch.equal(after[key][entry], state[key][entry])
        assert after[key]["metric_count"] == state[key]["metric_count"] == 1
    opt.step(lambda: model(batches[2][0]) - batches[2][1])
    expected, *_ = dense_metric_steps(initial, [batches[0], batches[2]], 1.0, [0.2, 0.8], 0.7, 0.5)
    assert_close(flat_params(model), expected[1], RTOL, "step after a rejected one")


def test_state_dict_round_trip_gives_identical_steps():
    """The second moment and its count travel in ``state_dict`` (loadable with ``weights_only``)."""
    assert_resumed_steps_are_identical(dict(metric="second_moment"), CASES[1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"metric": "adam"}, "unknown metric 'adam'"),
        ({"metric": {"name": "second_moment", "power": 2}}, "Invalid metric power"),
        ({"metric": {"name": "second_moment", "beta2": 1.0}}, "Invalid metric beta2"),
        ({"metric": {"name": "second_moment", "relative_eps": 0}}, "Invalid metric relative_eps"),
        ({"metric": {"name": "second_moment", "beta": 0.9}}, "metric 'second_moment': .*beta"),
        ({"metric": {"name": "second_moment", "per_tensor": 1}}, "Invalid metric per_tensor"),
        ({"metric": 3}, "Invalid metric: 3"),
        ({"metric": "second_moment", "solve_space": "parameter"}, "solved in sample space"),
    ],
)
def test_invalid_metric_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GramGaussNewton(nn.Linear(2, 1), **kwargs)


def test_engine_without_jacobian_columns_is_refused_and_nothing_changes_or_euclidean_under_auto():
    class NoColumns:
        def __init__(self, params):
            self.inner = ReferenceEngine(params)
            self.params = self.inner.params

        def compute(self, closure):
            return dataclasses.replace(self.inner.compute(closure), jacobian_columns=None)

    model = nn.Linear(3, 1).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    twin = copy.deepcopy(model)
    opt = GramGaussNewton(model, engine=NoColumns(list(model.parameters())), metric="second_moment")
    before = flat_params(model)
    with pytest.raises(ValueError, match="dense Jacobian columns"):
        opt.step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before) and all(not opt.state[p] for p in model.parameters())
    # under metric="auto" (the default) such an engine takes the Euclidean step instead
    default = GramGaussNewton(model, engine=NoColumns(list(model.parameters())))
    euclidean = GramGaussNewton(twin, engine=NoColumns(list(twin.parameters())), metric=None)
    assert default.metric is not None
    for _ in range(2):
        default.step(lambda: model(x) - y)
        euclidean.step(lambda: twin(x) - y)
    assert_same_run(flat_params(model), flat_params(twin))
    assert not torch.equal(flat_params(model), before)


def test_metric_from_passes_an_instance_and_none_through():
    metric = SecondMomentMetric(power=0.75)
    assert metric_from(metric) is metric and metric_from(None) is None
    assert metric_from("second_moment") == SecondMomentMetric()
    assert SecondMomentMetric().scaling(torch.zeros(3), 1).tolist() == [1.0, 1.0, 1.0]  # no gradient yet
    with pytest.raises(ValueError, match="needs the parameters' sizes"):
        SecondMomentMetric(per_tensor=True).scaling(torch.ones(3), 1)


def test_auto_takes_the_metric_in_sample_space_and_the_euclidean_step_in_parameter_space():
    """``metric="auto"`` (the default): one weight per tensor with ``power=1`` on a batch solved in
    sample space (the steps of that metric given explicitly); on one the ``"auto"`` solve space puts
    in parameter space (``b*k > 2 m`` here, Levenberg-Marquardt's regime) the Euclidean step of
    ``metric=None``, the second moment left as it was; for another loss, a fixed ``alpha`` or
    ``solve_space="parameter"`` the Euclidean step throughout."""
    name, build, shape, k, b = CASES[0]
    model = build().double()
    m = sum(p.numel() for p in model.parameters())
    small, large = _batches(shape, k, b, count=2), _batches(shape, k, 2 * m + 5, count=1)
    twins = [copy.deepcopy(model) for _ in range(3)]
    explicit = {"name": "second_moment", "per_tensor": True, "power": 1.0}
    opts = [
        GramGaussNewton(twins[0]),
        GramGaussNewton(twins[1], metric=explicit),
        GramGaussNewton(twins[2], metric=None),
    ]
    assert opts[0].metric == SecondMomentMetric(per_tensor=True, power=1.0)
    for x, y in small:
        for t, opt in zip(twins[:2], opts[:2]):
            opt.step(lambda: t(x) - y)
    assert_same_run(flat_params(twins[0]), flat_params(twins[1]))
    moment = _state(opts[0], twins[0], "metric_root_moment")
    x, y = large[0]
    _set_flat(twins[2], flat_params(twins[0]))
    opts[2].load_state_dict(opts[0].state_dict())
    opts[0].step(lambda: twins[0](x) - y)
    opts[2].step(lambda: twins[2](x) - y)
    assert opts[0].last_diagnostics.solve_space == "parameter"
    assert_same_run(flat_params(twins[0]), flat_params(twins[2]))
    assert torch.equal(_state(opts[0], twins[0], "metric_root_moment"), moment)
    assert GramGaussNewton(nn.Linear(2, 3), metric="auto", loss="cross_entropy").metric is None
    assert GramGaussNewton(nn.Linear(2, 3), metric="auto", solve_space="parameter").metric is None
    assert GramGaussNewton(nn.Linear(2, 3), adaptive_damping=False).metric is None
    assert GramGaussNewton(nn.Linear(2, 3), metric="euclidean").metric is None  # a config file's None


def test_geodesic_acceleration_in_the_metric_matches_dense_formula():
    """One accelerated step in the metric against the explicit formula: ``v = -D J^T (lam J D J^T +
    alpha I)^{-1} r``, ``r_vv = (2/h) ((r(w + h v) - r) / h - J v)``, ``a = -D J^T (lam J D J^T +
    alpha I)^{-1} lam r_vv``, the step ``v + a/2`` (its ratio ``2 ||a|| / ||v||`` within the bound)."""
    name, build, shape, k, b = CASES[1]
    model = build().double()
    x, y = _batches(shape, k, b, count=1)[0]
    lam, alpha, h = 4.0, 0.3, 0.1  # a step short enough for its acceleration to be added
    jac = dense_jacobian(model, x).detach()
    with torch.no_grad():
        r = (model(x) - y).reshape(-1)
    _, d = dense_metric(torch.zeros(jac.shape[1], dtype=torch.float64), jac.T @ r / b, 1, 0.5)
    mat = lam * (jac * d) @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
    v = -d * (jac.T @ torch.linalg.solve(mat, r))
    start = flat_params(model)
    moved = copy.deepcopy(model)
    _set_flat(moved, start + h * v)
    with torch.no_grad():
        second = (2 / h) * (((moved(x) - y).reshape(-1) - r) / h - jac @ v)
    a = -d * (jac.T @ torch.linalg.solve(mat, lam * second))
    assert 2 * float(a.norm() / v.norm()) <= 1.5, "the bound must let the acceleration in"
    opt = GramGaussNewton(
        model,
        lam=lam,
        alpha=alpha,
        momentum=0.0,
        adaptive_damping=False,
        geodesic_acceleration=True,
        metric="second_moment",
    )
    opt.step(lambda: model(x) - y)
    assert opt.last_diagnostics.acceleration_ratio is not None
    assert_close(flat_params(model), start + v + a / 2, 1e-9, f"{name} accelerated step")
