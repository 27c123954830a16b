"""The gain ratio measured on a subset of the batch (``GainRatioDamping(subset=s)``).

The ratio over the batch's first ``s`` samples is checked in float64 against a brute-force one:
the losses of those samples before and after the step (plain forward passes at the two
parameter vectors) and the decrease the linearised / quadratic model predicts for them, from the
dense ``jacrev`` Jacobian and the step actually taken.
"""

from __future__ import annotations

import pytest
import torch
from dense import assert_same_run, dense_jacobian, flat_params, groupnorm_cnn
from torch import nn
from torch.func import hessian

from gramnewton import GramGaussNewton
from gramnewton.damping import CrossValidatedDamping, GainRatioDamping
from gramnewton.lab.experiments.training import make_train_step


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, outputs))


def cnn(outputs: int) -> nn.Module:
    torch.manual_seed(0)
    return groupnorm_cnn(outputs)


def inputs(model_name: str, b: int) -> torch.Tensor:
    return torch.randn(b, 4) if model_name == "mlp" else torch.randn(b, 1, 6, 6)


MODELS = {"mlp": mlp, "cnn": cnn}


def square_loss_ratio(model: nn.Module, before: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Brute-force gain ratio of the square loss on ``(x, y)`` for the step from ``before`` to the
    model's current parameters: ``(||r||^2 - ||r_new||^2) / (||r||^2 - ||r - J phi||^2)``."""
    after = flat_params(model)
    with torch.no_grad():
        r_new = (model(x) - y).reshape(-1)
        torch.nn.utils.vector_to_parameters(before, model.parameters())
        r = (model(x) - y).reshape(-1)
    jac = dense_jacobian(model, x).detach()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(after, model.parameters())
    phi = before - after
    predicted = r - jac @ phi
    return float((r.pow(2).sum() - r_new.pow(2).sum()) / (r.pow(2).sum() - predicted.pow(2).sum()))


def cross_entropy_ratio(model: nn.Module, before: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Brute-force gain ratio of the summed cross-entropy: actual decrease over
    ``-(g^T J delta + 1/2 delta^T J^T H J delta)``, ``H`` the exact output Hessian per sample."""

    def losses(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")

    after = flat_params(model)
    with torch.no_grad():
        loss_after = losses(model(x)).sum()
        torch.nn.utils.vector_to_parameters(before, model.parameters())
        logits = model(x)
    jac = dense_jacobian(model, x).detach()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(after, model.parameters())
    b, k = logits.shape
    delta = (after - before).reshape(-1)
    jd = (jac @ delta).reshape(b, k)
    logits = logits.detach().requires_grad_(True)
    grad = torch.autograd.grad(losses(logits).sum(), logits)[0]
    curvature = [  # d^2 l_i / df_i^2, (k, k) per sample
        hessian(lambda f, i=i: torch.nn.functional.cross_entropy(f, labels[i]))(logits[i].detach()) for i in range(b)
    ]
    quadratic = sum(float(jd[i] @ curvature[i] @ jd[i]) for i in range(b))
    predicted = -(float((grad * jd).sum()) + 0.5 * quadratic)
    return float(losses(logits.detach()).sum() - loss_after) / predicted


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_square_loss_ratio_on_the_subset_equals_the_dense_one(model_name, momentum):
    b, s, k = 10, 4, 2
    model = MODELS[model_name](k)
    opt = GramGaussNewton(
        model, lam=1.0, alpha=0.5, momentum=momentum, adaptive_damping=GainRatioDamping(subset=s, reject_below=-1e9)
    )
    calls = []
    for step in range(3):  # with momentum the later steps carry phi_{t-1}
        torch.manual_seed(10 + step)
        x, y = inputs(model_name, b), torch.randn(b, k)

        def closure(rows=slice(None)):
            calls.append(rows)
            return model(x[rows]) - y[rows]

        before = flat_params(model)
        opt.step(closure)
        expected = square_loss_ratio(model, before, x[:s], y[:s])
        assert opt.last_gain_ratio == pytest.approx(expected, rel=1e-10, abs=1e-12)
        full = square_loss_ratio(model, before, x, y)
        assert abs(full - expected) > 1e-6  # the subset's ratio is not the batch's: the test can tell them apart
        assert calls[-1] == slice(0, s)  # the re-evaluation asked for the first s rows only
        diagnostics = opt.last_diagnostics
        with torch.no_grad():
            assert diagnostics.loss_after == pytest.approx(float((model(x[:s]) - y[:s]).pow(2).mean()), rel=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_cross_entropy_ratio_on_the_subset_equals_the_dense_one(model_name):
    b, s, k = 9, 3, 3
    model = MODELS[model_name](k)
    opt = GramGaussNewton(
        model,
        loss="cross_entropy",
        curvature="exact",
        lam=1.0,
        alpha=0.3,
        momentum=0.5,
        adaptive_damping=GainRatioDamping(subset=s, reject_below=-1e9),
    )
    for step in range(2):
        torch.manual_seed(20 + step)
        x, labels = inputs(model_name, b), torch.randint(0, k, (b,))
        before = flat_params(model)
        opt.step(lambda rows=slice(None): (model(x[rows]), labels[rows]))
        expected = cross_entropy_ratio(model, before, x[:s], labels[:s])
        assert opt.last_gain_ratio == pytest.approx(expected, rel=1e-9)
        assert abs(cross_entropy_ratio(model, before, x, labels) - expected) > 1e-6


def test_a_subset_as_large_as_the_batch_is_the_whole_batch_bit_for_bit():
    b, k = 6, 2
    runs = []
    for rule in (GainRatioDamping(), GainRatioDamping(subset=b), GainRatioDamping(subset=100)):
        model = mlp(k)
        opt = GramGaussNewton(model, lam=1.0, alpha=0.5, adaptive_damping=rule)
        ratios = []
        for step in range(3):
            torch.manual_seed(step)
            x, y = torch.randn(b, 4), torch.randn(b, k)
            opt.step(lambda rows=slice(None): model(x[rows]) - y[rows])
            ratios.append(opt.last_gain_ratio)
        runs.append((ratios, flat_params(model)))
    for ratios, params in runs[1:]:
        assert all(isinstance(r, float) for r in ratios + runs[0][0])
        assert_same_run(
            torch.tensor(ratios, dtype=torch.float64), torch.tensor(runs[0][0], dtype=torch.float64), "the ratios"
        )
        assert_same_run(params, runs[0][1], "the parameters")


def test_a_closure_without_rows_is_refused_and_nothing_changes():
    model = mlp(1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = GramGaussNewton(model, adaptive_damping=GainRatioDamping(subset=2))
    before, state = flat_params(model), opt.state_dict()
    with pytest.raises(ValueError, match="closure must take the rows"):
        opt.step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before)
    assert opt.state_dict() == state


def test_a_closure_that_ignores_the_rows_is_refused_and_the_step_undone():
    model = mlp(1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = GramGaussNewton(model, adaptive_damping=GainRatioDamping(subset=2))
    before = flat_params(model)
    with pytest.raises(ValueError, match="different shape"):
        opt.step(lambda rows=slice(None): model(x) - y)
    assert torch.equal(flat_params(model), before)
    labels = torch.zeros(8, dtype=torch.long)
    ce = GramGaussNewton(mlp(2), loss="cross_entropy", adaptive_damping=GainRatioDamping(subset=2))
    before = flat_params(ce.model)
    with pytest.raises(ValueError, match="expected 2 rows"):
        ce.step(lambda rows=slice(None): (ce.model(x), labels))
    assert torch.equal(flat_params(ce.model), before)


@pytest.mark.parametrize("subset", [0, -1, 2.5, True])
def test_invalid_subsets(subset):
    with pytest.raises(ValueError, match="Invalid subset"):
        GainRatioDamping(subset=subset)


def test_the_cross_validated_rule_measures_on_its_curvature_rules_subset():
    assert CrossValidatedDamping(curvature=GainRatioDamping(subset=5)).subset == 5
    assert CrossValidatedDamping(curvature=None).subset is None
    model = mlp(1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = GramGaussNewton(model, adaptive_damping=CrossValidatedDamping(curvature=GainRatioDamping(subset=3)))
    before = flat_params(model)
    opt.step(lambda rows=slice(None): model(x[rows]) - y[rows])
    assert opt.last_gain_ratio == pytest.approx(square_loss_ratio(model, before, x[:3], y[:3]), rel=1e-10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_the_labs_train_step_closures_take_the_rows(loss):
    model = mlp(3)
    rule = GainRatioDamping(subset=2, reject_below=-1e9)
    opt = GramGaussNewton(model, loss=loss, lam=1.0, alpha=0.5, adaptive_damping=rule)
    step = make_train_step(model, opt, loss, 0.1 if loss == "cross_entropy" else 0.0)
    x = torch.randn(6, 4)
    y = torch.randint(0, 3, (6,)) if loss == "cross_entropy" else torch.randn(6, 3)
    step(x, y)
    assert opt.last_diagnostics.gain_ratio is not None


def test_a_subset_the_step_is_predicted_to_worsen_is_measured_on_the_whole_batch():
    """Two samples at one input with residuals 1 and -3: the step moves both outputs by about
    +1, so the first sample's residual is predicted to grow to 2 while the batch's loss falls
    (10 -> 8). Measured on that sample alone, the ratio's sign rule judged the step by the rise
    and rejected it (``rho = -inf``, ``alpha`` raised); the batch measures it: ``rho`` the dense
    ratio of the whole batch, the step kept."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([[-1.0], [3.0], [0.0]])
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, momentum=0.0, adaptive_damping=GainRatioDamping(subset=1))
    calls = []

    def closure(rows=slice(None)):
        calls.append(rows)
        return model(x[rows]) - y[rows]

    before = flat_params(model)
    opt.step(closure)
    assert not opt.last_diagnostics.rejected
    assert not torch.equal(flat_params(model), before)
    assert opt.last_gain_ratio == pytest.approx(square_loss_ratio(model, before, x, y), rel=1e-10)
    assert calls[-1] == slice(None)  # the whole batch re-evaluated
