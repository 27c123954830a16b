"""Recurrent layers, mixed precision, the general-loss step and ``convert_batchnorm``: each case
checked in float64 against a dense ``torch.func.jacrev`` Jacobian (or the dense formula), or for
its clear refusal (the forty-seventh session's audit)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from dense import assert_close, cpu_only
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gramnewton
from gramnewton import GramGaussNewton
from gramnewton.engines import HooksEngine, ReferenceEngine, recurrent
from gramnewton.losses import get_loss

Forward = Callable[[nn.Module, Tensor], Tensor]


class Head(nn.Module):
    """A recurrent module ``rnn`` and a Linear head on ``width`` features, run by ``forward_fn``."""

    def __init__(self, rnn: nn.Module, width: int, forward_fn: Forward) -> None:
        super().__init__()
        self.rnn, self.head, self.forward_fn = rnn, nn.Linear(width, 2), forward_fn

    def forward(self, x: Tensor, *state: Any) -> Tensor:
        return self.forward_fn(self, x, *state)


def _h(state: Tensor | tuple[Tensor, ...]) -> Tensor:
    return state[0] if isinstance(state, tuple) else state


def dense_jacobian(model: nn.Module, run: Callable[[Callable[..., Any]], Tensor]) -> Tensor:
    """``(b*k, m)`` Jacobian by jacrev of ``run(call)``, ``call(*args)`` the model at the
    differentiated parameters; columns in ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    values = {n: p.detach() for n, p in model.named_parameters()}
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN refuses functorch's tensors
        jac = jacrev(lambda v: run(lambda *args: functional_call(model, v, args)).reshape(-1))(values)
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], 1)


def hooks_gram(model: nn.Module, closure: Callable[[], Tensor]) -> tuple[Tensor, list[str]]:
    """The hooks engine's Gram and the reasons of its routing warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gram = HooksEngine(model, list(model.parameters())).compute(closure).gram
    return gram, [str(w.message) for w in caught if "reference engine" in str(w.message)]


def check_gram(model: nn.Module, x: Tensor, routed: bool = False) -> None:
    """The hooks engine's Gram of ``model(x)`` equals jacrev's (1e-10), routed or not as said."""
    gram, reasons = hooks_gram(model, lambda: model(x))
    jac = dense_jacobian(model, lambda call: call(x))
    assert_close(gram, jac @ jac.T, 1e-10, "hooks Gram vs jacrev")
    assert bool(reasons) == routed, reasons


def last_output(self: Head, x: Tensor) -> Tensor:
    out, state = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
    last = out[:, -1] if self.rnn.batch_first else out[-1]
    return torch.cat([self.head(last), _h(state).sum(0)], 1)  # every output and the final states


# (kind, layers, bidirectional, batch_first, bias): each option in both settings for each kind
LAYOUTS = [
    ("RNN", 2, True, False, False),
    ("RNN", 1, False, True, True),
    ("GRU", 2, False, False, True),
    ("GRU", 1, True, True, False),
    ("LSTM", 2, True, True, True),
    ("LSTM", 1, False, False, False),
]


@pytest.mark.parametrize("kind,layers,bidirectional,batch_first,bias", LAYOUTS)
def test_recurrent_layers_give_jacrevs_gram_from_their_own_rows(
    kind: str, layers: int, bidirectional: bool, batch_first: bool, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RNN/GRU/LSTM, 1-2 layers, one or two directions, either layout, with and without bias,
    a head on the last output and every final state: their rows from the recurrence run again
    (never the general way), the Gram jacrev's."""
    monkeypatch.setattr(recurrent, "_autograd_rows", lambda module, *a: pytest.fail(f"{module} took the general way"))
    torch.manual_seed(0)
    rnn = getattr(nn, kind)(3, 5, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    model = Head(rnn, 5 * (1 + bidirectional), last_output).double()
    check_gram(model, torch.randn(4, 3, 3, dtype=torch.float64))


def sequence_length_one(self: Head, x: Tensor) -> Tensor:
    return self.head(self.rnn(x[:, :1])[0][:, -1])


def hidden_state_as_keyword(self: Head, x: Tensor) -> Tensor:
    _, state = self.rnn(x[:, :2])
    return self.head(self.rnn(input=x[:, 2:], hx=state)[0][:, -1])


def packed(self: Head, x: Tensor) -> Tensor:
    lengths = torch.tensor([3, 1, 2, 3], device="cpu")  # torch wants them on the CPU, whatever the device
    out, state = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return self.head(out.sum(1) + _h(state)[-1])


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize(
    "forward_fn,routed", [(sequence_length_one, False), (hidden_state_as_keyword, False), (packed, True)]
)
def test_recurrent_calls_of_every_shape_give_jacrevs_gram(kind: str, forward_fn: Forward, routed: bool) -> None:
    """Sequence length 1; the final state of one call passed (``hx=``) to the next in the same
    closure; dropout between two layers in eval mode; a packed batch of unequal lengths (its
    outputs have no batch dimension: routed to the reference engine, exact)."""
    torch.manual_seed(0)
    rnn = getattr(nn, kind)(3, 5, num_layers=2, dropout=0.5, batch_first=True).eval()
    model = Head(rnn, 5, forward_fn).double()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN has no backward in eval mode (a GPU's)
        check_calls(model, x, forward_fn, routed)


def check_calls(model: nn.Module, x: Tensor, forward_fn: Forward, routed: bool) -> None:
    """The hooks engine's Gram of ``model(x)``: jacrev's, or for a packed batch (routed) the
    reference engine's."""
    if forward_fn is packed:  # jacrev cannot run a packed sequence: the reference engine's rows are dense autograd's
        gram, reasons = hooks_gram(model, lambda: model(x))
        reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x)).gram
        assert_close(gram, reference, 1e-10, "packed: hooks vs reference")
        assert reasons
        return
    check_gram(model, x, routed)


def with_state(self: Head, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
    out, state = self.rnn(x, state)
    return self.head(out[:, -1]), state


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "LSTMCell"])
def test_a_state_from_the_previous_batch_not_detached_gives_the_total_derivative(kind: str) -> None:
    """Truncated backpropagation through time without the ``detach()``: the residuals depend on
    the parameters through the previous batch's graph as well, and the Gram is that of the total
    derivative (the reference engine's). The path through an LSTM's state tuple ``(h, c)`` had
    been taken for the layer's own: the Gram of the current batch alone, 2.7% off (an LSTMCell's
    2.9%), no warning."""
    torch.manual_seed(0)
    cell = kind == "LSTMCell"

    def run(self: Head, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        if not cell:
            return with_state(self, x, state)
        for t in range(x.shape[1]):
            state = self.rnn(x[:, t], state)
        return self.head(state[0]), state

    rnn = nn.LSTMCell(3, 5) if cell else getattr(nn, kind)(3, 5, batch_first=True)
    model = Head(rnn, 5, run).double()
    first, second = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _, state = model(first)  # the previous batch's state, its graph kept
    gram, reasons = hooks_gram(model, lambda: model(second, state)[0])
    jac = dense_jacobian(model, lambda call: call(second, call(first)[1])[0])
    assert_close(gram, jac @ jac.T, 1e-10, "hooks Gram vs the total derivative")


def test_a_detached_state_from_the_previous_batch_gives_this_batchs_gram() -> None:
    """The same with ``detach()``: the Gram of this batch's Jacobian alone, on the hooks engine."""
    torch.manual_seed(0)
    model = Head(nn.LSTM(3, 5, batch_first=True), 5, with_state).double()
    first, second = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    state = tuple(t.detach() for t in model(first)[1])
    gram, reasons = hooks_gram(model, lambda: model(second, state)[0])
    jac = dense_jacobian(model, lambda call: call(second, state)[0])
    assert_close(gram, jac @ jac.T, 1e-10, "hooks Gram vs jacrev")
    assert not reasons


def chained_calls(self: Head, x: Tensor) -> Tensor:
    _, state = self.rnn(x[:, :2])
    return self.head(_h(self.rnn(x[:, 2:], state)[0][:, -1]))


@pytest.mark.parametrize(
    "kind,options",
    [
        ("GRU", {"num_layers": 2, "dropout": 0.3}),
        ("RNN", {"num_layers": 2, "dropout": 0.3}),
        ("LSTM", {"proj_size": 2}),
    ],
)
def test_a_state_passed_between_calls_the_general_way_is_counted_once(kind: str, options: dict) -> None:
    """A layer the run again does not cover (dropout between layers in training, ``proj_size``)
    takes its rows through its recorded graph; called twice with the first call's state passed
    to the second, the second call's backward had run on into the first call: its rows counted
    twice (Gram 15%, 37%, 2.1% off the reference engine's, no warning)."""
    torch.manual_seed(0)
    width = options.get("proj_size", 5)
    model = Head(getattr(nn, kind)(3, 5, batch_first=True, **options), width, chained_calls).double().train()
    data = torch.randn(4, 4, 3, dtype=torch.float64)
    torch.manual_seed(1)  # the same dropout masks in both engines' forward passes
    gram, _ = hooks_gram(model, lambda: model(data))
    torch.manual_seed(1)
    reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(data)).gram
    assert_close(gram, reference, 1e-10, "hooks vs reference")


class Gate(nn.Module):
    """A module without a handler: ``tanh(w * h + h / 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(h * self.w + 0.1 * h)


class Stepped(nn.Module):
    """A Linear, :class:`Gate` applied three times to its own output, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.gate, self.head = nn.Linear(3, 5), Gate(), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)
        for _ in range(3):
            h = self.gate(h)
        return self.head(h)


def test_a_module_without_a_handler_applied_to_its_own_output_is_counted_once() -> None:
    """The simplest recurrence, a handlerless module stepped on its own output: each call's rows
    are its own operations' (was: each call's backward ran on through the earlier calls, a Gram
    44% off, no warning)."""
    torch.manual_seed(0)
    model = Stepped().double()
    check_gram(model, torch.randn(4, 3, dtype=torch.float64))


class CellLoop(nn.Module):
    """A cell stepped over the sequence, a Linear head on its last ``h``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell, self.head = getattr(nn, kind)(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(_h(state))


def under_autocast(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    return closure


def _lstm_cell_math(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor):
    """PyTorch's LSTMCell formulas; ``h'`` from a second computation of ``c'``, not from the
    returned tensor (as a fused kernel, which computes both at once)."""
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, 1)
    new_c = lambda: torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # noqa: E731
    return torch.sigmoid(o) * torch.tanh(new_c()), new_c()


class FusedLSTMCell(torch.autograd.Function):
    """CUDA's fused LSTMCell kernel (``_thnn_fused_lstm_cell``) on the CPU: ``h'`` and ``c'`` are
    the two outputs of one autograd node, and the gradient arriving at ``c'`` is its consumers'
    alone (on the CPU's kernel ``h'`` is computed from ``c'``, whose gradient then holds that path)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return _lstm_cell_math(x, h, c, w_ih, w_hh, b_ih, b_hh)

    @staticmethod
    def backward(ctx, grad_h, grad_c):  # noqa: ANN001, ANN205
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = _lstm_cell_math(*inputs)
        return torch.autograd.grad(outputs, inputs, (grad_h, grad_c))


class KernelVF:
    """``torch._VF`` with ``lstm_cell`` replaced by ``cell(x, h, c, w_ih, w_hh, b_ih, b_hh)``."""

    def __init__(self, cell: Callable[..., tuple[Tensor, Tensor]]) -> None:
        self.cell = cell

    def lstm_cell(self, x: Tensor, hx: tuple[Tensor, Tensor], *weights: Tensor) -> tuple[Tensor, Tensor]:
        return self.cell(x, *hx, *weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch._VF, name)


def test_an_lstm_cell_with_cudas_fused_kernel_gives_jacrevs_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU an LSTMCell's ``h'`` and ``c'`` come from one fused node: the handler took the
    gradient at ``c'`` as holding the path through ``h'`` (true of the CPU's kernel only) and
    counted that path zero times, a Gram 10.5% off on an H200 (the forty-eighth session's GPU
    check; 6.5% here). The fused kernel emulated on the CPU: the Gram of the plain cell's jacrev."""
    torch.manual_seed(0)
    model = CellLoop("LSTMCell").double()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    jac = dense_jacobian(model, lambda call: call(x))
    monkeypatch.setattr(torch.nn.modules.rnn, "_VF", KernelVF(FusedLSTMCell.apply))
    gram, reasons = hooks_gram(model, lambda: model(x))
    assert_close(gram, jac @ jac.T, 1e-10, "hooks Gram (fused cell) vs jacrev")
    assert not reasons
    reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x)).gram
    assert_close(reference, jac @ jac.T, 1e-10, "reference Gram (fused cell) vs jacrev")


def test_an_lstm_cell_from_an_unknown_kernel_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel whose ``h'`` is neither computed from the returned ``c'`` nor its sibling: the
    engine cannot tell which gradients arrive, so the step is refused, nothing changed."""
    torch.manual_seed(0)
    model = CellLoop("LSTMCell").double()
    x, y = torch.randn(6, 3, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    monkeypatch.setattr(torch.nn.modules.rnn, "_VF", KernelVF(_lstm_cell_math))
    before = copy.deepcopy(model.state_dict())
    opt = GramGaussNewton(model, engine="hooks")
    with pytest.raises(RuntimeError, match=r"neither outputs of one autograd node.*engine='reference'"):
        opt.step(lambda: model(x) - y)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@cpu_only("torch.autocast('cpu') leaves a GPU's tensors alone")
def test_an_lstm_cell_under_autocast_is_refused_with_the_reason() -> None:
    """Under CPU autocast an LSTMCell computes its gates in bfloat16 but returns float32 states,
    so the engine cannot tell it from a float32 call, and its run again in float32 differs: the
    refusal names autocast and the way out (was: "changed in place after the call", which the
    user had not done); the optimizer's step changes nothing."""
    torch.manual_seed(0)
    model = CellLoop("LSTMCell")
    data, target = torch.randn(6, 3, 3), torch.randn(6, 2)
    before = copy.deepcopy(model.state_dict())
    opt = GramGaussNewton(model, engine="hooks")
    with pytest.raises(RuntimeError, match=r"ran under torch\.autocast.*engine='reference'"):
        opt.step(lambda: under_autocast(model, data)() - target)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not opt.state


@cpu_only("torch.autocast('cpu') leaves a GPU's tensors alone")
def test_a_gru_cell_loop_under_autocast_gives_autograds_gram() -> None:
    """A GRUCell under autocast (bfloat16 gates, float32 states: not reproduced by the run again)
    takes the general way, one call at a time: its rows then agree with the reference engine's to
    bfloat16's precision (was: each call's backward ran on into the earlier calls, 80% off)."""
    torch.manual_seed(0)
    model = CellLoop("GRUCell")
    closure = under_autocast(model, torch.randn(6, 3, 3))
    gram, _ = hooks_gram(model, closure)
    reference = ReferenceEngine(list(model.parameters())).compute(closure).gram
    assert_close(gram, reference, 1e-2, "hooks vs reference under autocast")


@cpu_only("torch.autocast('cpu') leaves a GPU's tensors alone")
@pytest.mark.parametrize("engine", ["hooks", "reference"])
def test_a_step_inside_autocast_is_refused_and_changes_nothing(engine: str) -> None:
    """``with torch.autocast(...): opt.step(closure)`` ran the solve, the direction and the update
    in bfloat16 too (the hooks engine's first step rejected, nothing learnt; the reference
    engine's direction in bfloat16): refused, with the closure-side fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    data, target = torch.randn(8, 3), torch.randn(8, 1)
    before = copy.deepcopy(model.state_dict())
    opt = GramGaussNewton(model, engine=engine)
    with pytest.raises(ValueError, match="inside torch.autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: model(data) - target)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_top_c_with_all_but_one_output_is_the_exact_step_when_a_gradient_is_zero() -> None:
    """``top_c = k - 1`` promises the exact curvature. The last coordinate's column was ``g_i``
    there, normalised: zero where that output's gradient is zero (a target predicted exactly),
    which dropped its curvature: a step 4.6% off the exact one. Now every unit vector: equal to
    the dense ``-(lam J^T H J + alpha I)^{-1} J^T g`` (1e-10)."""
    torch.manual_seed(0)
    b, k = 5, 4
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, k)).double()
    data = torch.randn(b, 3, dtype=torch.float64)
    with torch.no_grad():
        logits = model(data)
    targets = (torch.rand(b, k, dtype=torch.float64) > 0.5).double()
    targets[:, 0] = torch.sigmoid(logits[:, 0])  # a zero gradient on output 0: outside the top 3
    loss = get_loss("binary_cross_entropy")
    total = lambda f: loss.per_sample(f, targets).sum()  # noqa: E731
    jac = dense_jacobian(model, lambda call: call(data))
    g, h = torch.func.grad(total)(logits).reshape(-1), hessian(total)(logits).reshape(b * k, b * k)
    m = jac.shape[1]
    expected = -torch.linalg.solve(2.0 * jac.T @ h @ jac + 0.5 * torch.eye(m, dtype=jac.dtype), jac.T @ g)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = GramGaussNewton(
        model, lam=2.0, alpha=0.5, momentum=0.0, adaptive_damping=False, loss=loss, curvature="top_c", top_c=k - 1
    )
    opt.step(lambda: (model(data), targets))
    step = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    assert_close(step, expected, 1e-10, "top_c = k - 1 vs the exact dense step")


def test_convert_batchnorm_replaces_every_use_of_a_shared_batchnorm() -> None:
    """One BatchNorm used twice in a Sequential: ``named_children`` lists it once, and its second
    use had stayed a BatchNorm (training mode, samples coupled); now one GroupNorm in both places
    (its parameters shared, as the BatchNorm's were), also across two parents."""
    norm = nn.BatchNorm2d(8)
    branch = nn.Sequential(nn.Conv2d(8, 8, 1), norm)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), norm, nn.Conv2d(8, 8, 1), norm, branch)
    gramnewton.convert_batchnorm(model)
    assert type(model[1]) is nn.GroupNorm
    assert model[1] is model[3] is branch[1]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_convert_batchnorm_keeps_a_frozen_scale_frozen() -> None:
    """A BatchNorm whose affine parameters do not require grad (frozen by the user) becomes a
    GroupNorm with frozen ones (was: trainable, so the optimizer trained what had been frozen)."""
    norm = nn.BatchNorm2d(4)
    norm.weight.requires_grad_(False)
    converted = gramnewton.convert_batchnorm(nn.Sequential(norm))[0]
    assert not converted.weight.requires_grad and converted.bias.requires_grad


def test_a_batchnorm1d_left_with_one_channel_per_group_is_converted_with_a_warning() -> None:
    """``BatchNorm1d(4)`` with ``groups=8`` became ``GroupNorm(4, 4)`` silently: on ``(b, C)``
    features each group is one number, so the layer returned its bias whatever the input."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.warns(UserWarning, match=r"BatchNorm1d\(4\) becomes GroupNorm\(4, 4\).*LayerNorm\(4\)") as record:
        gramnewton.convert_batchnorm(model, groups=8)
    assert record[0].filename == __file__  # points at the caller's line
    x = torch.randn(5, 3)
    # what the warning says: the bias, up to the round-off of x - mean(x) over one number (/ sqrt(eps))
    assert torch.allclose(model[1](model[0](x)), model[1].bias.expand(5, 4), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # more than one channel per group, or a 2-D norm: no warning
        gramnewton.convert_batchnorm(nn.Sequential(nn.BatchNorm1d(16), nn.BatchNorm2d(4)), groups=8)
