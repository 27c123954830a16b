"""A module that keeps state on itself between calls, and the functional engine's size check: each
case checked in float64 against a dense ``torch.func.jacrev`` Jacobian of the whole residual
function, or for its clear refusal (the forty-seventh session's audit)."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from typing import Any

import pytest
import torch
from dense import assert_close
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from gramnewton import GramGaussNewton
from gramnewton.engines import FunctionalEngine, FunctionalResidual, HooksEngine, Term, base, functional

D = torch.float64


class KeepsOutput(nn.Module):
    """``self.h = tanh(x w + h / 2)``, returned: the next call reads this call's output."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.h: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.h = torch.tanh(x * self.w + (0 if self.h is None else 0.5 * self.h))
        return self.h


class KeepsLinearOutput(nn.Module):
    """The brief's gate: ``self.h = tanh(lin(x) + w * h)``, a hooked Linear called inside."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.w = nn.Linear(5, 5), nn.Parameter(torch.linspace(-0.5, 0.7, 5))
        self.h: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.h = torch.tanh(self.lin(x) + (0 if self.h is None else self.w * self.h))
        return self.h


class KeepsDerived(nn.Module):
    """Keeps ``2 * out``, computed from its output: the next call reaches the output through it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.s: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = torch.tanh(x * self.w + (0 if self.s is None else 0.25 * self.s))
        self.s = 2 * out
        return out


class KeepsInternal(nn.Module):
    """Keeps its pre-activation ``c``, no output: the paths through it are this call's alone
    (none of the earlier call's rows, taken from its output, holds them)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.c: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.c = x * self.w + (0 if self.c is None else 0.5 * self.c)
        return torch.tanh(self.c)


class KeepsOneOfTwo(nn.Module):
    """Returns ``(h, x v)`` and keeps ``h``: two outputs, the kept one read by the next call."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.v = nn.Parameter(torch.linspace(0.5, 1.5, 5)), nn.Parameter(torch.linspace(-1, 1, 5))
        self.h: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.h = torch.tanh(x * self.w + (0 if self.h is None else 0.5 * self.h))
        return self.h, x * self.v


def _first(out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    return out[0] + out[1] if isinstance(out, tuple) else out


class Host(nn.Module):
    """``head(cell(cell(cell(a(x)))))``-like: the cell called ``calls`` times on the same input,
    its state reset at the start of each forward."""

    def __init__(self, cell: nn.Module, calls: int = 3) -> None:
        super().__init__()
        self.a, self.cell, self.head, self.calls = nn.Linear(3, 5), cell, nn.Linear(5, 2), calls

    def forward(self, x: Tensor) -> Tensor:
        for name in ("h", "s", "c"):
            if hasattr(self.cell, name):
                setattr(self.cell, name, None)
        z = torch.tanh(self.a(x))
        outs = [_first(self.cell(z)) for _ in range(self.calls)]
        return self.head(outs[-1] + 0.1 * outs[0])


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """``(b*k, m)`` Jacobian of ``model(x)`` by jacrev, columns in ``model.parameters()`` order."""
    values = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda v: functional_call(model, v, (x,)).reshape(-1))(values)
    return torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in values], 1)


CELLS = {
    "output_kept": KeepsOutput,
    "output_kept_around_a_linear": KeepsLinearOutput,
    "value_computed_from_the_output_kept": KeepsDerived,
    "one_of_two_outputs_kept": KeepsOneOfTwo,
    "pre_activation_kept": KeepsInternal,
}


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_state_kept_on_the_module_is_counted_once(cell: str) -> None:
    """A handlerless module whose next call reads what it kept on itself (``self.h``, no argument)
    is exact on the hooks engine, not routed: its rows through the recorded graph stop at its
    earlier calls' outputs, whose own rows hold the paths through them. They were counted in both
    calls' rows: Gram 0.3-1% off, silently (``pre_activation_kept``, no output kept, was exact and
    stays so)."""
    torch.manual_seed(0)
    model = Host(CELLS[cell]()).to(D)
    x = torch.randn(4, 3, dtype=D)
    jac = dense_jacobian(model, x)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter routed to the reference engine
        system = HooksEngine(model, params).compute(lambda: model(x))
    assert_close(system.gram, jac @ jac.T, 1e-10, "Gram")
    v = torch.randn(jac.shape[0], dtype=D)
    assert_close(torch.cat([t.reshape(-1) for t in system.jt_times(v)]), jac.T @ v, 1e-10, "J^T v")


class KeepsBoth(nn.Module):
    """Keeps its pre-activation ``c`` and its output ``h``; the next call reads ``h``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.c: Tensor | None = None
        self.h: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.c = x * self.w + (0 if self.h is None else 0.5 * self.h)
        self.h = torch.tanh(self.c)
        return self.h


class PassesTheKeptValue(nn.Module):
    """``cell(z)``, then ``cell(cell.c)`` (the first call's pre-activation as the argument), then
    ``cell(z)``: the residuals reach the second call's output only through the third call's
    ``self.h``, and beyond the second call's argument ``c`` lies the first call's use of ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.cell, self.head = nn.Linear(3, 5), KeepsBoth(), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.cell.c = self.cell.h = None
        z = torch.tanh(self.a(x))
        self.cell(z)
        self.cell(self.cell.c)
        return self.head(self.cell(z))


def test_a_path_through_a_kept_state_and_out_of_the_earlier_calls_argument_is_routed() -> None:
    """The third call's rows stop at the second call's output (kept on the module), the second's at
    its argument ``c``, and ``c`` is no output of the first call: the path residuals -> h_3 -> h_2 ->
    c_1 -> w is in no call's rows. The locality walk sees the path leave the second call's region
    through its input and routes ``w`` (the others stay); the Gram equals jacrev's. (It was 0.96%
    off, the path through h_2 counted twice; with the cut alone, the walk not told of it, 0.54%.)"""
    torch.manual_seed(0)
    model = PassesTheKeptValue().to(D)
    x = torch.randn(4, 3, dtype=D)
    jac = dense_jacobian(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        system = HooksEngine(model, list(model.parameters())).compute(lambda: model(x))
    reasons = [str(w.message) for w in caught if "reference engine" in str(w.message)]
    assert len(reasons) == 1 and "1 parameter tensor(s)" in reasons[0] and "bypasses its module's output" in reasons[0]
    assert_close(system.gram, jac @ jac.T, 1e-10, "Gram")


class Counted(nn.Module):
    """A learned per-feature scale that counts its calls and keeps its last output on itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.calls = 0
        self.h: Tensor | None = None  # never read (the test resets it as KeepsOutput's)
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.last = torch.tanh(x * self.w)
        return self.last


@pytest.mark.parametrize("cell", ["counted", "output_kept"])
def test_rows_run_again_leave_the_modules_attributes_as_the_forward_left_them(cell: str) -> None:
    """The rows of a handlerless module are first tried by running it again on each sample
    (``torch.func``), which runs its Python code again: ``self.calls += 1`` counted every step twice
    and ``self.last = ...`` / ``self.h = ...`` was left holding a ``vmap`` tensor of that run
    (``torch.allclose`` on it: "vmap over torch.allclose isn't supported"; a state carried to the
    next step would have been that tensor). The attributes are now as the forward left them."""
    torch.manual_seed(0)
    inner = Counted() if cell == "counted" else KeepsOutput()
    model = nn.Sequential(nn.Linear(3, 5), inner, nn.Linear(5, 2)).to(D)
    x = torch.randn(4, 3, dtype=D)
    jac = dense_jacobian(model, x)
    inner.calls, inner.h, inner.last = 0, None, None  # as jacrev's run left them: its own tensors
    kept: list[Tensor] = []

    def closure() -> Tensor:
        out = model(x)
        kept.append(inner.last if cell == "counted" else inner.h)
        return out

    system = HooksEngine(model, list(model.parameters())).compute(closure)
    assert_close(system.gram, jac @ jac.T, 1e-10, "Gram")
    state = inner.last if cell == "counted" else inner.h
    assert state is kept[0]
    assert torch.allclose(state, kept[0])
    assert len(kept) == 1 and (cell != "counted" or inner.calls == 1)


class Carried(nn.Module):
    """``self.h = tanh(x w + h_prev / 2)`` with ``h_prev`` the last forward's, detached (a state
    carried between steps, truncated back-propagation)."""

    def __init__(self, b: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.h = torch.zeros(b, 5)

    def forward(self, x: Tensor) -> Tensor:
        self.h = torch.tanh(x * self.w + 0.5 * self.h.detach().to(x))
        return self.h


def test_a_state_carried_between_steps_steps_as_the_dense_formula() -> None:
    """A model carrying a detached state from one forward to the next stepped on the default
    engine: the first step died ("your tensor may have escaped from inside a function being
    vmapped"), the state left by the rows' run again read by the step's next forward. Now each
    step is the dense formula ``-J^T (lam G + alpha I)^{-1} r`` at the state the step's forward
    read (jacrev on a copy), to 1e-10."""
    torch.manual_seed(0)
    cell = Carried(4)
    model = nn.Sequential(nn.Linear(3, 5), cell, nn.Linear(5, 2)).to(D)
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, momentum=0.0, adaptive_damping=False, metric=None)
    for _ in range(3):
        cell.h = cell.h.detach()  # as the forward reads it; a deepcopy refuses a tensor with a graph
        twin = copy.deepcopy(model)
        r = (twin(x) - y).detach().reshape(-1)
        twin[1].h = cell.h  # jacrev's forward reads the state the step's forward reads
        jac = dense_jacobian(twin, x)
        before = [p.detach().clone() for p in model.parameters()]
        step = -jac.T @ torch.linalg.solve(jac @ jac.T + 1e-3 * torch.eye(len(r), dtype=D), r)
        opt.step(lambda: model(x) - y)
        moved = torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), before)])
        assert_close(moved, step, 1e-10, "step")
        assert type(cell.h) is Tensor and torch.isfinite(cell.h).all()


class KeepsLast(nn.Module):
    """A network that keeps its last output on itself (``self.last = out``, graph and all)."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.last = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)), None

    def forward(self, x: Tensor) -> Tensor:
        self.last = self.net(x)
        return self.last


def _stepped(model: nn.Module) -> weakref.ref:
    """A weak reference to ``model`` after one step with a fixed ``alpha``, nothing else holding it."""
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    opt = GramGaussNewton(model, lam=1.0, alpha=1e-3, momentum=0.0, adaptive_damping=False, metric=None)
    opt.step(lambda: model(x) - y)
    return weakref.ref(model)


@pytest.mark.parametrize("model_cls", [KeepsLast, lambda: Host(KeepsOutput())], ids=["last_output", "kept_state"])
def test_a_dropped_model_that_keeps_a_tensor_of_the_forward_is_freed(model_cls: Any) -> None:
    """A model that keeps a tensor of the step's forward on itself keeps that tensor's graph, whose
    nodes held the engine's hooks, the hooks the engine and the engine the model: a cycle through
    C++ that Python's collector cannot see, so a dropped model, its engine and the step's graph
    (activations) were never freed (a sweep over models, a stateful gate; with a fixed ``alpha``
    the step's last forward is the engine's). The engine removes its hooks at the step's end."""
    gone = _stepped(model_cls().to(D))
    gc.collect()
    assert gone() is None


# --- the functional engine's size check ---------------------------------------------------------


def _poisson_like() -> tuple[nn.Module, FunctionalResidual]:
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).to(D)
    params = dict(model.named_parameters())

    def fn(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x,))

    closure = FunctionalResidual(
        params, Term(fn, (torch.randn(16, 2, dtype=D),)), Term(fn, (torch.randn(8, 2, dtype=D),))
    )
    return model, closure


@pytest.mark.parametrize("solve_space", ["sample", "parameter"])
def test_the_functional_engines_jacobian_larger_than_the_machine_is_refused(
    solve_space: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The functional engine formed its whole dense ``(b*k, m)`` ``J`` by ``vmap`` unchecked (a
    machine too small: the allocator's error or the process killed). It now refuses as the
    reference engine does, with the sizes, once its first chunk of samples (4 of 24 here) gives the
    outputs per sample: before any other chunk is formed; nothing changed. (The machine is made
    8 KiB small: ``J`` is 72 x 51 float64 entries, 29 KiB.)"""
    torch.manual_seed(0)
    model, closure = _poisson_like()
    formed: list[int] = []
    monkeypatch.setattr(functional, "jacrev", lambda *a, **k: formed.append(1) or jacrev(*a, **k))
    monkeypatch.setattr(base, "device_memory", lambda device: 8 * 1024)
    engine = FunctionalEngine(list(model.parameters()), chunk_size=4)
    opt = GramGaussNewton(model, engine=engine, solve_space=solve_space)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the dense Jacobian of 72 x 51 entries \(b = 24 samples x k = 3 residuals"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state
    assert len(formed) == 1  # one chunk's Jacobian of six


def test_the_functional_engines_gram_larger_than_the_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``J`` that fits with a Gram matrix that does not (72 x 72 entries, 41 KiB, against a
    machine of 36 KiB) is refused before the Gram is formed; without a Gram (``form_gram`` False)
    the same ``J`` is formed, and equals jacrev's."""
    torch.manual_seed(0)
    model, closure = _poisson_like()
    monkeypatch.setattr(base, "device_memory", lambda device: 36 * 1024)
    engine = FunctionalEngine(list(model.parameters()))
    with pytest.raises(ValueError, match=r"the Gram matrix of 72 x 72 entries"):
        engine.compute(closure)
    system = engine.compute(closure, form_gram=lambda rows: False)
    assert system.gram is None
    values = {n: p.detach() for n, p in model.named_parameters()}
    inputs = [t.inputs[0] for t in closure.terms]
    jac = jacrev(lambda v: torch.cat([functional_call(model, v, (x,)) for x in inputs]).reshape(-1))(values)
    dense = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in values], 1)
    assert_close(system.jacobian_columns(0, dense.shape[1]), dense, 1e-12, "J")
