"""Recurrent layers (``nn.RNN``, ``nn.GRU``, ``nn.LSTM``) for the hooks engine: rows from factors.

A recurrent layer's fused kernel exposes no time step, so no hook sees the gradients inside it.
Its per-sample gradients are sums over the ``T`` steps: with ``gi_t = x_t W_ih^T + b_ih`` and
``gh_t = h_{t-1} W_hh^T + b_hh`` (``(n, G H)`` each, ``G`` gates: 1 for ``RNN``, 3 for ``GRU``, 4
for ``LSTM``), row ``r`` of ``J`` for ``W_ih`` is ``sum_t dgi_rt x_rt^T`` and for ``W_hh``
``sum_t dgh_rt h_r,t-1^T``, where ``dgi_t``, ``dgh_t`` are the gradients at ``gi_t``, ``gh_t``
(they differ for ``GRU``, whose hidden part of the new gate is scaled by the reset gate). So each
weight is a projection applied at ``T`` positions, a :class:`.handlers.Factored` piece like a
Linear's on a sequence.

:func:`_recurrent_rows` runs the recurrence again at the batch (``n = b k`` rows) from the
recorded input and initial state, one time step at a time with the layer's own formulas, and one
backward pass from the rows' output gradients gives every ``dgi_t`` and ``dgh_t`` (autograd's
gradients at the pre-activations themselves). Samples are independent, so row ``r``'s gradients are
its own. The run must reproduce the recorded outputs (to ``sqrt(eps)`` of their dtype), else the
general way (:func:`.handlers._autograd_rows`, through the recorded graph: a layer backward per
row) is taken, as it is for what this does not cover: projections (``proj_size``), dropout between
layers in training, autocast. Packed sequences and unbatched inputs, whose outputs do not have the
batch in the dimension the layer's type fixes, never reach it: the engine's batch check sends
them to the reference engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .handlers import (
    OutputGrads,
    Piece,
    RecordedCall,
    _autograd_rows,
    _projection_pieces,
    fixed_names,
    register_handler,
)

GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def _cell(
    mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None, chained: bool = True
) -> tuple[Tensor, Tensor | None]:
    """One time step of ``mode`` (``module.mode``) from the pre-activations ``gi``, ``gh``
    ``(n, G H)`` and the state ``h`` (and ``c``) ``(n, H)``: PyTorch's formulas (torch.nn docs).
    ``chained=False``: an LSTM's new ``h`` is differentiated through its output gate only, its
    new ``c`` taken as a constant there (:func:`_cell_rows`)."""
    if mode == "GRU":
        ir, iz, i_new = gi.chunk(3, 1)
        hr, hz, h_new = gh.chunk(3, 1)
        reset, update = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        new = torch.tanh(i_new + reset * h_new)
        return (1 - update) * new + update * h, None
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c if chained else c.detach()), c
    return (torch.tanh if mode == "RNN_TANH" else torch.relu)(gi + gh), None


def _arguments(call: RecordedCall) -> tuple[object, object, object, bool]:
    """A recurrent module's call ``(input, hx)``: its input, initial ``h`` and ``c`` (``None`` where
    not given, or no LSTM), and whether nothing else was passed."""
    args, kwargs = list(call.args), dict(call.kwargs)
    x = args[0] if args else kwargs.pop("input", None)
    hx = args[1] if len(args) > 1 else kwargs.pop("hx", None)
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    return x, h0, c0, len(args) <= 2 and not kwargs


def _runs_again(module: nn.Module, call: RecordedCall, g: OutputGrads, tensors: tuple, dims: int) -> bool:
    """Whether the call's input and states (``tensors``, ``None`` allowed for states) are ``dims``-D
    tensors, its outputs were computed in the parameters' dtype (no autocast) and are unchanged
    since, and a gradient reaches one of them: what running it again at the batch needs."""
    x = tensors[0]
    return (
        isinstance(x, Tensor)
        and x.dim() == dims  # not a PackedSequence, not an unbatched input
        and all(t is None or (isinstance(t, Tensor) and t.dim() == dims) for t in tensors[1:])
        and all(t.dtype == p.dtype for t in call.outputs for p in module.parameters())
        and all(t._version == v for t, v in zip(call.outputs, call.versions))
        and any(grad is not None for grad in g)
    )


def _plain(module: nn.Module, call: RecordedCall, g: OutputGrads) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """The call's input ``(b, T, I)`` (batch first) and initial states ``(L D, b, H)`` (``None``:
    zeros) where :func:`_recurrent_rows` covers the call, else ``None``."""
    x, h0, c0, alone = _arguments(call)
    covered = (
        alone
        and _runs_again(module, call, g, (x, h0, c0), 3)
        and not getattr(module, "proj_size", 0)
        and (module.dropout == 0 or not module.training or module.num_layers == 1)
    )
    if not covered:
        return None
    return (x if module.batch_first else x.transpose(0, 1)), h0, c0


def _repeated(t: Tensor, k: int, dim: int) -> Tensor:
    """``t`` with each sample (along ``dim``) repeated for its ``k`` rows, detached."""
    t = t.detach().unsqueeze(dim + 1)
    return t.expand(*t.shape[: dim + 1], k, *t.shape[dim + 2 :]).flatten(dim, dim + 1)


@register_handler(
    nn.RNN,
    nn.GRU,
    nn.LSTM,
    needs_input=False,
    needs_output=True,
    parameter_names=lambda module: module._flat_weights_names,
)
def _recurrent_rows(module: nn.Module, call: RecordedCall, g: OutputGrads, names: frozenset) -> dict[str, Piece]:
    """The per-sample gradients of an ``RNN``/``GRU``/``LSTM`` call (module docstring): for layer
    ``l`` and direction ``d``, ``weight_ih`` / ``bias_ih`` from the factors (the layer's input
    ``(n, T, I_l)``, ``dgi`` ``(n, T, G H)``) and ``weight_hh`` / ``bias_hh`` from (the previous
    states ``(n, T, H)``, ``dgh``); ``g`` holds, per followed output, its gradients ``(n, ...)``
    with the batch in dimension 0 (``out`` ``(n, T, D H)``, ``h_n`` and ``c_n`` ``(n, L D, H)``)."""
    plain = _plain(module, call, g)
    if plain is None:
        return _autograd_rows(module, call, g, names)
    x, h0, c0 = plain
    n, b = next(grad for grad in g if grad is not None).shape[0], x.shape[0]
    k, steps, hidden = n // b, x.shape[1], module.hidden_size
    directions, mode = 2 if module.bidirectional else 1, module.mode

    states = x.new_zeros(module.num_layers * directions, n, hidden) if h0 is None else _repeated(h0, k, 1)
    cells = None if mode != "LSTM" else (torch.zeros_like(states) if c0 is None else _repeated(c0, k, 1))
    factors: list[tuple[str, Tensor, Tensor]] = []  # per (layer, direction): suffix, input, previous states
    wanted: list[Tensor] = []  # per (layer, direction): gi (n, T, G H), then gh of every step (n, G H)
    finals: list[Tensor] = []
    final_cells: list[Tensor] = []
    layer_input = _repeated(x, k, 0)
    with torch.enable_grad():
        for layer in range(module.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                weights = [getattr(module, f"{kind}{suffix}").detach() for kind in ("weight_ih", "weight_hh")]
                biases = [
                    getattr(module, f"{kind}{suffix}").detach() if module.bias else None
                    for kind in ("bias_ih", "bias_hh")
                ]
                gi = F.linear(layer_input, weights[0], biases[0])
                if not gi.requires_grad:  # the first layer's, from the recorded input
                    gi.requires_grad_()
                wanted.append(gi)
                index = layer * directions + direction
                h, c = states[index], None if cells is None else cells[index]
                previous, out, per_step = [], [None] * steps, gi.unbind(1)
                for t in range(steps - 1, -1, -1) if direction else range(steps):
                    previous.append(h)
                    gh = F.linear(h, weights[1], biases[1])
                    if not gh.requires_grad:  # from the recorded initial state
                        gh.requires_grad_()
                    wanted.append(gh)
                    h, c = _cell(mode, per_step[t], gh, h, c)
                    out[t] = h
                factors.append((suffix, layer_input.detach(), torch.stack(previous, 1).detach()))
                finals.append(h)
                if c is not None:
                    final_cells.append(c)
                outputs.append(torch.stack(out, 1))
            layer_input = torch.cat(outputs, 2) if directions > 1 else outputs[0]
        again = [layer_input, torch.stack(finals, 1)] + ([torch.stack(final_cells, 1)] if final_cells else [])
    if not _reproduces(module, call, again, k):
        return _autograd_rows(module, call, g, names)
    grads = _differentiated(call, g, again, wanted)
    pieces: dict[str, Piece] = {}
    for j, (suffix, inputs, previous) in enumerate(factors):
        at = j * (1 + steps)
        # dgh in processing order (reversed in time for the reverse direction), as ``previous`` is
        dgi, dgh = grads[at], torch.stack(grads[at + 1 : at + 1 + steps], 1)
        pieces.update(
            _projection_pieces(inputs.unsqueeze(1), dgi.unsqueeze(1), f"weight_ih{suffix}", f"bias_ih{suffix}", names)
        )
        pieces.update(
            _projection_pieces(previous.unsqueeze(1), dgh.unsqueeze(1), f"weight_hh{suffix}", f"bias_hh{suffix}", names)
        )
    return pieces


def _differentiated(call: RecordedCall, g: OutputGrads, again: list[Tensor], wanted: list[Tensor]) -> list[Tensor]:
    """The gradients at ``wanted`` (the pre-activations: ``dgi``, ``dgh``) of the run again's
    outputs weighted by the rows' output gradients ``g`` (one backward pass; zeros where none
    reaches), autograd's total derivatives there."""
    reached = [(again[p], grad) for p, grad in zip(call.positions, g) if grad is not None]
    grads = torch.autograd.grad(
        [t for t, _ in reached], wanted, [grad.to(t.dtype) for t, grad in reached], allow_unused=True
    )
    return [torch.zeros_like(t) if d is None else d for t, d in zip(wanted, grads)]


def _reproduces(module: nn.Module, call: RecordedCall, again: list[Tensor], k: int) -> bool:
    """Whether the run again (``out`` ``(n, T, D H)``, ``h_n`` and ``c_n`` ``(n, L D, H)``, row
    ``i k`` sample ``i``'s) gives every followed output that the module recorded, to ``sqrt(eps)``
    of its dtype relative to its largest entry."""
    for recorded, position, dim in zip(call.outputs, call.positions, call.batch_dims):
        expected = recorded.detach().movedim(dim, 0)
        value = again[position].detach()[::k]
        tolerance = torch.finfo(expected.dtype).eps ** 0.5 * float(expected.abs().max().clamp_min(1e-30))
        if value.shape != expected.shape or float((value - expected).abs().max()) > tolerance:
            return False
    return True


def _cell_rows(module: nn.Module, call: RecordedCall, g: OutputGrads, names: frozenset) -> dict[str, Piece]:
    """The per-sample gradients of one call of an ``RNNCell``/``GRUCell``/``LSTMCell``
    (``h' = cell(x, h)``, an LSTM's ``(h', c')``): ``weight_ih``'s row ``dgi x^T``, ``weight_hh``'s
    ``dgh h^T``, from the cell run again at the batch (``x`` ``(n, I)``, ``h``, ``c`` ``(n, H)``) and
    one backward pass from the rows' output gradients. A cell called at every step of a loop
    has its calls' rows summed by the engine.

    An ``LSTMCell``'s ``h'`` is computed from its ``c'`` on the CPU: the gradient arriving at ``c'``
    holds the path through ``h'`` already, so the run differentiates ``h'`` through its output gate
    only (``c'`` detached there) and ``c'`` with the gradient as it arrived, each path once. CUDA's
    fused kernel returns both from one node, the gradient at ``c'`` its consumers' alone: the run
    then differentiates ``h'`` through ``c'`` too (:func:`_h_from_c` tells the two apart). Its calls
    must be run again (the general way through the graph would count that path twice): an input
    or output changed in place since the call, or a call under ``torch.autocast`` (which returns
    float32 states from bfloat16 gates, so the run in float32 does not reproduce them), is refused."""
    x, h, c, alone = _arguments(call)
    lstm = type(module) is nn.LSTMCell
    if alone and _runs_again(module, call, g, (x, h, c), 2):
        n = next(grad for grad in g if grad is not None).shape[0]
        k, hidden = n // x.shape[0], module.hidden_size
        inputs = _repeated(x, k, 0)
        states, cells = (x.new_zeros(n, hidden) if t is None else _repeated(t, k, 0) for t in (h, c))
        with torch.enable_grad():
            gi = F.linear(inputs, *(None if t is None else t.detach() for t in (module.weight_ih, module.bias_ih)))
            gh = F.linear(states, *(None if t is None else t.detach() for t in (module.weight_hh, module.bias_hh)))
            gi.requires_grad_()
            gh.requires_grad_()
            mode = "LSTM" if lstm else "GRU" if type(module) is nn.GRUCell else f"RNN_{module.nonlinearity.upper()}"
            chained = lstm and not _h_from_c(call)
            again = list(_cell(mode, gi, gh, states, cells if lstm else None, chained=chained))
        if _reproduces(module, call, again, k):
            dgi, dgh = _differentiated(call, g, again, [gi, gh])
            pieces = _projection_pieces(inputs[:, None, None], dgi[:, None, None], "weight_ih", "bias_ih", names)
            pieces.update(_projection_pieces(states[:, None, None], dgh[:, None, None], "weight_hh", "bias_hh", names))
            return pieces
    if not lstm:
        return _autograd_rows(module, call, g, names)
    # under torch.autocast the cell computes its gates in bfloat16 but returns float32 states, so
    # the engine cannot tell it from a float32 call: its run again (in float32) differs by bfloat16's rounding
    raise RuntimeError(
        "an LSTMCell's input or output was changed in place after the call, or the cell ran under "
        "torch.autocast (its gates in a lower precision): its call could not be run again to its recorded "
        "outputs, which the hooks engine needs (run the cell outside autocast, or use engine='reference', "
        "exact for it); no parameter was changed"
    )


def _h_from_c(call: RecordedCall) -> bool:
    """Whether an ``LSTMCell`` call's ``h'`` was computed from its ``c'`` in the autograd graph
    (PyTorch's CPU kernel: ``h' = o * tanh(c')``, ``c'`` two nodes up), so that the gradient
    arriving at ``c'`` holds the path through ``h'``; ``False`` where both are outputs of one node
    (CUDA's fused kernel) or no gradient reaches one of them. Any other shape of graph is refused: counting
    the path through ``h'`` zero times or twice would be a silently wrong Gram."""
    edges = dict(zip(call.positions, call.edges))
    if 0 not in edges or 1 not in edges:
        return False  # no gradient reaches one of them: no path through h' to count
    h_edge, c_edge = edges[0], edges[1]
    if h_edge.node is c_edge.node:
        return False
    frontier = [h_edge.node]
    for _ in range(3):  # h' = o * tanh(c'): c' is two nodes above h'
        upper = []
        for node in frontier:
            for parent, output_nr in node.next_functions:
                if parent is c_edge.node and output_nr == c_edge.output_nr:
                    return True
                if parent is not None:
                    upper.append(parent)
        frontier = upper
    raise RuntimeError(
        "an LSTMCell's h' and c' are neither outputs of one autograd node nor h' computed from c' "
        "(an unknown kernel): the hooks engine cannot tell which gradients it gets; use engine='reference', "
        "exact for it; no parameter was changed"
    )


_CELL_NAMES = fixed_names("weight_ih", "weight_hh", "bias_ih", "bias_hh")
register_handler(nn.RNNCell, nn.GRUCell, needs_input=False, needs_output=True, parameter_names=_CELL_NAMES)(_cell_rows)
register_handler(nn.LSTMCell, needs_input=False, needs_output=True, chained_outputs=True, parameter_names=_CELL_NAMES)(
    _cell_rows
)
