"""The diagonal metric and geodesic acceleration against a dense float64 computation written
from docs/design.md, over several steps with momentum, ``lr != 1``, weight decay per param
group and a frozen parameter, both engines and both solve spaces; state_dict round trips mid-run
and the refusal of bad settings."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from dense import assert_close, assert_same_run, dense_jacobian, seeded
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.engines import HooksEngine
from gramnewton.metric import SecondMomentMetric, metric_from
from gramnewton.update import GeodesicAcceleration

RTOL = 1e-9


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[2].bias.requires_grad_(False)  # frozen: never moves, no column
    return model


def _batches(count: int = 4, b: int = 5) -> list[tuple[Tensor, Tensor]]:
    g = seeded(1)
    return [
        (torch.randn(b, 3, generator=g, dtype=torch.float64), torch.randn(b, 2, generator=g, dtype=torch.float64))
        for _ in range(count)
    ]


def _groups(model: nn.Module, wd: tuple[float, float]) -> list[dict]:
    return [
        {"params": list(model[0].parameters()), "weight_decay": wd[0]},
        {"params": [*model[2].parameters(), *model[4].parameters()], "weight_decay": wd[1]},
    ]


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _set(params: list[Tensor], flat: Tensor) -> None:
    with torch.no_grad():
        start = 0
        for p in params:
            p.copy_(flat[start : start + p.numel()].view_as(p))
            start += p.numel()


def dense_scaling(metric: SecondMomentMetric, moment: Tensor, t: int, sizes: list[int]) -> Tensor:
    """``D`` of the documented formula from the second moment ``v`` (not its root) after ``t``
    updates, in float64: ``s = sqrt(v / (1 - beta2^t))``, ``(s + eps mean s)^(-power)`` per entry
    or ``(rms_l(s) + eps mean s)^(-power)`` per tensor (``sizes``), divided by its mean."""
    s = torch.sqrt(moment.double() / (1 - metric.beta2**t))
    if metric.per_tensor:
        rms = [torch.sqrt(torch.mean(part**2)) for part in s.split(sizes)]
        weight = torch.cat(
            [
                (q + metric.relative_eps * s.mean()) ** (-metric.power) * torch.ones(n, dtype=s.dtype)
                for q, n in zip(rms, sizes)
            ]
        )
    else:
        weight = (s + metric.relative_eps * s.mean()) ** (-metric.power)
    return weight / weight.mean()


def dense_run(model, batches, *, lam, alpha, mu, lr, wd, metric, h, max_ratio):
    """The documented step, written out: ``D`` from the moment recursion, ``phi_t``, the
    acceleration, then ``w <- (1 - lr wd_group) w - lr phi_t`` (fixed alpha: decay with the step)."""
    model = copy.deepcopy(model)
    params = _trainable(model)
    sizes = [p.numel() for p in params]
    decay = torch.cat(
        [torch.full((p.numel(),), wd[0] if i < 2 else wd[1], dtype=torch.float64) for i, p in enumerate(params)]
    )
    m = sum(sizes)
    phi = torch.zeros(m, dtype=torch.float64)
    moment = torch.zeros(m, dtype=torch.float64)
    trajectory = []
    for t, (x, y) in enumerate(batches, start=1):
        jac = dense_jacobian(model, x)
        w = _flat(params)
        with torch.no_grad():
            r = (model(x) - y).reshape(-1)
        if metric is None:
            d = torch.ones(m, dtype=torch.float64)
        else:
            moment = metric.beta2 * moment + (1 - metric.beta2) * (jac.T @ r / x.shape[0]) ** 2
            d = dense_scaling(metric, moment, t, sizes)
        mat = lam * (jac * d) @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
        v = -(mu * phi + d * (jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ phi)))
        step = v
        if h is not None:
            _set(params, w + h * v)
            with torch.no_grad():
                displaced = (model(x) - y).reshape(-1)
            _set(params, w)
            second = (2 / h) * ((displaced - r) / h - jac @ v)
            a = -d * (jac.T @ torch.linalg.solve(mat, lam * second))
            if 2 * a.norm() / v.norm() <= max_ratio:
                step = v + a / 2
        phi = -step
        _set(params, (1 - lr * decay) * w + lr * step)
        trajectory.append(_flat(params))
    return trajectory


def _engine(name, model):
    return HooksEngine(model, _trainable(model)) if name == "hooks" else name


def _fixed(model, engine, hyper, **options) -> GramGaussNewton:
    """``GramGaussNewton`` over ``_groups`` with ``dense_run``'s hyper-parameters (``hyper``:
    ``lam``, ``alpha``, ``mu``, ``lr``, the groups' ``wd``) and ``alpha`` held fixed."""
    return GramGaussNewton(
        _groups(model, hyper["wd"]),
        lam=hyper["lam"],
        alpha=hyper["alpha"],
        momentum=hyper["mu"],
        lr=hyper["lr"],
        adaptive_damping=False,
        engine=_engine(engine, model),
        **options,
    )


def _closure(model, x, y):
    return lambda: (model(x), y)


CONFIGS = [
    # metric, geodesic (h, max_ratio), solve_space
    (None, (0.1, 10.0), "sample"),
    (None, (0.1, 10.0), "parameter"),
    (SecondMomentMetric(power=0.5, beta2=0.9, relative_eps=1e-2), None, "sample"),
    (SecondMomentMetric(power=1.0, beta2=0.8, relative_eps=1e-2, per_tensor=True), None, "sample"),
    (SecondMomentMetric(power=0.75, beta2=0.9, relative_eps=1e-2), (0.3, 10.0), "sample"),
    (SecondMomentMetric(power=1.0, beta2=0.9, relative_eps=1e-2, per_tensor=True), (0.1, 10.0), "sample"),
]


@pytest.mark.parametrize("engine", ["reference", "hooks"])
@pytest.mark.parametrize("metric,geodesic,space", CONFIGS, ids=[f"c{i}" for i in range(len(CONFIGS))])
def test_steps_match_dense_formula_with_lr_decay_groups_and_frozen(metric, geodesic, space, engine):
    model, batches = _model(), _batches()
    hyper = dict(lam=0.7, alpha=0.2, mu=0.6, lr=0.6, wd=(0.01, 0.05))
    expected = dense_run(
        model,
        batches,
        metric=metric,
        h=None if geodesic is None else geodesic[0],
        max_ratio=None if geodesic is None else geodesic[1],
        **hyper,
    )
    frozen = model[2].bias.detach().clone()
    opt = _fixed(
        model,
        engine,
        hyper,
        solve_space=space,
        metric=metric,
        geodesic_acceleration=False if geodesic is None else GeodesicAcceleration(*geodesic),
    )
    for t, (x, y) in enumerate(batches):
        opt.step(_closure(model, x, y))
        assert_close(_flat(_trainable(model)), expected[t], RTOL, f"step {t + 1}")
        ratio = opt.last_diagnostics.acceleration_ratio
        assert (ratio is None) == (geodesic is None) and (ratio is None or 0 < ratio <= geodesic[1]), ratio
    assert torch.equal(model[2].bias, frozen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "metric", ["auto", {"name": "second_moment", "power": 0.75}, {"name": "second_moment", "per_tensor": True}]
)
def test_state_dict_round_trip_mid_run_is_bit_for_bit(metric, dtype):
    """Three steps (gain-ratio rule, momentum, acceleration, two groups, a frozen bias), the state
    through ``torch.save``/``torch.load(weights_only=True)`` into a fresh optimizer: the next
    three steps of both are identical bit for bit."""
    import io

    model, batches = _model().to(dtype), _batches(count=6)
    batches = [(x.to(dtype), y.to(dtype)) for x, y in batches]
    options = dict(lam=2.0, alpha=0.3, momentum=0.7, lr=0.8, metric=metric, geodesic_acceleration=True)
    opt = GramGaussNewton(_groups(model, (0.01, 0.02)), engine=_engine("hooks", model), **options)
    for x, y in batches[:3]:
        opt.step(_closure(model, x, y))
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = GramGaussNewton(_groups(twin, (0.01, 0.02)), engine=_engine("hooks", twin), **options)
    twin_opt.load_state_dict(torch.load(saved, weights_only=True))
    for x, y in batches[3:]:
        opt.step(_closure(model, x, y))
        twin_opt.step(_closure(twin, x, y))
        assert_same_run(_flat(_trainable(model)), _flat(_trainable(twin)))
        assert opt.last_diagnostics == twin_opt.last_diagnostics


@pytest.mark.parametrize("engine", ["reference", "hooks"])
@pytest.mark.parametrize("metric", [SecondMomentMetric(power=1.0, beta2=0.9), None])
def test_more_residuals_than_parameters_under_auto_space(metric, engine):
    """``solve_space="auto"`` with more residuals (80) than parameters (66): an explicit metric's
    step is still the metric's formula, the Euclidean one (parameter space) the dense formula;
    both accelerated."""
    model, batches = _model(), _batches(count=3, b=40)
    hyper = dict(lam=0.7, alpha=0.2, mu=0.5, lr=1.3, wd=(0.0, 0.03))
    expected = dense_run(model, batches, metric=metric, h=0.1, max_ratio=10.0, **hyper)
    opt = _fixed(model, engine, hyper, metric=metric, geodesic_acceleration=GeodesicAcceleration(0.1, 10.0))
    for t, (x, y) in enumerate(batches):
        opt.step(_closure(model, x, y))
        assert_close(_flat(_trainable(model)), expected[t], RTOL, f"step {t + 1}")


@pytest.mark.parametrize("engine", ["reference", "hooks", "auto"])
def test_acceleration_of_a_closure_that_draws_random_numbers(engine):
    """A closure drawing noise (sampled targets): the point along the step is evaluated on the
    same draw as the step's own residuals, so the step is the dense formula's on that draw."""
    model, batches = _model(), _batches(count=3)
    noisy = []
    for i, (x, y) in enumerate(batches):
        torch.manual_seed(100 + i)
        noisy.append((x, y + torch.randn_like(y)))
    expected = dense_run(
        model,
        noisy,
        lam=0.7,
        alpha=0.2,
        mu=0.5,
        lr=1.0,
        wd=(0.0, 0.0),
        metric=SecondMomentMetric(power=1.0, beta2=0.9, per_tensor=True),
        h=0.2,
        max_ratio=10.0,
    )
    opt = GramGaussNewton(
        model if engine == "auto" else _trainable(model),
        lam=0.7,
        alpha=0.2,
        momentum=0.5,
        adaptive_damping=False,
        engine=_engine(engine, model),
        metric={"name": "second_moment", "power": 1.0, "beta2": 0.9, "per_tensor": True},
        geodesic_acceleration=GeodesicAcceleration(0.2, 10.0),
    )
    for t, (x, y) in enumerate(batches):
        torch.manual_seed(100 + t)
        opt.step(lambda x=x, y=y: (model(x), y + torch.randn_like(y)))
        assert_close(_flat(_trainable(model)), expected[t], RTOL, f"step {t + 1}")


@pytest.mark.parametrize("key", ["metric_root_moment", "metric_moment"])
@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_a_corrupt_second_moment_is_refused_not_silently_euclidean(bad, per_tensor, key):
    """A second moment with a NaN, negative or infinite entry (a corrupt or hand-edited
    state_dict: the root ``metric_root_moment`` kept now, or an older version's ``metric_moment
    = v``) made ``s`` NaN, ``mean(s) > 0`` false and ``D`` silently all ones (the Euclidean step),
    forever after (the NaN stays in the moment). It is refused with a clear error, nothing
    changed (an infinite one was refused as "the Gram matrix has NaN or Inf entries")."""
    from gramnewton.solve import SingularGramError

    model, batches = _model(), _batches(count=3)
    options = dict(
        lam=0.7,
        alpha=0.2,
        momentum=0.5,
        adaptive_damping=False,
        metric={"name": "second_moment", "per_tensor": per_tensor},
    )
    opt = GramGaussNewton(model, **options)
    opt.step(_closure(model, *batches[0]))
    state = opt.state_dict()
    first = next(iter(state["state"]))
    root = state["state"][first].pop("metric_root_moment")
    state["state"][first][key] = root.square() if key == "metric_moment" else root.clone()
    state["state"][first][key].view(-1)[0] = bad
    opt.load_state_dict(state)
    before = _flat(_trainable(model))
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(SingularGramError, match="second moment"):
        opt.step(_closure(model, *batches[1]))
    assert torch.equal(_flat(_trainable(model)), before)
    after = opt.state_dict()
    for key, value in saved["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(tensor)) or (
                torch.as_tensor(tensor).isnan().any()
            ), name


def test_scaling_refuses_a_nan_moment_and_keeps_all_ones_for_a_zero_one():
    metric = SecondMomentMetric(power=1.0)
    assert torch.equal(metric.scaling(torch.zeros(4, dtype=torch.float64), 1), torch.ones(4, dtype=torch.float64))
    from gramnewton.solve import SingularGramError

    with pytest.raises(SingularGramError, match="second moment"):
        metric.scaling(torch.tensor([1.0, math.nan, 2.0, 0.0], dtype=torch.float64), 3)


def test_a_mapping_may_name_the_euclidean_metric():
    """``{"name": "euclidean"}`` (a JSON grid or config table listing the metrics by name) was
    refused with "unknown metric 'euclidean'; expected one of euclidean, second_moment"."""
    assert metric_from({"name": "euclidean"}) is None
    with pytest.raises(ValueError, match="'euclidean' takes no arguments"):
        metric_from({"name": "euclidean", "power": 0.5})
    model = _model()
    assert GramGaussNewton(model, metric={"name": "euclidean"}).metric is None


@pytest.mark.parametrize("mu", [0.0, 0.5])
@pytest.mark.parametrize("engine", ["reference", "hooks"])
def test_acceleration_with_alpha_zero(mu, engine):
    """``alpha = 0``: without momentum the reference engine solves from ``J`` by SVD, and the
    acceleration's second solve with it."""
    model, batches = _model(), _batches(count=3)
    expected = dense_run(
        model, batches, lam=1.3, alpha=0.0, mu=mu, lr=0.9, wd=(0.0, 0.0), metric=None, h=0.1, max_ratio=10.0
    )
    opt = GramGaussNewton(
        _trainable(model),
        lam=1.3,
        alpha=0.0,
        momentum=mu,
        lr=0.9,
        adaptive_damping=False,
        engine=_engine(engine, model),
        metric=None,
        geodesic_acceleration=GeodesicAcceleration(0.1, 10.0),
    )
    for t, (x, y) in enumerate(batches):
        opt.step(_closure(model, x, y))
        assert_close(_flat(_trainable(model)), expected[t], 1e-7, f"step {t + 1}")


@pytest.mark.parametrize("count", [0, -1])
def test_scaling_refuses_a_count_below_one(count):
    """``1 - beta2^0 = 0``: a count below one divided by zero (a NaN or infinite ``D``)."""
    with pytest.raises(ValueError, match="count"):
        SecondMomentMetric().scaling(torch.ones(3, dtype=torch.float64), count)


@pytest.mark.parametrize("engine", ["auto", "reference"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_freezing_and_unfreezing_mid_run_matches_the_documented_moment(per_tensor, engine):
    """A parameter frozen for a step and unfrozen again restarts from a zero moment and ``phi = 0``
    (docs: "a parameter new to the steps ... starts from a zero moment, as phi does"), the bias
    correction's count going on; ``D``'s mean is over the trainable entries of each step."""
    metric = SecondMomentMetric(power=1.0, beta2=0.8, relative_eps=1e-2, per_tensor=per_tensor)
    model, batches = _model(), _batches(count=5)
    lam, alpha, mu = 0.7, 0.2, 0.5
    frozen_at = {2: model[0].weight}  # step index (0-based) at which model[0].weight is frozen
    twin = copy.deepcopy(model)
    moment = {n: torch.zeros_like(p) for n, p in twin.named_parameters()}
    phi = {n: torch.zeros_like(p) for n, p in twin.named_parameters()}
    expected = []
    for t, (x, y) in enumerate(batches, start=1):
        twin[0].weight.requires_grad_(t - 1 not in frozen_at)
        if t - 2 in frozen_at:  # unfrozen this step: a new parameter
            moment["0.weight"], phi["0.weight"] = (
                torch.zeros_like(moment["0.weight"]),
                torch.zeros_like(phi["0.weight"]),
            )
        live = [n for n, p in twin.named_parameters() if p.requires_grad]
        params = [dict(twin.named_parameters())[n] for n in live]
        jac = dense_jacobian(twin, x)
        with torch.no_grad():
            r = (twin(x) - y).reshape(-1)
        g = jac.T @ r / x.shape[0]
        sizes = [p.numel() for p in params]
        v = torch.cat([metric.beta2 * moment[n].reshape(-1) for n in live]) + (1 - metric.beta2) * g**2
        d = dense_scaling(metric, v, t, sizes)
        prev = torch.cat([phi[n].reshape(-1) for n in live])
        mat = lam * (jac * d) @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
        new_phi = mu * prev + d * (jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ prev))
        for n, part, vpart in zip(live, new_phi.split(sizes), v.split(sizes)):
            phi[n], moment[n] = part.view_as(phi[n]), vpart.view_as(moment[n])
        _set(params, _flat(params) - new_phi)
        expected.append(torch.cat([p.detach().reshape(-1) for p in twin.parameters()]))
    opt = GramGaussNewton(
        model, lam=lam, alpha=alpha, momentum=mu, adaptive_damping=False, engine=engine, metric=metric
    )
    for t, (x, y) in enumerate(batches):
        model[0].weight.requires_grad_(t not in frozen_at)
        opt.step(_closure(model, x, y))
        assert_close(
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]), expected[t], RTOL, f"step {t + 1}"
        )


SCALES = [10.0**k for k in range(-36, 37, 4)]  # the gradients' entries from ~1e-39 to ~1e37


@pytest.mark.parametrize("power", [0.5, 1.0])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_float32_metric_is_scale_free_like_its_formula(per_tensor, power):
    """``D`` is unchanged when every gradient is scaled by one factor ``c`` (``s`` scales with it,
    the normalisation removes ``c^-power``); in float32 over three updates, gradients spread over
    three decades and ``c`` from 1e-36 to 1e36, ``D`` is the float64 formula's at ``c = 1`` to
    float32's round-off. The moment ``v = g^2`` kept before underflowed below ``|g| ~ 1e-19`` and
    overflowed above ``~1e19``: ``D`` off by up to 240 times at ``c = 1e-21``, NaN from ``c =
    1e19`` (per tensor 100% off from ``c = 1e18``, its ``rms`` squaring ``s`` again)."""
    torch.manual_seed(0)
    sizes = [20, 30]
    gradients = [
        torch.randn(50, dtype=torch.float64) * torch.logspace(-2, 1, 50, dtype=torch.float64) for _ in range(3)
    ]
    metric = SecondMomentMetric(power=power, beta2=0.9, per_tensor=per_tensor)
    moment = torch.zeros(50, dtype=torch.float64)
    for g in gradients:
        moment = metric.beta2 * moment + (1 - metric.beta2) * g**2
    expected = dense_scaling(metric, moment, len(gradients), sizes)
    for c in SCALES:
        root = torch.zeros(50)
        for g in gradients:
            root = metric.updated_root_moment(root, (c * g).float())
        assert_close(metric.scaling(root, len(gradients), sizes).double(), expected, 2e-6, f"float32 D at c = {c:g}")


@pytest.mark.parametrize("power", [0.5, 1.0])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_float16_metric_of_ordinary_gradients_is_within_half_precision(per_tensor, power):
    """float16 (smallest normal 6e-5): gradients of 1e-5 to 1e-2 give, over three updates, the
    float64 formula's ``D`` of the same (rounded) gradients to 3% (float16's subnormals). The
    moment ``g^2`` kept before underflowed below ``|g| ~ 2e-4``: ``D`` 190% off, NaN for
    ``power = 1`` (``(s + eps mean s)^-1`` past float16's largest number)."""
    torch.manual_seed(0)
    sizes = [20, 30]
    gradients = [
        (torch.randn(50, dtype=torch.float64) * torch.logspace(-5, -2, 50, dtype=torch.float64)).half()
        for _ in range(3)
    ]
    metric = SecondMomentMetric(power=power, beta2=0.9, per_tensor=per_tensor)
    root, moment = torch.zeros(50, dtype=torch.float16), torch.zeros(50, dtype=torch.float64)
    for g in gradients:
        root = metric.updated_root_moment(root, g)
        moment = metric.beta2 * moment + (1 - metric.beta2) * g.double() ** 2
    got = metric.scaling(root, len(gradients), sizes).double()
    assert_close(got, dense_scaling(metric, moment, len(gradients), sizes), 3e-2, "float16 D")


def test_float32_root_moment_is_the_float64_one_over_the_range():
    """The kept root ``sqrt(beta2 v + (1 - beta2) g^2)`` in float32 is float64's to round-off for
    gradients from 1e-36 to 1e37 (``hypot``: no ``g^2`` is formed)."""
    torch.manual_seed(1)
    metric = SecondMomentMetric(beta2=0.9)
    for c in SCALES:
        gradients = [(c * torch.randn(40, dtype=torch.float64)).float() for _ in range(3)]
        root, moment = torch.zeros(40), torch.zeros(40, dtype=torch.float64)
        for g in gradients:
            root = metric.updated_root_moment(root, g)
            moment = metric.beta2 * moment + (1 - metric.beta2) * g.double() ** 2
        assert_close(root.double(), moment.sqrt(), 1e-6, f"float32 root second moment at c = {c:g}")


@pytest.mark.parametrize("scale", [1e-11, 1e10])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_float32_steps_with_tiny_or_huge_gradients_are_the_unit_scale_steps(per_tensor, scale):
    """Residuals ``c r`` scale ``J`` and ``r`` by ``c`` and the batch gradient by ``c^2``
    (``|g| ~ 1e-22`` and ``1e20`` here); with ``alpha c^2`` the step in a scale-free ``D`` is the
    one at ``c = 1``. In float32 it is, to round-off, over three momentum steps (was: at ``c =
    1e-11`` the moment ``g^2`` underflowed to zero, ``D`` all ones: the parameters' displacement
    37-170% off; at ``c = 1e10`` it overflowed: "the Gram matrix has NaN or Inf entries")."""
    metric = {"name": "second_moment", "power": 1.0, "beta2": 0.9, "per_tensor": per_tensor}
    batches = [(x.float(), y.float()) for x, y in _batches(count=3)]
    runs = []
    for c in (1.0, scale):
        model = _model().float()
        opt = GramGaussNewton(
            _trainable(model), lam=0.7, alpha=0.2 * c**2, momentum=0.5, adaptive_damping=False, metric=metric
        )
        for x, y in batches:
            opt.step(lambda x=x, y=y: c * (model(x) - y))
        runs.append(_flat(_trainable(model)))
    assert_close(runs[1].double(), runs[0].double(), 1e-4, f"float32 steps at c = {scale:g}")


@pytest.mark.parametrize("engine", ["reference", "hooks"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_groups_listing_parameters_out_of_model_order(per_tensor, engine):
    """Param groups in another order than ``model.parameters()`` (the engine's columns, the
    moment and ``D`` in that order): the step is the dense one, which does not depend on it."""
    metric = SecondMomentMetric(power=1.0, beta2=0.9, relative_eps=1e-2, per_tensor=per_tensor)
    model, batches = _model(), _batches()
    expected = dense_run(
        model, batches, lam=0.7, alpha=0.2, mu=0.6, lr=0.7, wd=(0.0, 0.0), metric=metric, h=0.2, max_ratio=10.0
    )
    groups = [{"params": [model[4].bias, model[2].weight]}, {"params": [model[4].weight, *model[0].parameters()]}]
    engine_arg = HooksEngine(model, [p for g in groups for p in g["params"]]) if engine == "hooks" else engine
    opt = GramGaussNewton(
        groups,
        lam=0.7,
        alpha=0.2,
        momentum=0.6,
        lr=0.7,
        adaptive_damping=False,
        engine=engine_arg,
        metric=metric,
        geodesic_acceleration=GeodesicAcceleration(0.2, 10.0),
    )
    for t, (x, y) in enumerate(batches):
        opt.step(_closure(model, x, y))
        assert_close(_flat(_trainable(model)), expected[t], RTOL, f"step {t + 1}")
