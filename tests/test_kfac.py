"""K-FAC: the preconditioned gradient against the explicit damped Kronecker formula, in float64."""

from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch import nn

from gramnewton.lab.baselines.kfac import KFAC

LR, DAMPING = 0.5, 0.1
LAYERS = {
    "linear": (lambda: nn.Linear(5, 3), (7, 5)),
    "linear-no-bias": (lambda: nn.Linear(5, 3, bias=False), (7, 5)),
    "conv": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (4, 2, 6, 5)),
}


def explicit_factors(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and G by brute force: patches sliced out of the padded input one position at a time and
    per-sample output gradients from one autograd call per sample (loss of sample i alone)."""
    b = x.shape[0]
    if isinstance(layer, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        xp = nn.functional.pad(x, (pw, pw, ph, ph))
        out = layer(x)
        rows = [
            xp[i, :, r * sh : r * sh + kh, c * sw : c * sw + kw].reshape(-1)
            for i in range(b)
            for r in range(out.shape[2])
            for c in range(out.shape[3])
        ]
        a = torch.stack(rows)
    else:
        a = x
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)
    A = a.T @ a / a.shape[0]
    G = torch.zeros(layer.weight.shape[0], layer.weight.shape[0], dtype=x.dtype)
    for i in range(b):
        s = layer(x[i : i + 1]).detach().requires_grad_(True)
        loss_i = (s.flatten(2).mean(2) - y[i]).pow(2).mean() if s.dim() == 4 else (s - y[i]).pow(2).mean()
        (g,) = torch.autograd.grad(loss_i, s)
        g = g.movedim(1, -1).reshape(-1, s.shape[1])
        G += g.T @ g / b
    return A, G


def model_loss(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = layer(x)
    f = s.flatten(2).mean(2) if s.dim() == 4 else s  # pool a conv output to (b, out)
    return (f - y).pow(2).mean()


@pytest.mark.parametrize("name", list(LAYERS))
def test_preconditioned_gradient_matches_explicit_formula(name):
    torch.manual_seed(0)
    build, shape = LAYERS[name]
    layer = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(shape[0], layer.weight.shape[0], dtype=torch.float64)
    before = [p.detach().clone() for p in layer.parameters()]
    A, G = explicit_factors(layer, x, y)
    opt = KFAC(layer, lr=LR, momentum=0.0, damping=DAMPING, kl_clip=None)  # hooks before the forward
    model_loss(layer, x, y).backward()
    grad = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        grad = torch.cat([grad, layer.bias.grad.unsqueeze(1)], 1)
    shift = DAMPING**0.5
    expected = torch.linalg.solve(
        G + shift * torch.eye(len(G), dtype=G.dtype),
        torch.linalg.solve(A + shift * torch.eye(len(A), dtype=A.dtype), grad.T).T,
    )
    opt.step()
    step = torch.cat([(b - p.detach()).reshape(p.shape[0], -1) for b, p in zip(before, layer.parameters())], 1) / LR
    torch.testing.assert_close(step, expected, rtol=1e-10, atol=1e-12)


def test_other_parameters_get_sgd_momentum_and_weight_decay():
    torch.manual_seed(0)
    scale = nn.Parameter(torch.tensor(2.0))
    model = nn.Module()
    model.scale = scale
    opt = KFAC(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    for expected_buf in (1.0 + 0.02, 0.9 * 1.02 + 1.0 + 0.01 * (2.0 - 0.1 * 1.02)):
        opt.zero_grad()
        scale.grad = torch.tensor(1.0)
        before = float(scale.detach())
        opt.step()
        assert float(scale.detach()) == pytest.approx(before - 0.1 * expected_buf)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))  # noqa: E731
    x, y = torch.randn(8, 1, 6, 6), torch.randn(8, 1)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            opt.step()

    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    opt_a = KFAC(a, inverse_every=2, factor_every=2)
    train(a, opt_a, 5)
    opt_b = KFAC(b, inverse_every=2, factor_every=2)
    train(b, opt_b, 3)
    buffer = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    c = make()
    c.load_state_dict(saved["model"])
    opt_c = KFAC(c, inverse_every=2, factor_every=2)
    opt_c.load_state_dict(saved["opt"])
    train(c, opt_c, 2)
    for pa, pc in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0)


def test_evaluation_forwards_do_not_touch_the_factors():
    model = nn.Linear(3, 1)
    opt = KFAC(model)
    with torch.no_grad():
        model(torch.randn(4, 3))
    model.eval()
    model(torch.randn(4, 3))
    assert opt._captured == {}


def test_cross_entropy_fisher_factor_is_the_sampled_output_hessian_factor():
    """``loss="cross_entropy"``: G = (1/b) sum_i g_i g_i^T with g_i = p_i - onehot(y_hat_i), y_hat_i ~ p_i;
    its expectation over y_hat is (1/b) sum_i diag(p_i) - p_i p_i^T, the cross-entropy's output Hessian."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 4, (7,))
    opt = KFAC(layer, lr=LR, damping=DAMPING, loss="cross_entropy")
    logits = layer(x)
    torch.manual_seed(1)
    opt.backward_fisher(logits)
    nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    torch.manual_seed(1)
    p = torch.softmax(logits.detach(), 1)
    sampled = torch.multinomial(torch.softmax(logits.detach().float(), 1), 1).squeeze(1)
    g = p - nn.functional.one_hot(sampled, 4).double()
    expected = g.T @ g / 7
    got = opt.state[layer.weight]["G"]
    assert float((got - expected).abs().max()) < 1e-12 * float(expected.abs().max())
    # the mean over many draws approaches the exact Fisher (a statistical check, 4000 draws)
    draws = torch.multinomial(p.float(), 4000, replacement=True)  # (7, 4000)
    onehots = nn.functional.one_hot(draws, 4).double()  # (7, 4000, 4)
    gs = p.unsqueeze(1) - onehots
    mean_g = torch.einsum("ndk,ndl->kl", gs, gs) / (7 * 4000)
    exact = (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)).mean(0)
    assert float((mean_g - exact).abs().max()) < 0.02


def test_cross_entropy_kfac_needs_the_fisher_backward():
    layer = nn.Linear(5, 3)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="Invalid loss"):
        KFAC(layer, loss="hinge")
    opt = KFAC(layer, loss="cross_entropy")
    nn.functional.cross_entropy(layer(x), y).backward()
    with pytest.raises(RuntimeError, match="backward_fisher"):
        opt.step()
    with pytest.raises(RuntimeError, match="cross_entropy"):
        KFAC(nn.Linear(2, 2)).backward_fisher(torch.zeros(1, 2))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_step_releases_its_outputs_and_graph(loss):
    """The forward hook must not keep a step's layer outputs (and through them the graph with
    its saved activations) alive: a leak of one graph per step filled 23 GiB on mnist."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = KFAC(model, loss=loss, factor_every=1, inverse_every=1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    outputs = []
    for _ in range(2):
        opt.zero_grad()
        logits = model(x)
        outputs += [weakref.ref(opt._captured[layer][0]["output"]) for layer in opt.layers]
        if loss == "cross_entropy":
            opt.backward_fisher(logits)
            nn.functional.cross_entropy(logits, y).backward()
        else:
            (logits - nn.functional.one_hot(y, 3)).pow(2).mean().backward()
        del logits
        opt.step()
    assert [ref() for ref in outputs] == [None] * len(outputs)  # freed by reference counting, no gc needed


def test_fisher_backward_of_diverged_logits_keeps_the_factors():
    """NaN logits (a diverged run) leave the factors as they were instead of raising in the
    sampling, so a benchmark records the divergence like a first-order method's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = KFAC(model, loss="cross_entropy", factor_every=1, inverse_every=1)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    logits = model(x)
    opt.backward_fisher(logits)
    nn.functional.cross_entropy(logits, y).backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    logits = model(x) * float("nan")
    opt.backward_fisher(logits)
    nn.functional.cross_entropy(logits, y).backward()
    opt.step()  # recorded as a NaN step, not an error
    after = opt.state_dict()
    assert before["state"].keys() == after["state"].keys()
    for key, state in before["state"].items():
        for name in ("A", "G", "A_inv", "G_inv"):
            if name in state:
                assert torch.equal(state[name], after["state"][key][name]), name
    assert all(not torch.isfinite(p).all() for p in model.parameters())  # the divergence shows
