"""A rejected step solved again from the same batch's system (``GainRatioDamping(retries=n)``).

Float64 checks against a step computed from scratch: a retry is the step a fresh optimizer takes
on the same batch with the rule's raised ``alpha`` and the same ``phi_{t-1}``; it runs no forward
or backward pass with gradients; after the last rejected retry nothing has changed."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from dense import groupnorm_cnn, seeded
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.damping import DampingDecision, DampingRule, GainRatioDamping
from gramnewton.losses import smooth_targets


@dataclass
class Scripted(DampingRule):
    """Rejects the first ``reject`` measured steps (doubling ``alpha``), then accepts, keeping it."""

    reject: int = 1
    retries: int = 1

    def update(self, alpha, gain_ratio, diagnostics):
        self.reject -= 1
        return DampingDecision(2 * alpha, False) if self.reject >= 0 else DampingDecision(alpha, True)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return groupnorm_cnn(3).double()


def batches(model: nn.Module, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = seeded(1)
    shape = (6, 4) if isinstance(model[0], nn.Linear) else (6, 1, 6, 6)
    return [
        (torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64))
        for _ in range(n)
    ]


def closure_for(model, x, y, loss):
    if loss == "mse":
        return lambda: model(x) - y
    labels = y.argmax(1)

    def closure():
        logits = model(x)
        return logits, smooth_targets(logits, labels, 0.1)

    return closure


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_retry_is_the_step_with_the_raised_alpha(make, loss, momentum):
    """Two accepted steps, then one rejected and retried: parameters and ``phi`` equal those of a
    twin that takes the third step once with the doubled ``alpha`` (same ``phi_{t-1}``)."""
    model = make()
    twin_model = copy.deepcopy(model)
    data = batches(model, 3)
    opt = GramGaussNewton(model, lam=2.0, alpha=0.1, momentum=momentum, loss=loss, adaptive_damping=Scripted(reject=0))
    # the twin's alpha is fixed, so it takes the metric the rule's optimizer resolved ("auto") explicitly
    twin = GramGaussNewton(
        twin_model, lam=2.0, alpha=0.1, momentum=momentum, loss=loss, adaptive_damping=False, metric=opt.metric
    )
    for x, y in data[:2]:
        opt.step(closure_for(model, x, y, loss))
        twin.step(closure_for(twin_model, x, y, loss))
    opt.damping.reject = 1
    x, y = data[2]
    opt.step(closure_for(model, x, y, loss))
    twin.param_groups[0]["alpha"] = 0.2
    twin.step(closure_for(twin_model, x, y, loss))
    assert opt.last_diagnostics.retries == 1 and not opt.last_diagnostics.rejected
    assert opt.last_diagnostics.alpha == 0.2
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        if momentum:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])
        assert int(opt.state[p]["step"]) == 3  # the retried step counts once


def test_a_retry_runs_no_pass_with_gradients():
    """The batch's system is computed once: one engine ``compute``, then one re-evaluation (no
    graph) per attempt."""
    model = mlp()
    ((x, y),) = batches(model, 1)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, adaptive_damping=Scripted(reject=2, retries=2))
    computes, graphs = [], []
    compute = opt.engine.compute
    opt.engine.compute = lambda *a, **k: computes.append(1) or compute(*a, **k)

    def closure():
        graphs.append(torch.is_grad_enabled())
        return model(x) - y

    opt.step(closure)
    assert len(computes) == 1 and graphs == [True, False, False, False]
    assert opt.last_diagnostics.retries == 2 and not opt.last_diagnostics.rejected


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_rejected_after_its_retries_changes_nothing(momentum):
    model = mlp()
    data = batches(model, 2)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, momentum=momentum, adaptive_damping=Scripted(reject=0, retries=2))
    x, y = data[0]
    opt.step(lambda: model(x) - y)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.damping.reject = 3
    x, y = data[1]
    opt.step(lambda: model(x) - y)
    assert opt.last_diagnostics.rejected and opt.last_diagnostics.retries == 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = opt.state_dict()["state"]
    for key in state:
        for name, value in state[key].items():  # tensors, and the counts (Python ints)
            assert (
                torch.equal(after[key][name], value) if isinstance(value, torch.Tensor) else after[key][name] == value
            )
    assert opt.param_groups[0]["alpha"] == pytest.approx(0.8)  # raised by each of the three
    assert opt.rejections_in_a_row == 3


def test_retries_drop_the_momentum_after_two_rejections_in_a_row():
    """The second retry follows two rejections in a row: ``phi_{t-1} = 0``, as for a new batch."""
    model = mlp()
    twin_model = copy.deepcopy(model)
    data = batches(model, 2)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, momentum=0.9, adaptive_damping=Scripted(reject=0, retries=2))
    twin = GramGaussNewton(twin_model, lam=1.0, alpha=0.1, momentum=0.9, adaptive_damping=False, metric=opt.metric)
    x, y = data[0]
    opt.step(lambda: model(x) - y)
    twin.step(lambda: twin_model(x) - y)
    opt.damping.reject = 2
    for p in twin_model.parameters():
        twin.state[p].pop("momentum_buffer")
    twin.param_groups[0]["alpha"] = 0.4
    x, y = data[1]
    opt.step(lambda: model(x) - y)
    twin.step(lambda: twin_model(x) - y)
    assert opt.last_diagnostics.retries == 2 and not opt.last_diagnostics.rejected
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_gain_ratio_retries_are_measured_and_validated():
    """With the gain-ratio rule a retry is judged by its own gain ratio; ``retries`` must be an
    int >= 0."""
    model = mlp()
    ((x, y),) = batches(model, 1)
    # reject_below=2: no step's gain ratio reaches it, so every attempt is rejected
    opt = GramGaussNewton(model, alpha=0.1, adaptive_damping=GainRatioDamping(reject_below=2.0, retries=3))
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(x) - y)
    assert opt.last_diagnostics.rejected and opt.last_diagnostics.retries == 3
    # each of the four attempts measured: gain ratios above ``high`` halved alpha four times
    assert opt.param_groups[0]["alpha"] == pytest.approx(0.1 / 2**4)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="retries"):
            GainRatioDamping(retries=bad)
