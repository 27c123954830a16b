"""K-FAC as a user comparing it with GGN meets it: each layer kind, call pattern and bad input
against the damped Kronecker formula of its docstring with factors formed by brute force in
float64 (patches sliced one output position at a time, per-sample gradients one autograd call
per sample)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gramnewton.lab.baselines.kfac import KFAC

LR, DAMPING = 0.5, 0.1


def patches(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Rows ``(b*Ho*Wo, C*kh*kw)`` sliced out of the zero-padded input one position at a time."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding == "valid":
        pads = (0, 0, 0, 0)
    elif layer.padding == "same":  # torch pads the extra row/column of an even kernel at the end
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pads = (layer.padding[1], layer.padding[1], layer.padding[0], layer.padding[0])
    xp = F.pad(x, pads)
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = [
        xp[i, :, r * sh : r * sh + dh * (kh - 1) + 1 : dh, c * sw : c * sw + dw * (kw - 1) + 1 : dw].reshape(-1)
        for i in range(x.shape[0])
        for r in range(ho)
        for c in range(wo)
    ]
    return torch.stack(rows)


def brute_force_factors(model, layer, batches, loss_fn, with_bias=True):
    """``(A, G)`` of ``layer`` for the loss ``sum_j loss_fn(model(x_j), y_j)`` over ``batches``
    (micro-batches backpropagated into one step; ``loss_fn`` a mean over samples): A the mean of
    ``[a, 1] [a, 1]^T`` over every row of every call, G the sum over batches of
    ``(1/b_j) sum_i sum_t g g^T`` with ``g`` the gradient of sample ``i``'s own loss with respect to
    the layer's output at position ``t`` (every call of the layer, every position)."""
    a_rows, g_factor = [], 0
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.register_forward_hook(lambda m, inp, out: calls.append((inp[0], out)))
    try:
        for x, y in batches:
            b = x.shape[0]
            for i in range(b):
                calls.clear()
                loss_i = loss_fn(model(x[i : i + 1]), y[i : i + 1])  # sample i's own loss
                grads = torch.autograd.grad(loss_i, [out for _, out in calls])
                for (inp, _), g in zip(calls, grads):
                    if isinstance(layer, nn.Conv2d):
                        a_rows.append(patches(layer, inp.detach()))
                        g = g.movedim(1, -1)
                    else:
                        a_rows.append(inp.detach().reshape(-1, inp.shape[-1]))
                    g = g.reshape(-1, g.shape[-1])
                    g_factor = g_factor + g.T @ g / b
    finally:
        handle.remove()
    a = torch.cat(a_rows)
    if with_bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    return a.T @ a / a.shape[0], g_factor


def kfac_direction(A, G, grad):
    """``(G + sqrt(d) I)^{-1} grad (A + sqrt(d) I)^{-1}`` with explicit inverses."""
    shift = DAMPING**0.5
    eye = lambda n: torch.eye(n, dtype=A.dtype)  # noqa: E731
    return torch.linalg.inv(G + shift * eye(len(G))) @ grad @ torch.linalg.inv(A + shift * eye(len(A)))


def grad_matrix(layer, with_bias=True):
    grad = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if with_bias:
        grad = torch.cat([grad, layer.bias.grad.unsqueeze(1)], 1)
    return grad


def taken_step(before, layer, with_bias=True):
    """The direction ``(before - after) / LR`` of ``layer``'s ``[W, b]``."""
    params = [layer.weight, layer.bias] if with_bias else [layer.weight]
    return torch.cat([(b - p.detach()).reshape(p.shape[0], -1) for b, p in zip(before, params)], 1) / LR


def mse(f, y):
    return (f - y).pow(2).mean()


def check_one_step(model, layer, batches, with_bias=True):
    """One K-FAC step (lr LR, no momentum, no clipping) on the micro-batches: ``layer``'s step equals
    the formula with brute-force factors (1e-10)."""
    A, G = brute_force_factors(model, layer, batches, mse, with_bias)
    opt = KFAC(model, lr=LR, momentum=0.0, damping=DAMPING, kl_clip=None)
    for x, y in batches:
        mse(model(x), y).backward()
    expected = kfac_direction(A, G, grad_matrix(layer, with_bias))
    before = [layer.weight.detach().clone()] + ([layer.bias.detach().clone()] if with_bias else [])
    opt.step()
    torch.testing.assert_close(taken_step(before, layer, with_bias), expected, rtol=1e-10, atol=1e-12)
    return opt


@pytest.mark.parametrize("tokens", [5, 3])
def test_linear_on_sequences_counts_every_token(tokens):
    """A Linear on ``(b, T, in)`` (a token-wise layer): the tokens are positions t. Was: G of shape
    ``(T, T)``; a matmul error in step after the factors had changed (T = 5), the step silently
    25% off when ``T == out`` (T = 3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * tokens, 2)).double()
    x, y = torch.randn(6, tokens, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    check_one_step(model, model[0], [(x, y)])


class Twice(nn.Module):
    """One Linear called twice in a forward (a shared block, a weight-tied recurrence)."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_a_layer_called_twice_counts_both_calls():
    """Both calls' rows are positions of the layer (K-FAC-expand). Was: the factors of the second
    call alone for the gradient of both (step 54% off, relative norm)."""
    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    check_one_step(model, model.shared, [(x, y)])


def test_micro_batches_of_different_sizes_are_one_step():
    """Gradient accumulation over micro-batches of 5 and 3 samples (the last one smaller) before one
    step: the factors of every backpropagated call, each scaled by its batch size. Was: the last
    micro-batch's factors alone (step 117% off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batches = [(torch.randn(b, 3, dtype=torch.float64), torch.randn(b, 2, dtype=torch.float64)) for b in (5, 3)]
    check_one_step(model, model[0], batches)


def test_a_forward_between_backward_and_step_changes_nothing():
    """A training-mode forward after the backward (a metric on another batch) does not replace the
    backpropagated call. Was: the layer skipped, a plain SGD step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    twin = copy.deepcopy(model)
    for net, extra in ((model, False), (twin, True)):
        opt = KFAC(net, lr=LR, momentum=0.0, kl_clip=None)
        mse(net(x), y).backward()
        if extra:
            net(torch.randn(4, 3, dtype=torch.float64))
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_zero_grad_forgets_the_calls_whose_gradients_it_clears():
    """A backward, ``zero_grad``, then the step's own forward and backward: the factors of the
    latter only (the same step as without the first backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    twin = copy.deepcopy(model)
    for net, first in ((model, False), (twin, True)):
        opt = KFAC(net, lr=LR, momentum=0.0, kl_clip=None)
        if first:
            mse(net(2 * x), y).backward()
            opt.zero_grad()
        mse(net(x), y).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's, about speed
@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=2),
        lambda: nn.Conv2d(2, 3, 3, padding="same"),
        lambda: nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(2, 1)),
        lambda: nn.Conv2d(2, 3, 3, padding="valid", bias=False),
    ],
    ids=["stride-padding-dilation", "same", "same-even-kernel", "valid-no-bias"],
)
def test_convolutions_match_brute_force_patches(conv):
    """Stride, padding (numbers, ``"same"`` with an even kernel, ``"valid"``) and dilation. Was: a
    string padding routed to plain SGD without a word (the docstring promised zero padding; 60%
    off the K-FAC step)."""
    torch.manual_seed(0)
    layer = conv().double()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(2)).double()
    head = lambda x: model(x).mean(2)  # noqa: E731
    x, y = torch.randn(3, 2, 7, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    A, G = brute_force_factors(head, layer, [(x, y)], mse, layer.bias is not None)
    opt = KFAC(model, lr=LR, momentum=0.0, damping=DAMPING, kl_clip=None)
    assert opt.layers == [layer]
    mse(head(x), y).backward()
    expected = kfac_direction(A, G, grad_matrix(layer, layer.bias is not None))
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()
    step = taken_step(before, layer, layer.bias is not None)
    torch.testing.assert_close(step, expected, rtol=1e-10, atol=1e-12)


def test_a_frozen_bias_gives_the_weights_block():
    """A Linear whose bias is frozen: the weight's own Kronecker block (A without the bias column),
    the bias unchanged; unfrozen later, new factors with the column. Was: ``AttributeError:
    'NoneType' object has no attribute 'unsqueeze'``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    layer = model[0]
    layer.bias.requires_grad_(False)
    bias = layer.bias.detach().clone()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    opt = check_one_step(model, layer, [(x, y)], with_bias=False)
    assert torch.equal(layer.bias, bias)
    assert opt.state[layer.weight]["A"].shape == (3, 3)
    layer.bias.requires_grad_(True)  # unfrozen: factors of the new shape, from this step's batch
    A, G = brute_force_factors(model, layer, [(x, y)], mse)
    opt.zero_grad()
    mse(model(x), y).backward()
    expected = kfac_direction(A, G, grad_matrix(layer))
    before = [layer.weight.detach().clone(), layer.bias.detach().clone()]
    opt.step()
    torch.testing.assert_close(taken_step(before, layer), expected, rtol=1e-10, atol=1e-12)


def test_unbatched_input_is_a_batch_of_one():
    """A Linear called on ``(in,)``: the step of the same call on ``(1, in)``. Was: ``IndexError``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    for net, inp, target in ((model, x, y), (twin, x[None], y[None])):
        opt = KFAC(net, lr=LR, kl_clip=None)
        mse(net(inp), target).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


def test_tied_weights_get_sgd():
    """Two Linears holding one weight (its gradient sums both uses): that weight gets SGD, the
    other layers K-FAC. Was: both layers' factors averaged into one state, two K-FAC steps
    counted per step, the step of the second layer's factors applied to the sum."""
    torch.manual_seed(0)
    first, second, head = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False), nn.Linear(3, 2)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), head).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    opt = KFAC(model, lr=LR, momentum=0.0, kl_clip=None)
    assert opt.layers == [head]
    mse(model(x), y).backward()
    expected = first.weight.detach() - LR * first.weight.grad
    opt.step()
    torch.testing.assert_close(first.weight.detach(), expected, rtol=0, atol=0)
    assert "A" in opt.state[head.weight] and "A" not in opt.state[first.weight]


def test_norm_layers_and_grouped_convolutions_get_sgd():
    """BatchNorm, GroupNorm and a grouped convolution: plain SGD (momentum 0: ``p - lr * grad``),
    the convolution before them K-FAC."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.Flatten()
    ).double()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    opt = KFAC(model, lr=LR, momentum=0.0, kl_clip=None)
    assert opt.layers == [model[0]]
    mse(model(x), y).backward()
    expected = {p: p.detach() - LR * p.grad for m in model[1:] for p in m.parameters()}
    opt.step()
    for p, e in expected.items():
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


def test_running_averages_and_the_update_periods():
    """``factor_every = 2``, ``inverse_every = 3``, ``factor_decay = 0.7`` over four batches: A, G
    are ``A0``, ``0.7 A0 + 0.3 A2`` (step 3), the steps use the inverses of step 1's factors
    until step 4 inverts the averaged ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    layer = model[0]
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(4)]
    opt = KFAC(
        model, lr=LR, momentum=0.0, damping=DAMPING, kl_clip=None, factor_decay=0.7, factor_every=2, inverse_every=3
    )
    factors = []
    for k, (x, y) in enumerate(batches):
        A_k, G_k = brute_force_factors(model, layer, [(x, y)], mse)
        if k == 0:
            factors.append((A_k, G_k))
        elif k == 2:
            factors.append((0.7 * factors[0][0] + 0.3 * A_k, 0.7 * factors[0][1] + 0.3 * G_k))
        inverted = factors[0] if k < 3 else factors[1]
        opt.zero_grad()
        mse(model(x), y).backward()
        expected = kfac_direction(*inverted, grad_matrix(layer))
        before = [layer.weight.detach().clone(), layer.bias.detach().clone()]
        opt.step()
        torch.testing.assert_close(taken_step(before, layer), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[layer.weight]["A"], factors[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[layer.weight]["G"], factors[1][1], rtol=1e-12, atol=1e-14)


def test_nan_gradients_keep_the_factors():
    """A step with NaN gradients (a diverged batch) is applied, as SGD's would be, but leaves the
    factors and inverses as they were; after the parameters are restored the next steps are the
    finite K-FAC steps. Was: NaN factors for good."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    opt = KFAC(model, momentum=0.0, factor_every=1, inverse_every=1)  # (a NaN momentum buffer stays NaN)
    mse(model(x), y).backward()
    opt.step()
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    mse(model(x), y * math.nan).backward()
    opt.step()
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the divergence shows
    for key, state in saved_state["state"].items():
        for name in ("A", "G", "A_inv", "G_inv"):
            if name in state:
                assert torch.equal(state[name], opt.state_dict()["state"][key][name]), name
    model.load_state_dict(saved_model)
    opt.zero_grad()
    mse(model(x), y).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


BAD_HYPER = [
    ("lr", math.inf),
    ("lr", math.nan),
    ("damping", math.inf),
    ("weight_decay", -1.0),
    ("weight_decay", math.nan),
    ("factor_every", 2.5),
    ("factor_every", True),
    ("inverse_every", 0),
    ("kl_clip", math.nan),
    ("momentum", 1.0),
]


@pytest.mark.parametrize("name,value", BAD_HYPER)
def test_bad_hyper_parameters_are_refused(name, value):
    """At construction, and set in ``param_groups`` later: ``ValueError`` naming it, before the
    closure runs and with parameters and state unchanged. Was: ``lr=inf``, ``damping=inf``,
    negative or NaN ``weight_decay`` and float or bool periods accepted (NaN steps, a zero
    ``damping`` from ``param_groups`` an error after the factors changed)."""
    with pytest.raises(ValueError, match=f"Invalid {name} value"):
        KFAC(nn.Linear(2, 2), **{name: value})
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = KFAC(model)
    mse(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    opt.step()
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.param_groups[0][name] = value
    calls = []
    mse(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    with pytest.raises(ValueError, match=f"Invalid {name} value"):
        opt.step(lambda: calls.append(1))
    assert calls == []
    for key, value in params.items():
        assert torch.equal(model.state_dict()[key], value)
    after = opt.state_dict()["state"]
    for key, entries in state["state"].items():
        for entry, tensor in entries.items():
            assert torch.equal(after[key][entry], tensor), entry


def test_a_scheduler_may_take_the_learning_rate_to_zero():
    """torch.optim's contract: a scheduler's learning rate is the step's, down to the 0 of a cosine
    schedule's end (a step that moves nothing); ``step(closure)`` returns the closure's loss. Was:
    ``ZeroDivisionError`` in the KL clip at the last step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    opt = KFAC(model, lr=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2, eta_min=0.0)

    def closure():
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        assert opt.step(closure) is not None
        schedule.step()
    assert opt.param_groups[0]["lr"] == 0
    before = copy.deepcopy(model.state_dict())
    loss = opt.step(closure)
    torch.testing.assert_close(loss, mse(model(x), y))
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_float32_steps_as_float64():
    """A float32 model's steps (inverses in float64) within 1e-5 (relative) of the float64 ones."""
    torch.manual_seed(0)
    model64 = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    model32 = copy.deepcopy(model64).float()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    moves = []
    for model, dtype in ((model64, torch.float64), (model32, torch.float32)):
        opt = KFAC(model, lr=LR, factor_every=1, inverse_every=1)
        start = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            opt.zero_grad()
            mse(model(x.to(dtype)), y.to(dtype)).backward()
            opt.step()
        moves.append(torch.cat([(s - p.detach()).flatten().double() for s, p in zip(start, model.parameters())]))
    assert float((moves[1] - moves[0]).norm() / moves[0].norm()) < 1e-5
