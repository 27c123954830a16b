"""GramGaussNewton against what torch.optim's own optimizers do: copies, hooks, parameter lists,
per-group hyper-parameters; and the public helpers' checks of their input."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from dense import assert_close, dense_jacobian, flat_params, seeded
from torch import nn

import gramnewton
from gramnewton import GramGaussNewton


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


X, Y = torch.randn(16, 3, generator=seeded(0)), torch.linspace(-1, 1, 16)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("given", ["model", "parameters"])
def test_a_copy_of_model_and_optimizer_takes_the_same_steps(how, given):
    # torch.optim's __getstate__ keeps defaults, state and param_groups only; GramGaussNewton's
    # settings and engine live in attributes, which a copy lost (AttributeError: 'communicator')
    model = _net()
    opt = GramGaussNewton(model if given == "model" else model.parameters())
    opt.step(lambda: model(X).squeeze(1) - Y)
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for _ in range(2):
        opt.step(lambda: model(X).squeeze(1) - Y)
        opt2.step(lambda: model2(X).squeeze(1) - Y)
    assert_close(flat_params(model2), flat_params(model), 1e-6, "the copy's parameters")
    assert opt2.param_groups[0]["alpha"] == opt.param_groups[0]["alpha"]
    assert opt2.defaults == opt.defaults  # torch's __setstate__ adds "differentiable", a key GGN has not


def test_a_parameter_twice_in_a_group_is_refused():
    # torch only warns; the Gram then counts the parameter's columns twice and the step is wrong
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="more than once"):
        GramGaussNewton([p, p])
    opt = GramGaussNewton([nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_state_dict_hooks_see_and_change_the_whole_state_dict():
    model = _net()
    opt = GramGaussNewton(model.parameters())
    opt.step(lambda: model(X).squeeze(1) - Y)
    seen = []

    def after_save(optimizer, state_dict):
        seen.append(("post", "gramnewton" in state_dict))
        state_dict["gramnewton"]["rejections_in_a_row"] = 5

    def before_load(optimizer, state_dict):
        seen.append(("load pre", state_dict["gramnewton"]["rejections_in_a_row"]))
        state_dict = dict(state_dict)
        state_dict["gramnewton"] = {**state_dict["gramnewton"], "rejections_in_a_row": 7}
        return state_dict

    opt.register_state_dict_pre_hook(lambda optimizer: seen.append("pre"))
    opt.register_state_dict_post_hook(after_save)
    opt.register_load_state_dict_pre_hook(before_load)
    opt.register_load_state_dict_post_hook(lambda optimizer: seen.append("load post"))
    state = opt.state_dict()
    assert state["gramnewton"]["rejections_in_a_row"] == 5
    opt.load_state_dict(state)
    assert seen == ["pre", ("post", True), ("load pre", 5), "load post"]
    assert opt.rejections_in_a_row == 7
    assert "differentiable" not in opt.defaults  # torch's load_state_dict adds it (__setstate__)


def test_step_hooks_run_once_with_the_arguments():
    model = _net()
    opt = GramGaussNewton(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt, len(args), sorted(kwargs))))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt, len(args), sorted(kwargs))))
    opt.step(closure=lambda: model(X).squeeze(1) - Y)
    assert calls == [("pre", True, 1, ["closure"]), ("post", True, 1, ["closure"])]


def test_weight_decay_per_group_is_the_documented_step():
    # w <- (1 - lr wd_g) w - lr J^T (lam G + alpha I)^{-1} r, one system for all groups
    model = _net().double()
    first, last = model[0], model[2]
    x, y = X.double(), Y.double()
    lam, alpha, lr = 0.5, 0.2, 0.6
    jac = dense_jacobian(model, x)
    with torch.no_grad():
        r = model(x).reshape(-1) - y
    step = -jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * torch.eye(16, dtype=torch.float64), r)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in (first, last)]
    decay = torch.cat(
        [torch.full((sizes[0],), 0.1, dtype=torch.float64), torch.full((sizes[1],), 0.3, dtype=torch.float64)]
    )
    w = flat_params(model)
    expected = (1 - lr * decay) * w + lr * step
    groups = [{"params": first.parameters(), "weight_decay": 0.1}, {"params": last.parameters(), "weight_decay": 0.3}]
    opt = GramGaussNewton(groups, lam=lam, alpha=alpha, lr=lr, adaptive_damping=False, momentum=0.0)
    opt.step(lambda: model(x).squeeze(1) - y)
    assert_close(flat_params(model), expected, 1e-10, "parameters after a step with per-group weight decay")


def test_complex_parameters_are_refused_clearly():
    c = nn.Parameter(torch.randn(3, dtype=torch.cfloat))
    with pytest.raises(ValueError, match="view_as_real"):
        GramGaussNewton([c])
    with pytest.raises(ValueError, match="view_as_real"):
        GramGaussNewton([{"params": c}])


def test_apply_direction_checks_every_shape_before_changing_anything():
    p, q = torch.ones(3, 4), torch.ones(2)
    with pytest.raises(ValueError, match="shape"):  # was: broadcast, (4,) added to every row
        gramnewton.apply_direction([p, q], [torch.ones(4), torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):  # was: decayed, then failed: half changed
        gramnewton.apply_direction([p], [torch.ones(5)], weight_decay=0.5)
    with pytest.raises(ValueError, match="2 parameters and 1 directions"):
        gramnewton.apply_direction([p, q], [torch.ones(3, 4)])
    assert bool((p == 1).all()) and bool((q == 1).all())


@pytest.mark.parametrize(
    "gram,rhs,kwargs,match",
    [
        (torch.eye(3), torch.ones(4), {}, r"\(n, n\).*\(n,\)"),
        (torch.eye(3), torch.ones(3, 1), {}, r"\(n, n\).*\(n,\)"),
        (torch.ones(3), torch.ones(3), {}, r"\(n, n\).*\(n,\)"),
        (torch.ones(3, 4), torch.ones(3), {}, r"\(n, n\).*\(n,\)"),
        (torch.eye(3), torch.ones(3), {"dtype": torch.float16}, "dtype"),
    ],
)
def test_damped_solve_refuses_bad_input_clearly(gram, rhs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gramnewton.damped_solve(gram, rhs, 1.0, 0.1, **kwargs)


@pytest.mark.parametrize("value", [1.5, None, "64", True])
def test_tune_allocator_refuses_a_value_that_is_not_an_int(value, monkeypatch):
    monkeypatch.setenv("GRAMNEWTON_TUNE_ALLOCATOR", "0")  # the check comes first; nothing is set
    with pytest.raises(ValueError, match="M_TOP_PAD"):
        gramnewton.tune_allocator(top_pad=value)


@pytest.mark.parametrize("groups", [0, 2.5, True])
def test_convert_batchnorm_refuses_a_bad_group_count_before_changing_anything(groups):
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="groups"):  # was: TypeError for 2.5, True taken as 1
        gramnewton.convert_batchnorm(model, groups=groups)
    with pytest.raises(ValueError, match="groups"):  # was: accepted where there is no BatchNorm
        gramnewton.convert_batchnorm(nn.Linear(2, 2), groups=groups)
    assert isinstance(model[1], nn.BatchNorm1d)


def test_convert_batchnorm_changes_nothing_when_a_layer_cannot_be_converted():
    # a lazy BatchNorm has no channel count before its first forward pass; the layers before it
    # were replaced already when it raised
    model = nn.Sequential(nn.BatchNorm1d(4), nn.LazyBatchNorm1d())
    with pytest.raises(ValueError, match="forward pass"):
        gramnewton.convert_batchnorm(model)
    assert isinstance(model[0], nn.BatchNorm1d)


@pytest.mark.parametrize("other", [torch.optim.SGD, torch.optim.Adam])
def test_another_optimizers_state_dict_is_refused_before_loading(other):
    # torch loads it (its groups replace ours, without lam and alpha) and the next step raised
    # KeyError: 'lam', the optimizer unusable from then on
    model = _net()
    sgd = other(model.parameters(), lr=0.1)
    ((model(X).squeeze(1) - Y) ** 2).mean().backward()
    sgd.step()
    opt = GramGaussNewton(model.parameters())
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(sgd.state_dict())
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == hyper and not opt.state
    opt.step(lambda: model(X).squeeze(1) - Y)


def _line():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    return model, lambda: model(x).squeeze(1) - y


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(momentum=1.5), "momentum"),  # was: accepted, phi_t = 1.5 phi_{t-1} + ...
        (dict(momentum=0.5, previous=[torch.zeros(1, 3, dtype=torch.float64)]), "previous"),  # was: size mismatch
        (dict(momentum=0.5, previous=[torch.zeros(3), torch.zeros(2)]), "previous"),  # was: size mismatch
        (dict(solve_dtype=torch.float16), "solve_dtype"),  # was: "cholesky_cpu" not implemented for 'Half'
        (dict(solve_dtype="float64"), "solve_dtype"),  # was: RuntimeError: Invalid device string
    ],
)
def test_gram_gauss_newton_direction_refuses_bad_arguments_before_computing(kwargs, match):
    model, closure = _line()
    calls = []
    with pytest.raises(ValueError, match=match):
        gramnewton.gram_gauss_newton_direction(
            gramnewton.ReferenceEngine(list(model.parameters())),
            lambda: calls.append(1) or closure(),
            lam=1.0,
            alpha=0.1,
            **kwargs,
        )
    assert not calls  # refused before the closure ran


def test_full_batch_step_refuses_bad_arguments_and_changes_nothing():
    model, closure = _line()
    before = flat_params(model)
    with pytest.raises(ValueError, match="no parameter"):  # was: `inputs` argument to `grad()` cannot be empty
        gramnewton.full_batch_step([], closure)
    with pytest.raises(ValueError, match="solve_dtype"):  # was: "linalg_svd_cpu" not implemented for 'Half'
        gramnewton.full_batch_step(model.parameters(), closure, solve_dtype=torch.float16)
    assert torch.equal(flat_params(model), before)


def test_check_per_sample_independence_needs_a_module():
    with pytest.raises(TypeError, match="nn.Module"):  # was: AttributeError: 'list' object has no attribute
        gramnewton.check_per_sample_independence([nn.BatchNorm1d(3)])


@pytest.mark.parametrize("damping", ["auto", False])
def test_a_schedule_at_lr_zero_takes_a_zero_step(damping):
    # a warm-up from 0 (LambdaLR(t / warmup), transformers' linear and cosine schedules), a
    # PolynomialLR or CosineAnnealingLR(eta_min=0) at its end set lr = 0, which torch's optimizers
    # take (a step of length zero); it raised "Invalid lr value: 0.0" here
    model = _net()
    opt = GramGaussNewton(model.parameters(), weight_decay=0.1, adaptive_damping=damping)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(t / 2, 1.0))
    before, alpha = flat_params(model), opt.param_groups[0]["alpha"]
    opt.step(lambda: model(X).squeeze(1) - Y)
    assert torch.equal(flat_params(model), before)
    assert opt.param_groups[0]["alpha"] == alpha and not opt.last_diagnostics.rejected  # nothing to judge
    schedule.step()
    opt.step(lambda: model(X).squeeze(1) - Y)
    assert not torch.equal(flat_params(model), before)
