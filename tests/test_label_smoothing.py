"""Label smoothing: GGN's probability targets against ``F.cross_entropy(label_smoothing=eps)``, the
float64 step against its dense formula, and the baselines' loss, all decided by
``make_train_step``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dense import assert_close, dense_jacobian, flat_params, groupnorm_cnn
from torch import nn
from torch.func import grad, hessian

from gramnewton import CrossEntropy, GramGaussNewton, NonFiniteError
from gramnewton.lab.baselines import KFAC
from gramnewton.lab.experiments.training import make_train_step
from gramnewton.losses import smooth_targets


def _mlp(k: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, k))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_smoothed_targets_give_torchs_label_smoothed_cross_entropy(eps, kind):
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64) * 3
    targets = (
        torch.randint(0, 5, (7,)) if kind == "labels" else torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1)
    )
    probs = smooth_targets(logits, targets, eps)
    assert probs.shape == (7, 5) and probs.dtype == torch.float64
    assert_close(probs.sum(1), torch.ones(7, dtype=torch.float64), 1e-15, "row sums")
    ours = CrossEntropy().per_sample(logits, CrossEntropy().check(logits, probs)).mean()
    assert_close(ours, F.cross_entropy(logits, targets, label_smoothing=eps), 1e-13, "smoothed loss")
    if eps:  # the smoothing is there: the unsmoothed loss differs
        assert abs(float(ours - F.cross_entropy(logits, targets))) > 1e-3


@pytest.mark.parametrize("name,build,shape,k,b", [("mlp", _mlp, (3, 4), 4, 6), ("cnn", groupnorm_cnn, (1, 6, 6), 3, 5)])
def test_ggn_step_with_label_smoothing_is_the_dense_step_of_the_smoothed_loss(name, build, shape, k, b):
    torch.manual_seed(1)
    model = build(k).double()
    x, y = torch.randn(b, *shape, dtype=torch.float64), torch.randint(0, k, (b,))
    eps, lam, alpha = 0.2, 2.0, 0.5
    total = lambda f: F.cross_entropy(f, y, label_smoothing=eps, reduction="sum")  # noqa: E731
    with torch.no_grad():
        f = model(x)
    jac = dense_jacobian(model, x)
    g, h = grad(total)(f).reshape(-1), hessian(total)(f).reshape(b * k, b * k)
    m = jac.shape[1]
    expected = -torch.linalg.solve(lam * jac.T @ h @ jac + alpha * torch.eye(m, dtype=jac.dtype), jac.T @ g)
    unsmoothed = copy.deepcopy(model)
    before = flat_params(model)
    opt = GramGaussNewton(
        model, loss="cross_entropy", curvature="exact", lam=lam, alpha=alpha, momentum=0.0, adaptive_damping=False
    )
    loss = make_train_step(model, opt, "cross_entropy", label_smoothing=eps)(x, y)
    assert_close(loss, F.cross_entropy(f, y, label_smoothing=eps), 1e-13, "returned loss")
    assert_close(flat_params(model) - before, expected, 1e-9, f"{name} smoothed step")
    # without the smoothing the step is another one (the test can fail)
    plain = GramGaussNewton(
        unsmoothed, loss="cross_entropy", curvature="exact", lam=lam, alpha=alpha, momentum=0.0, adaptive_damping=False
    )
    make_train_step(unsmoothed, plain, "cross_entropy")(x, y)
    assert float((flat_params(unsmoothed) - before - expected).norm()) > 1e-3 * float(expected.norm())


@pytest.mark.parametrize("which", ["sgd", "kfac"])
def test_baselines_minimise_torchs_label_smoothed_cross_entropy(which):
    torch.manual_seed(2)
    model = _mlp(4).double()
    x, y = torch.randn(8, 3, 4, dtype=torch.float64), torch.randint(0, 4, (8,))
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y, label_smoothing=0.3).backward()
    expected = [p.detach() - 0.1 * p.grad for p in reference.parameters()]
    if which == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = make_train_step(model, opt, "cross_entropy", label_smoothing=0.3)(x, y)
        for p, e in zip(model.parameters(), expected):
            assert_close(p.detach(), e, 1e-13, "SGD step")
    else:  # K-FAC's preconditioned step: its loss is the smoothed one, its Fisher the model's own
        opt = KFAC(model, loss="cross_entropy", lr=0.1)
        loss = make_train_step(model, opt, "cross_entropy", label_smoothing=0.3)(x, y)
    assert_close(loss, F.cross_entropy(reference(x), y, label_smoothing=0.3), 1e-13, "returned loss")


def test_bad_smoothing_and_bad_labels_are_refused_with_nothing_changed():
    torch.manual_seed(3)
    model = _mlp(4)
    x = torch.randn(6, 3, 4)
    ggn = GramGaussNewton(model, loss="cross_entropy", lam=1.0)
    for eps in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\)"):
            make_train_step(model, ggn, "cross_entropy", label_smoothing=eps)
    with pytest.raises(ValueError, match="needs the cross-entropy loss, not 'mse'"):
        make_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), "mse", label_smoothing=0.1)
    with pytest.raises(TypeError, match="label_smoothing must be a number"):
        smooth_targets(torch.zeros(2, 3), torch.tensor([0, 1]), "0.1")
    step = make_train_step(model, ggn, "cross_entropy", label_smoothing=0.1)
    before, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(ggn.state_dict())
    with pytest.raises(ValueError, match="labels must be in \\[0, 4\\)"):
        step(x, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(TypeError, match="must be an integer tensor"):
        step(x, torch.zeros(6))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert str(ggn.state_dict()) == str(state)


def test_a_step_that_blows_up_the_logits_is_rejected_not_raised_with_smoothed_targets():
    """The re-evaluation after a step whose logits came out NaN or Inf (forced here on the second
    call): ``smooth_targets`` in the closure does not refuse them, so the gain ratio is ``-inf`` and
    the step is rejected with everything as before; the run goes on. (It raised NonFiniteError and
    stopped a race whose step blew up, thirty-third session.) NaN logits on a step's first
    evaluation are still refused with a clear error."""
    torch.manual_seed(4)
    model = _mlp(4).double()
    x, labels = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    opt = GramGaussNewton(model, loss="cross_entropy", lam=1.0, adaptive_damping=True)
    calls = [0]

    def closure():
        calls[0] += 1
        logits = model(x) * (math.inf if calls[0] == 2 else 1.0)
        return logits, smooth_targets(logits, labels, 0.1)

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert calls[0] == 2 and opt.last_diagnostics.rejected and opt.last_diagnostics.gain_ratio == -math.inf
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(NonFiniteError, match="logits are NaN or Inf"):
        opt.step(lambda: (model(x) * math.nan, smooth_targets(model(x) * math.nan, labels, 0.1)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
