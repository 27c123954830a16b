"""Fast engine: the Gram matrix from per-layer factors of one forward and one backward pass.

How a step runs (docs/design.md, "The hooks engine"):
1. Forward with forward hooks on every supported module: each call's input is kept and a tensor
   hook is put on its output. A parameter used outside its own module (``x @ emb.weight.T``) is
   found afterwards in the residuals' graph (:mod:`.locality`); a module holding a parameter its
   handler does not compute (a forward pre-hook forming its ``weight`` from ``weight_g`` and
   ``weight_v``, as ``weight_norm`` does) takes its rows through its own graph.
2. Backward of ``residuals[:, c].sum()`` for each output column ``c`` (``k`` passes, the graph is
   retained between them) with ``torch.autograd.grad`` whose ``inputs`` are only the hooked
   outputs nearest the graph's leaves: no weight-gradient kernel runs. Samples are independent,
   so the gradient reaching a layer's output holds every sample's own output gradient.
3. As soon as a call has all its ``k`` output gradients, its handler (:mod:`.handlers`) forms the
   per-sample gradients (or the factors) of its parameters, which are added to the Gram matrix
   with one ``addmm_`` and kept for ``J^T v`` (one contraction per layer, no second backward).
   A module returning several differentiable tensors (``GRU``'s ``(out, h)``, ``LSTM``'s
   ``(out, (h, c))``) has each followed with its own hook; its handler gets the gradients of all
   of them (the recurrent layers': :mod:`.recurrent`; a module without one:
   :data:`.handlers.AUTOGRAD_ROWS`, the module's vector-Jacobian product with them).

Rows of the Gram matrix are sample-major: row ``i * k + c`` is sample ``i``, output ``c``.

Exactness: a module called several times in one forward (or a parameter shared by two supported
modules) is handled exactly by summing its per-sample gradients over the calls (their factors
joined along their positions where they share a layout, :class:`_Summed`). A module with
parameters and no handler gets its rows through its own part of the graph
(:data:`.handlers.AUTOGRAD_ROWS`). Parameters of modules returning no differentiable tensor (in
a tuple or list), of modules one of whose outputs is computed from another inside them (but an
``LSTMCell``, whose handler counts that path once), whose
input or outputs do not have the batch as their batch dimension (0, or the one the module's type
fixes: 1 for a recurrent layer's final states), whose output rows are not the samples (checked, not guessed: :mod:`.rows`; e.g. a sequence-first
``(T, b, d)`` input with ``T == b``), of modules whose ``forward`` is replaced on the instance, or
used outside their module go to the reference engine
(:func:`.reference.jacobian_rows`) with a one-time warning, as do parameters that the residuals
reach other than through their module's output (a residual with input derivatives, e.g. a
Laplacian; see :mod:`.locality`). BatchNorm in training mode raises.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.parametrize import ParametrizationList, is_parametrized

from . import (
    handlers,
    recurrent,  # noqa: F401  (registers the handlers of the recurrent layers and cells)
)
from .base import Closure, GramSystem, check_fits, params_dtype, residuals_2d, slice_columns
from .handlers import (
    AUTOGRAD_ROWS,
    Dense,
    Factored,
    FoldedBias,
    LayerHandler,
    Piece,
    RecordedCall,
    add_gram_lower,
    batch_norm_check,
    handler_for,
    mirror_lower,
    output_batch_dims,
    output_tensors,
    sample_shape,
)
from .locality import Locality, Region, params_off_module_paths
from .reference import flatten, jacobian_rows, split_like
from .rows import graph_signature, post_order, rows_kept_by_graph, rows_not_samples
from .workspace import Workspace, activated

# Modules that only hold parameters for their parent's forward (never called themselves).
_PARAMETER_CONTAINERS = (nn.ParameterList, nn.ParameterDict)
# Forward signatures whose row check (:mod:`.rows`) is remembered; more are forgotten at once.
MAX_ROW_VERDICTS = 64
# Dense pieces narrower than this many columns (ScalarBias, ScalarScale, biases, small heads) are
# added to the Gram matrix together, in one product after the backward pass. One update costs
# about 20-80 us of call overhead on the 2-core CPU, against about 0.35 us per column of a
# 128-row update at GEMM speed: on the demo's resnet8_fixup (b = 128) twenty one-column updates
# took about 1 ms (benchmarks/engine_parts.py; docs/performance.md, gram8).
NARROW_COLUMNS = 128


@dataclass(eq=False)
class _Call:
    """One call of a hooked module during the forward pass. Its outputs are the distinct
    differentiable tensors it returned (one for every handler's module; several for a module
    that returns a tuple of them, each followed through its own graph edge and tensor hook)."""

    module: nn.Module
    handler: LayerHandler
    input: Tensor | None  # None when the handler does not need it
    version: int
    # sizes of the batch dimension of the input (where the handler takes it) and of each output
    rows: tuple[int, ...]
    out_shapes: tuple[tuple[int, ...], ...]
    batch_dims: tuple[int, ...]  # each output's batch dimension (handlers.output_batch_dims)
    out_dtype: torch.dtype  # the least precise of the outputs' dtypes: the one the module computed in
    edges: tuple[GradientEdge, ...]  # () once the step's graph walks and backward passes are done
    params: dict[str, Tensor] = field(default_factory=dict)
    input_nodes: frozenset[Any] = frozenset()  # autograd nodes of the tensor inputs (see .locality)
    # per output, its gradient in each backward pass so far (None: autograd's zero)
    grads: list[list[Tensor | None]] = field(default_factory=list)
    done: bool = False
    output: RecordedCall | None = None  # kept only for a handler that needs it (AUTOGRAD_ROWS)
    enclosing: frozenset[int] = frozenset()  # ids of the hooked modules whose forward was running around it
    # the input's shape, and its batch dimension: 1 for a sequence-first (T, b, ...) input of a
    # handler that allows it (LayerHandler.sequence_first), set once the batch size is known
    in_shape: tuple[int, ...] = ()
    in_batch_dim: int = 0
    # names of its parameters that the module did not hold during the call (replaced or tied after
    # the engine was built, or swapped by torch.func.functional_call): the call used other tensors
    stale: tuple[str, ...] = ()
    hooks: list[Any] = field(default_factory=list)  # handles of the tensor hooks on its outputs


def _release(calls: list[_Call]) -> None:
    """Drop each call's autograd nodes, at the end of every step and of every failed one.

    Each output's autograd node holds its hook, the hook its call: a call holding the node (and
    its inputs' nodes) makes a cycle through C++ that Python's collector does not free. The leaked
    nodes, small blocks scattered among the step's large ones, made glibc's heap grow by 70-300 MB
    per step on a ResNet (docs/performance.md); a refused step (NaN residuals) leaked its whole
    graph, activations included. The hooks are removed too: a model that keeps a tensor of the
    forward on itself (``self.h``, ``self.last = out``) keeps its graph, whose nodes held the
    hooks, the hooks the engine, and the engine the model: a cycle through C++, the model, the
    engine and the graph never freed once the model was dropped.
    """
    for call in calls:
        for handle in call.hooks:
            handle.remove()
        call.edges, call.input_nodes, call.output, call.hooks = (), frozenset(), None, []


def _hooked_edges(calls: Iterable[_Call]) -> dict[Any, list[GradientEdge]]:
    """The edges of the outputs of ``calls``, by their autograd node."""
    nodes: dict[Any, list[GradientEdge]] = {}
    for call in calls:
        for edge in call.edges:
            nodes.setdefault(edge.node, []).append(edge)
    return nodes


def _sink_edges(post: list[Any], nodes: dict[Any, list[GradientEdge]]) -> list[GradientEdge]:
    """The hooked edges (``nodes``: by node) with no hooked node below them, among the nodes
    ``post`` (post-order).

    Asking ``autograd.grad`` for only these edges makes it run every hooked node (each lies on a
    path from the root to one of them) and no weight-gradient kernel. Autograd calls the tensor
    hooks of every output of a node it runs (or whose edges it returns), those of outputs no
    gradient reaches with ``None``: every hooked output whose node is in ``post`` is seen in each
    pass, once (a sink edge no gradient reaches is returned as ``None``, so ``autograd.grad``
    needs ``allow_unused=True``).
    """
    below: dict[Any, bool] = {}
    for node in post:
        below[node] = any(nxt is not None and (nxt in nodes or below[nxt]) for nxt, _ in node.next_functions)
    sinks = {}
    for node, edges in nodes.items():
        if node in below and not below[node]:
            for edge in edges:
                sinks[(node, edge.output_nr)] = edge
    return list(sinks.values())


class _Summed:
    """The per-sample gradients of a parameter that several calls use (a layer or cell applied at
    every step of a loop, a shared weight), added up over the calls.

    :class:`Factored` pieces of one layout are kept and joined along their positions at the end:
    one piece, the layer applied at all of them (a 16-step cell loop: one product instead of 16
    dense formations and sums), while their factors hold no more entries than the dense rows
    would. Anything else, or beyond that, is summed as dense rows ``(n, numel)``, in place after
    the first sum. The result never folds a bias in (``with_bias`` off): the bias, summed too, is
    a plain :class:`Dense` that adds its own Gram part.
    """

    def __init__(self) -> None:
        self.factors: list[Factored] = []  # while still joining (no dense rows yet)
        self.rows: Tensor | None = None
        self.owned = False  # whether ``rows`` is this sum's own tensor (a piece's may be shared)

    def add(self, piece: Piece) -> None:
        """Add one call's piece."""
        if self.rows is None and type(piece) is Factored and piece.overlap is None:
            if not self.factors or _same_layout(self.factors[0], piece):
                self.factors.append(piece)
                n, groups, _, kin = piece.a.shape
                if sum(f.a.numel() + f.g.numel() for f in self.factors) <= n * groups * kin * piece.g.shape[3]:
                    return
                piece = self._joined()  # more entries than the dense rows: those from here on
                self.factors = []
        if self.factors:
            self._add_rows(self._joined().dense().jac)
            self.factors = []
        self._add_rows(piece.dense().jac)

    def _add_rows(self, jac: Tensor) -> None:
        if self.rows is None:
            self.rows = jac
        elif self.owned:
            self.rows.add_(jac)
        else:
            self.rows, self.owned = self.rows + jac, True

    def _joined(self) -> Factored:
        first = self.factors[0]
        if len(self.factors) == 1:
            return replace(first, with_bias=False)
        a, g = torch.cat([f.a for f in self.factors], 2), torch.cat([f.g for f in self.factors], 2)
        return replace(first, a=a, g=g, with_bias=False)

    def piece(self) -> Piece:
        """The parameter's piece over all the calls added: the joined factors where the cost
        model (:func:`.handlers.factored_is_cheaper`) prefers them at their number of positions,
        else dense rows."""
        if self.factors:  # every piece joined
            joined = self._joined()
            n, groups, positions, kin = joined.a.shape
            cheaper = handlers.factored_is_cheaper(n, positions, kin, joined.g.shape[3], groups)
            return joined if cheaper else joined.dense()
        return Dense(self.rows)


def _same_layout(first: Factored, other: Factored) -> bool:
    """Whether two calls' factors can be joined along their positions: the same rows, groups,
    widths and column order."""
    return (
        first.a.shape[:2] == other.a.shape[:2]
        and first.a.shape[3] == other.a.shape[3]
        and first.g.shape[3] == other.g.shape[3]
        and (first.in_shape, first.in_perm) == (other.in_shape, other.in_perm)
        and first.a.dtype == other.a.dtype
    )


def _sample_major(grads: list[Tensor | None], batch_dim: int) -> Tensor | None:
    """One output's gradients, one per residual column in order (``None``: autograd's zero), as
    ``(b * k, ...)`` rows sample-major with the batch moved to dimension 0; ``None`` when all are."""
    present = [g for g in grads if g is not None]
    if not present:
        return None
    if len(present) < len(grads):
        grads = [torch.zeros_like(present[0]) if g is None else g for g in grads]
    if batch_dim:
        grads = [g.movedim(batch_dim, 0) for g in grads]
    return grads[0] if len(grads) == 1 else torch.stack(grads, 1).flatten(0, 1)


def _batch_mismatch(call: _Call, b: int, reachable: set[Any]) -> bool:
    """Whether the input (where the handler takes it) or an output whose node the residuals reach
    has other than ``b`` rows in its batch dimension. An output they do not reach gets no
    gradient and does not count (a module's scalar auxiliary loss returned beside its output)."""
    inputs = len(call.rows) - len(call.edges)
    return any(rows != b for rows in call.rows[:inputs]) or any(
        rows != b for rows, e in zip(call.rows[inputs:], call.edges) if e.node in reachable
    )


# the default ``LayerHandler.unsupported``, which refuses nothing (not called every step)
_NO_REFUSAL = LayerHandler.unsupported


def _refusal(handler: LayerHandler, module: nn.Module) -> str | None:
    """Why the hooks engine cannot take ``module``'s own parameters (its handler's reason, or a
    TorchScript module's), or ``None``."""
    if isinstance(module, torch.jit.ScriptModule):  # its forward runs as TorchScript, without Python hooks
        return "a TorchScript module (torch.jit.script or trace) runs no forward hooks"
    return handler.unsupported(module)


def _take_sequence_first(call: _Call, b: int) -> None:
    """Give a call with a sequence-first input (``(T, b, ...)``, PyTorch's default for
    transformers: its batch in dimension 1) its batch dimension, where its handler allows it
    (``LayerHandler.sequence_first``), dimension 0 of its input and output does not have ``b``
    entries and dimension 1 of both does. Sizes only propose it: the row check (:mod:`.rows`)
    verifies that these rows are the samples, and routes the call's parameters if not; with
    ``T == b`` dimension 0 is taken, and a sequence-first call is routed by that check."""
    out_shape = call.out_shapes[0] if len(call.out_shapes) == 1 else ()
    if (
        call.handler.sequence_first
        and not call.handler.needs_output
        and call.rows[0] != b
        and len(call.in_shape) >= 2
        and len(out_shape) >= 2
        and call.in_shape[1] == b
        and out_shape[1] == b
    ):
        call.in_batch_dim, call.batch_dims, call.rows = 1, (1,), (b, b)


def _held(module: nn.Module, name: str) -> Tensor | None:
    """The parameter ``module`` holds under ``name`` now (``None`` if none): one dictionary look-up
    for a name of its own, a walk for a nested one (``parametrizations.weight.original``)."""
    if "." not in name:
        return module._parameters.get(name)
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


def _global_forward_hooks() -> bool:
    """Whether a global forward hook is registered (``register_module_forward_hook``). Torch runs
    those before a module's own forward hooks, the engine's included, so one that replaced or
    changed a module's output would hand the engine the changed output and its handler a wrong
    gradient: while any is registered, every parameter goes to the reference engine."""
    return bool(getattr(nn.modules.module, "_global_forward_hooks", None))


def _unbatched(call: _Call) -> bool:
    """A convolution called on an input without a batch dimension (``(C, H, W)`` for Conv2d):
    its dimension 0 is channels, even when their number equals the batch size."""
    module = call.module
    return isinstance(module, nn.modules.conv._ConvNd) and len(call.out_shapes[0]) != len(module.kernel_size) + 2


class HooksEngine:
    """Gram system of ``model``'s residuals from per-layer factors (see the module docstring).

    Args:
        model: the network; the closure must call it (any number of times).
        params: the parameters to differentiate, default ``model.parameters()``.

    Attributes:
        params: as given; ``jt_times`` returns one tensor per entry, in this order.
        reference_reasons: parameter index -> why it goes to the reference engine (static part).
        workspace: buffers reused across steps while shapes repeat (:mod:`.workspace`); a
            :class:`GramSystem` is valid until the next ``compute`` (a stale one raises);
            ``workspace.clear()`` frees them.
        last_timings: seconds spent in the last ``compute``: ``forward``, ``reference``,
            ``backward`` (including the hooks' work), ``per_sample`` and ``gram`` (inside hooks).

    Raises:
        ValueError: from ``compute``, when a BatchNorm module is in training mode.
    """

    def __init__(self, model: nn.Module, params: Iterable[Tensor] | None = None):
        self.model = model
        self.params: list[Tensor] = list(model.parameters() if params is None else params)
        wanted = {id(p) for p in self.params}
        reasons: dict[int, str] = {}
        owned: set[int] = set()
        self._modules: list[tuple[nn.Module, LayerHandler, dict[str, Tensor]]] = []
        self._checks: list[tuple[nn.Module, Callable[[nn.Module], None]]] = []
        for name, module in model.named_modules():
            # a ParametrizationList's originals are the parametrized module's (below); a
            # ParameterList's or ParameterDict's parameters are its parent's, which uses them
            if isinstance(module, (ParametrizationList, *_PARAMETER_CONTAINERS)):
                continue
            handler = handler_for(module)
            if handler is not None:
                if handler.check is not LayerHandler.check:  # the default checks nothing: not called every step
                    self._checks.append((module, handler.check))
            elif isinstance(module, _BatchNorm):  # e.g. SyncBatchNorm: couples samples when training
                self._checks.append((module, batch_norm_check))
            own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) in wanted}
            held = {
                f"{child_name}.{n}": p
                for child_name, child in module.named_children()
                if isinstance(child, _PARAMETER_CONTAINERS)
                for n, p in child.named_parameters()
                if id(p) in wanted
            }
            if held:  # used in the module's own forward, through its own graph (a handler knows none)
                own.update(held)
                handler = AUTOGRAD_ROWS
            if is_parametrized(module):
                # weight_norm and co.: the module computes the tensor from the originals in its own
                # forward; its handler would differentiate the tensor, so its rows come through its
                # own graph, with respect to the originals (named as module.named_parameters() does)
                originals = module.parametrizations.named_parameters(prefix="parametrizations")
                own.update((n, p) for n, p in originals if id(p) in wanted)
                handler = AUTOGRAD_ROWS
            known = handler.parameter_names if handler is not None else None
            if known is not None and not set(own) <= set(known(module)):
                # a parameter its handler does not compute: a forward pre-hook forms the module's
                # ``weight`` from it (weight_norm's ``weight_g``, prune's ``weight_orig``); the
                # module's graph leads through the formed weight to it (the handler gave it none:
                # a Gram 0.99 off on a weight-normalised Linear, docs/performance.md)
                handler = AUTOGRAD_ROWS
            if not own:
                continue
            owned.update(id(p) for p in own.values())
            handler = handler or AUTOGRAD_ROWS  # a module no handler knows: its rows through its own graph
            reason = _refusal(handler, module)
            if reason is not None:
                reasons.update({id(p): f"{name or 'model'}: {reason}" for p in own.values()})
            else:
                self._modules.append((module, handler, own))
        reasons.update({id(p): "not a parameter of any module of the model" for p in self.params if id(p) not in owned})
        # a parameter shared with an unsupported module cannot be split between two engines
        self._modules = [(m, h, {n: p for n, p in own.items() if id(p) not in reasons}) for m, h, own in self._modules]
        self._modules = [(m, h, own) for m, h, own in self._modules if own]
        self._static_reference = set(reasons)
        # ids of the parameters the hooks compute, as the locality walk watches them every step
        self._hooked = frozenset(id(p) for _, _, own in self._modules for p in own.values())
        # A module taken through its own graph may use a descendant's parameter in its forward
        # without calling the descendant (MultiheadAttention's out_proj): that call's rows are
        # exact for it too, where the residuals' graph reaches it inside the module's region
        # (:mod:`.locality`). module id -> {id of such a hooked parameter: (its name in the module, it)}
        self._adopters: dict[int, dict[int, tuple[str, Tensor]]] = {
            id(module): {id(p): (n, p) for n, p in module.named_parameters() if id(p) in self._hooked and n not in own}
            for module, handler, own in self._modules
            if handler.needs_output
        }
        self._adoptable = {module: frozenset(adopted) for module, adopted in self._adopters.items()}
        self.reference_reasons = {i: reasons[id(p)] for i, p in enumerate(self.params) if id(p) in reasons}
        self._warned: set[int] = set(self._static_reference)
        if reasons:
            detail = "; ".join(sorted(set(reasons.values())))
            warnings.warn(
                f"HooksEngine: {len(self.reference_reasons)} parameter tensor(s) use the slow reference engine ({detail})",
                stacklevel=2,
            )
        self.last_timings: dict[str, float] = {}
        self.workspace = Workspace()
        self._finish: Any = None  # set only while this engine's own backward pass runs
        # set while a handler runs inside that pass: a backward pass of its own through the recorded
        # graph (handlers._rows_through_graph, a module's parameter that reaches the residuals
        # through a hooked module inside it: a learned initial state, a position embedding) runs
        # the inner calls' output hooks, whose gradients are that pass's, not the step's
        self._in_handler = False
        # set only during the row check: (call, which output, gradient)
        self._observe: Callable[[_Call, int, Tensor | None], None] | None = None
        # id of each call the backward passes feed -> how many of its output gradients are still to come
        self._expected: dict[int, int] = {}
        # forward signature -> (the calls whose rows are not the samples, the forwards seen with it)
        self._row_verdicts: dict[tuple, tuple[frozenset[int], int]] = {}
        # parameter id -> the type of its module, whose output in the last forward held no
        # differentiable tensor (set by each forward, read by the routing)
        self._untracked: dict[int, str] = {}

    can_skip_gram = True  # compute(closure, form_gram=...) is understood

    @torch.enable_grad()  # the residuals' graph is walked and differentiated, also under the caller's no_grad
    def compute(self, closure: Closure, *, form_gram: Callable[[int], bool] | None = None) -> GramSystem:
        """Run ``closure`` once with hooks; return residuals ``(b, k)``, Gram ``(b*k, b*k)``, ``J^T v``,
        ``J v`` and the dense ``J`` (materialised from the pieces only when asked for).

        ``form_gram``, when given, is called with ``b*k`` once the forward pass has run; ``False``
        skips the Gram (``GramSystem.gram`` is then ``None``; everything else is as usual)."""
        for module, check in self._checks:
            check(module)
        timings = {"forward": 0.0, "reference": 0.0, "backward": 0.0, "per_sample": 0.0, "gram": 0.0}
        start = time.perf_counter()
        residuals, calls = self._forward_with_hooks(closure)
        timings["forward"] = time.perf_counter() - start
        try:
            post = post_order(residuals.grad_fn)
            reference_ids = self._route(calls, self._locality(residuals, calls), residuals, post)
            b, k = residuals.shape

            start = time.perf_counter()
            reference_params = [p for p in self.params if id(p) in reference_ids]
            gram = None
            if form_gram is None or form_gram(b * k):
                gram = self._new_gram(residuals)
            jac_reference = None
            if reference_params:
                jac_reference = jacobian_rows(residuals, reference_params).detach()
                if gram is not None:
                    gram.addmm_(jac_reference, jac_reference.T)
            timings["reference"] = time.perf_counter() - start

            start = time.perf_counter()
            self.workspace.new_step()  # the previous step's kept buffers are written over from here on
            with activated(self.workspace):
                pieces = self._backward(residuals, calls, gram, timings, post)
            timings["backward"] = time.perf_counter() - start
        finally:
            _release(calls)
        self.last_timings = timings

        dtype = residuals.dtype  # the Gram's and every piece's
        # the functions below keep no graph (_backward's last pass may have retained it)
        residuals = residuals.detach()

        def jt_times(v: Tensor) -> list[Tensor]:
            v = v.to(dtype)
            from_reference = iter(split_like(jac_reference.T @ v, reference_params)) if reference_params else iter(())
            out = []
            for p in self.params:
                if id(p) in reference_ids:
                    out.append(next(from_reference))
                elif id(p) in pieces:
                    out.append(pieces[id(p)].jt_times(v).view_as(p))
                else:  # the residuals do not depend on it
                    out.append(torch.zeros_like(p))
            return out

        def j_times(v: Sequence[Tensor]) -> Tensor:
            out = residuals.new_zeros(b * k)
            if reference_params:
                out += jac_reference @ flatten([t for p, t in zip(self.params, v) if id(p) in reference_ids], dtype)
            for p, t in zip(self.params, v):
                if id(p) in pieces:  # parameters the residuals do not depend on add nothing
                    out += pieces[id(p)].j_times(t.reshape(-1).to(dtype))
            return out

        reference_offsets, offset = {}, 0  # where each reference parameter's columns start in jac_reference
        for p in reference_params:
            reference_offsets[id(p)], offset = offset, offset + p.numel()

        def block(i: int) -> Tensor:
            """``(b*k, numel)`` per-sample Jacobian of parameter ``i``."""
            p = self.params[i]
            if id(p) in reference_ids:
                start = reference_offsets[id(p)]
                return jac_reference[:, start : start + p.numel()]
            if id(p) in pieces:
                return pieces[id(p)].dense().jac
            return residuals.new_zeros(b * k, p.numel())

        def jacobian_columns(start: int, stop: int) -> Tensor:
            return slice_columns(block, [p.numel() for p in self.params], residuals, start, stop)

        def weighted_gram(weights: Sequence[float]) -> Tensor:
            if len(weights) != len(self.params):
                raise ValueError(f"expected one Gram weight per parameter ({len(self.params)}), got {len(weights)}")
            by_id = {id(p): float(w) for p, w in zip(self.params, weights)}
            out = self._new_gram(residuals)
            if reference_params:
                columns = torch.cat([jac_reference.new_full((p.numel(),), by_id[id(p)]) for p in reference_params])
                out.addmm_(jac_reference * columns, jac_reference.T)
            with activated(self.workspace):  # the pieces' scratch buffers (KeptConv, symmetric updates)
                _add_weighted_grams(out, pieces, by_id)
            mirror_lower(out)
            return out

        return GramSystem(
            residuals=residuals,
            gram=gram,
            jt_times=jt_times,
            j_times=j_times,
            jacobian_columns=jacobian_columns,
            weighted_gram=weighted_gram,
        )

    def _forward_with_hooks(self, closure: Closure) -> tuple[Tensor, list[_Call]]:
        """Run the closure with forward hooks; returns the residuals ``(b, k)`` and the hooked calls."""
        calls: list[_Call] = []
        stack: list[int] = []  # ids of the hooked modules whose forward is running
        self._untracked = {}

        def pre_hook(module: nn.Module, args: Any) -> None:
            stack.append(id(module))

        def post_hook(
            handler: LayerHandler, own: dict[str, Tensor], module: nn.Module, args: Any, kwargs: Any, output: Any
        ) -> None:
            stack.pop()
            if handler.needs_output:
                # a tuple, list or dict (nested: LSTM's (out, (h, c))) is followed through each of
                # its differentiable tensors; with none its rows cannot be taken
                if not isinstance(output, Tensor) and not any(
                    isinstance(t, Tensor) and t.requires_grad for t in output_tensors(output)
                ):
                    self._untracked.update((id(p), type(module).__name__) for p in own.values())
                    return
            if isinstance(output, Tensor) and not output.requires_grad:
                return  # e.g. run under no_grad: nothing to differentiate
            record(handler, own, module, args, kwargs, output)

        def record(
            handler: LayerHandler, own: dict[str, Tensor], module: nn.Module, args: Any, kwargs: Any, output: Any
        ) -> None:
            if isinstance(output, Tensor):  # every handler's module: one output
                positions, outputs, edges = (0,), (output,), (get_gradient_edge(output),)
            else:
                # position in output_tensors(output), tensor and graph edge of each followed output;
                # a tensor returned twice is followed once (its one gradient holds both uses)
                followed: dict[tuple[Any, int], tuple[int, Tensor, GradientEdge]] = {}
                for position, t in enumerate(output_tensors(output)):
                    if isinstance(t, Tensor) and t.requires_grad:
                        edge = get_gradient_edge(t)
                        followed.setdefault((edge.node, edge.output_nr), (position, t, edge))
                positions = tuple(position for position, _, _ in followed.values())
                outputs = tuple(t for _, t, _ in followed.values())
                edges = tuple(edge for _, _, edge in followed.values())
            dims = output_batch_dims(module, args, kwargs, positions) if handler.needs_output else (0,)
            out_rows = tuple(t.shape[d] if t.dim() > d else 0 for t, d in zip(outputs, dims))
            if handler.needs_output:  # its inputs do not matter: its rows are taken from its outputs
                x, rows, kept, version = None, out_rows, None, 0
            else:
                x = args[0] if args else next(iter(kwargs.values()))
                rows = (x.shape[0] if x.dim() else 0, *out_rows)
                kept, version = (x.detach() if handler.needs_input else None), x._version
            # nested arguments too: an LSTM's state (h0, c0) is a tuple, and a path through it that
            # reaches the module's parameters (a state from an earlier batch, not detached) leaves the call
            inputs = frozenset(
                t.grad_fn or get_gradient_edge(t).node  # the same node; a leaf's is its gradient accumulator
                for t in output_tensors((*args, *kwargs.values()))
                if isinstance(t, Tensor) and t.requires_grad
            )
            dtype = (
                outputs[0].dtype
                if len(outputs) == 1
                else max((t.dtype for t in outputs), key=lambda d: torch.finfo(d).eps)
            )
            call = _Call(
                module,
                handler,
                kept,
                version,
                rows,
                tuple(tuple(t.shape) for t in outputs),
                dims,
                dtype,
                edges,
                dict(own),
                inputs,
                [[] for _ in outputs],
            )
            if handler.needs_output:
                versions = tuple(t._version for t in outputs)
                call.output = RecordedCall(outputs, args, kwargs, positions, dims, edges, versions)
            call.enclosing = frozenset(stack)  # this module's own id is popped already
            call.stale = tuple(n for n, p in own.items() if _held(module, n) is not p)  # one look-up each
            if x is not None:
                call.in_shape = tuple(x.shape)
            call.hooks = [
                t.register_hook(functools.partial(self._on_grad, call, index)) for index, t in enumerate(outputs)
            ]
            calls.append(call)

        handles = []
        try:
            for module, handler, own in self._modules:
                # the post-hook before the user's: the module's own output is recorded, and a
                # user's hook that changes it with the module's parameters (``o + m.bias``) lies
                # outside the module's region of the graph, where the locality walk finds it
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(
                    module.register_forward_hook(
                        functools.partial(post_hook, handler, own), with_kwargs=True, prepend=True
                    )
                )
            # autograd is on: compute enables it. A torch.compile'd model runs eagerly here: its
            # compiled code would trace the engine's hooks, which change every step (a
            # recompilation a step, then dynamo's limit; a 2 ms step took 110 ms)
            with torch.compiler.set_stance("force_eager"):
                value = closure()
        except BaseException:
            _release(calls)  # a closure failing mid-forward: its calls so far
            raise
        finally:
            for handle in handles:
                handle.remove()
        try:  # the parameters' dtype now, not when the engine was built (``model.double()`` afterwards)
            return residuals_2d(value, params_dtype(self.params)), calls
        except BaseException:
            _release(calls)  # e.g. NaN residuals: refused before compute's own cleanup
            raise

    def _locality(self, residuals: Tensor, calls: list[_Call]) -> Locality:
        """Ids of hooked parameters that the residuals reach other than through their modules'
        outputs, e.g. through an input derivative, and of those whose module computes one of its
        outputs from another (see :mod:`.locality`). Each call whose rows may come through its
        graph is given the earlier calls' outputs where they stop (``RecordedCall.stops``), and
        the descendants' parameters the walk found it using (``HooksEngine._adopters``)."""
        regions = [
            Region(
                frozenset((e.node, e.output_nr) for e in c.edges),
                c.input_nodes,
                frozenset(map(id, c.params.values())),
                id(c.module) if c.output is not None else None,
                self._adoptable.get(id(c.module), frozenset()),
            )
            for c in calls
        ]
        locality = params_off_module_paths(residuals.grad_fn, regions, self._hooked, residuals.output_nr)
        for index, stops in locality.stops.items():
            calls[index].output.stops = tuple(stops)
        for index, adopted in locality.adopted.items():
            call = calls[index]
            call.params.update(self._adopters[id(call.module)][i] for i in adopted)
        return locality

    def _route(self, calls: list[_Call], locality: Locality, residuals: Tensor, post: list[Any]) -> set[int]:
        """Move to the reference engine, for this step, the parameters the hooks cannot see
        exactly; returns the ids of all reference parameters."""
        b = residuals.shape[0]
        reachable = set(post)
        for call in calls:
            _take_sequence_first(call, b)
        dynamic: dict[int, str] = {
            i: "used outside its own module, or reached by a path that bypasses its module's output, e.g. an "
            "input derivative (torch.autograd.grad with create_graph=True); for the latter engine='functional' "
            "with a gramnewton.pinn.residual / FunctionalResidual closure is exact and faster"
            for i in locality.off_path
        }
        for i, name in self._untracked.items():
            dynamic.setdefault(
                i,
                f"{name} returns no differentiable tensor (alone or in a tuple, list or dict), through which its rows are taken",
            )
        for call in calls:
            for p in call.params.values():
                if id(p) in locality.entangled and not call.handler.chained_outputs:
                    dynamic.setdefault(
                        id(p),
                        f"{type(call.module).__name__} computes one of its outputs from another (the gradient at "
                        "the first holds the second's, which its rows would count twice)",
                    )
        for outer in calls:  # rows through a module's output count every use inside it
            if outer.handler.needs_output:
                inside = {id(p) for c in calls if id(outer.module) in c.enclosing for p in c.params.values()}
                for p in outer.params.values():
                    if id(p) in inside:
                        dynamic.setdefault(
                            id(p),
                            f"used by {type(outer.module).__name__} and by a module called inside it (its rows "
                            "through the outer module's output would count the inner use twice)",
                        )
        if _global_forward_hooks():
            for call in calls:
                for p in call.params.values():
                    dynamic.setdefault(
                        id(p),
                        "a global forward hook (nn.modules.module.register_module_forward_hook) runs before the "
                        "engine's and may change module outputs",
                    )
        for call in calls:
            if "forward" in vars(call.module):  # the handler knows the class's forward, not this one
                for p in call.params.values():
                    dynamic.setdefault(id(p), f"{type(call.module).__name__} has its forward replaced on the instance")
            for n in call.stale:
                # the call used another tensor than this parameter (``lin.weight = other`` after
                # the engine was built, torch.func.functional_call): its rows are not this one's
                # (it has none, unless used elsewhere: the reference engine sees that)
                dynamic.setdefault(
                    id(call.params[n]),
                    f"{type(call.module).__name__}.{n} was another tensor during the call (replaced or tied after "
                    "the engine was built, or torch.func.functional_call)",
                )
            # the handler's refusal again (one call, where it has one): an option set on the module
            # after the engine was built (an Embedding's scale_grad_by_freq, a BatchNorm's running
            # statistics set to None) is seen, not read once at construction
            reason = None if call.handler.unsupported is _NO_REFUSAL else call.handler.unsupported(call.module)
            if reason is not None:
                for p in call.params.values():
                    dynamic.setdefault(id(p), f"{type(call.module).__name__}: {reason}")
            mixed = {p.dtype for p in call.params.values()} - {call.out_dtype}
            if mixed and not call.handler.autocast:  # the handler's formulas assume one dtype
                for p in call.params.values():
                    dynamic.setdefault(
                        id(p),
                        f"{type(call.module).__name__} computes in {call.out_dtype} while its parameters are "
                        f"{p.dtype} (autocast?)",
                    )
            if _batch_mismatch(call, b, reachable) or _unbatched(call):
                for p in call.params.values():
                    dynamic.setdefault(
                        id(p),
                        f"{type(call.module).__name__} input/output do not have the batch ({b}) as dimension 0"
                        + (" (1 for a recurrent layer's final states)" if any(call.batch_dims) else ""),
                    )
        for call in self._rows_not_samples(calls, residuals, post):
            for p in call.params.values():
                dynamic.setdefault(
                    id(p),
                    f"{type(call.module).__name__}: rows of its output are not the samples (row i reaches "
                    "other samples' residuals: a sequence-first layout, or samples reordered or mixed)",
                )
        new = {i: r for i, r in dynamic.items() if i not in self._warned}
        if new:
            self._warned.update(new)
            warnings.warn(
                f"HooksEngine: {len(new)} parameter tensor(s) use the slow reference engine "
                f"({'; '.join(sorted(set(new.values())))})",
                stacklevel=4,
            )
        reference = self._static_reference | set(dynamic)
        for call in calls:
            call.params = {n: p for n, p in call.params.items() if id(p) not in reference}
        return {id(p) for p in self.params if id(p) in reference}

    def _rows_not_samples(self, calls: list[_Call], residuals: Tensor, post: list[Any]) -> list[_Call]:
        """The calls with ``b`` rows whose rows are not the samples (:mod:`.rows`: proven kept from
        the graph's node types, else checked numerically), the verdict cached per forward
        signature and found again at its 2nd, 4th, 8th, ... forward (a call found mixing stays
        routed). The numerical check runs at the parameters of the forward it runs on: a mixing
        of samples through a term that is zero there (a gate ``h + gamma * h.mean(0)`` at
        ``gamma = 0``, ReZero's start) is invisible to it, and appears once training moves the
        gate; a check at every forward would cost two backward passes a step, these a number
        that grows as the logarithm of the steps. A gate that opens between two checks is found
        at the next one."""
        b = residuals.shape[0]
        reachable = set(post)
        shapes = tuple(
            (id(c.module), c.rows, c.out_shapes, c.batch_dims, tuple(e.output_nr for e in c.edges)) for c in calls
        )
        signature = graph_signature(post, (residuals.shape, shapes))
        routed, seen = self._row_verdicts.get(signature, (frozenset(), 0))
        seen += 1
        if seen & (seen - 1) == 0:  # the 1st, 2nd, 4th, ... forward with this signature
            checked = [
                n
                for n, c in enumerate(calls)
                if c.params
                and n not in routed
                and not _batch_mismatch(c, b, reachable)
                and any(e.node in reachable for e in c.edges)
            ]
            # the calls whose rows the graph's node types prove kept need no backward pass
            # (.rows.rows_kept_by_graph; a sequence-first call's rows are not its tensor rows)
            outputs = {n: [e.node for e in calls[n].edges if e.node in reachable] for n in checked}
            provable = {node for n in checked if not any(calls[n].batch_dims) for node in outputs[n]}
            proven = rows_kept_by_graph(post, provable, b) if provable else set()
            numerical = [n for n in checked if any(calls[n].batch_dims) or not proven.issuperset(outputs[n])]
            # autocast: the least precise dtype a hooked module computed in sets the tolerance (of
            # all calls: a proven bfloat16 head rounds the gradients that reach the checked ones)
            precision = max([c.out_dtype for c in calls] + [residuals.dtype], key=lambda d: torch.finfo(d).eps)
            checking = [calls[n] for n in numerical]
            bad = self._check_rows(residuals, checking, reachable, post, precision) if numerical else []
            routed = routed | {n for n, failed in zip(numerical, bad) if failed}
            if signature not in self._row_verdicts and len(self._row_verdicts) >= MAX_ROW_VERDICTS:
                self._row_verdicts.clear()  # e.g. many sequence lengths: start afresh
        self._row_verdicts[signature] = (routed, seen)
        return [calls[n] for n in routed]

    def _check_rows(
        self, residuals: Tensor, checked: list[_Call], reachable: set[Any], post: list[Any], precision: torch.dtype
    ) -> list[bool]:
        """:func:`.rows.rows_not_samples` for the outputs of ``checked`` whose nodes the residuals
        reach (a call fails when one of them does), at the tolerance of ``precision``; their
        gradients reach the check through the calls' own output hooks, one at a time (none is
        kept), each with its batch moved to dimension 0."""
        outputs = [(call, j) for call in checked for j, e in enumerate(call.edges) if e.node in reachable]
        index = {(id(call), j): n for n, (call, j) in enumerate(outputs)}
        sinks = _sink_edges(post, _hooked_edges(checked))

        def backward(weights: Tensor, observe: Callable[[int, Tensor | None], None]) -> None:
            def route(call: _Call, j: int, grad: Tensor | None) -> None:
                n = index.get((id(call), j))
                if n is not None:
                    d = call.batch_dims[j]
                    observe(n, grad.movedim(d, 0) if d and grad is not None else grad)

            self._observe = route
            try:
                # only the sinks' gradients are returned (and dropped); the hooks see all the others
                torch.autograd.grad(residuals, sinks, grad_outputs=weights, retain_graph=True, allow_unused=True)
            finally:
                self._observe = None

        widths = [math.prod(sample_shape(call.out_shapes[j], call.batch_dims[j])) for call, j in outputs]
        failed = rows_not_samples(residuals, widths, backward, precision)
        return [any(failed[index[(id(c), j)]] for j in range(len(c.edges)) if (id(c), j) in index) for c in checked]

    def _new_gram(self, residuals: Tensor) -> Tensor:
        """A zero ``(b*k, b*k)`` Gram matrix for ``residuals`` ``(b, k)``, after checking that it fits
        the device's memory."""
        rows = residuals.numel()
        check_fits((rows, rows), residuals, "Gram matrix")
        return residuals.new_zeros(rows, rows)

    def _backward(
        self, residuals: Tensor, calls: list[_Call], gram: Tensor | None, timings: dict[str, float], post: list[Any]
    ) -> dict[int, Piece]:
        """Backward pass(es) that feed every active call its output gradients; returns the
        finished piece of each hooked parameter (its Gram part already added to ``gram`` unless
        ``gram`` is None)."""
        calls = [c for c in calls if c.params]
        b, k = residuals.shape
        uses: dict[int, int] = {}
        for call in calls:
            for p in call.params.values():
                uses[id(p)] = uses.get(id(p), 0) + 1
        pieces: dict[int, Piece] = {}
        sinks = _sink_edges(post, _hooked_edges(calls)) if calls else []
        reachable = set(post)
        # each pass runs the nodes in ``post`` and calls every hook of their outputs (_sink_edges):
        # a call gets k gradients from each output whose node is there, the others none (zero)
        arriving = {id(c): k * sum(e.node in reachable for e in c.edges) for c in calls}
        expected = [c for c in calls if arriving[id(c)]]
        if not expected:  # the residuals depend on no hooked parameter
            return pieces
        dtype = residuals.dtype  # the parameters' (the residuals were checked against them)
        pending = dict(uses)
        partial: dict[int, _Summed] = {}
        narrow: list[Tensor] = []  # per-sample gradients of narrow Dense pieces, (b*k, width) each

        def finish(call: _Call) -> None:
            a, grads, output = call.input, call.grads, call.output
            # free the factors as soon as they are used
            call.input, call.grads, call.output, call.done = None, [], None, True
            if a is not None and a._version != call.version:
                raise RuntimeError(
                    f"the input of a {type(call.module).__name__} was modified in place after the module used it; "
                    "the hooks engine needs it unchanged (avoid in-place operations on it)"
                )
            if a is not None and call.in_batch_dim:  # sequence-first: the samples first, as the handler takes them
                a = a.movedim(call.in_batch_dim, 0)
            if a is not None and a.is_floating_point() and {a.dtype, call.out_dtype} != {dtype}:
                # the operand the module computed with: its input cast to the dtype it computed in
                # (autocast's bfloat16 for a Linear, float32 for a norm layer after one), exactly
                # representable in the parameters' dtype, in which the per-sample gradients are formed
                a = a.to(call.out_dtype).to(dtype)
            g = tuple(_sample_major(column, d) for column, d in zip(grads, call.batch_dims))
            if all(x is None for x in g):  # autograd's zero at every output (a Function's None): zero rows
                shape = sample_shape(call.out_shapes[0], call.batch_dims[0])
                g = (residuals.new_zeros(b * k, *shape, dtype=call.out_dtype), *g[1:])
            if output is not None:  # rows from the module's own outputs and arguments, a gradient for each
                a = output
            else:  # one output
                g = g[0].to(dtype)  # autocast: the module's output gradients are in the dtype it computed in
            # one row per (sample, output): the sample's input is shared by its k rows
            if k > 1 and output is None and a is not None:
                a = a.unsqueeze(1).expand(b, k, *a.shape[1:]).flatten(0, 1)
            names = call.params
            t0 = time.perf_counter()
            self._in_handler = True
            try:
                new = call.handler.contributions(call.module, a, g, frozenset(names))
            finally:
                self._in_handler = False
            missing = names.keys() - new.keys()
            if missing:  # zero rows for them would be a silently wrong Gram
                raise RuntimeError(
                    f"the handler of {type(call.module).__name__} computed no rows for its parameter(s) "
                    f"{sorted(missing)}: register it with the names it computes (register_handler(..., "
                    "parameter_names=...)), and a module holding others takes its rows through its own graph; "
                    "no parameter was changed"
                )
            if any(uses[id(p)] > 1 for p in names.values()):
                # a bias folded into a weight that other calls use too (a tied weight): the weight's
                # summed piece folds nothing (:class:`_Summed`), so the bias adds its own Gram part
                new = {n: Dense(p.jac) if type(p) is FoldedBias else p for n, p in new.items()}
            timings["per_sample"] += time.perf_counter() - t0
            for name, piece in new.items():
                pid = id(names[name])
                if uses[pid] > 1:  # several calls: their per-sample gradients add up
                    partial.setdefault(pid, _Summed()).add(piece)
                    pending[pid] -= 1
                    if pending[pid]:
                        continue
                    piece = partial.pop(pid).piece()
                if gram is not None:
                    t0 = time.perf_counter()
                    if type(piece) is Dense and piece.jac.shape[1] < NARROW_COLUMNS:  # not a FoldedBias
                        # added with the other narrow ones, in one product; a Dense owns its
                        # gradients (scratch-backed ones are PermutedDense), so they stay intact
                        narrow.append(piece.jac)
                    else:
                        piece.add_gram_lower(gram)
                    timings["gram"] += time.perf_counter() - t0
                pieces[pid] = piece

        self._finish, self._expected = finish, {id(c): arriving[id(c)] for c in expected}
        # A call with several outputs in the graph is finished at the hook of the last of them to
        # run in the last pass, after the others' nodes ran: its rows through the recorded graph
        # (handlers._rows_through_graph) need their saved tensors, so that pass keeps them too.
        several = any(arriving[id(c)] > k for c in expected)
        try:
            for c in range(k):
                torch.autograd.grad(
                    residuals[:, c].sum(), inputs=sinks, retain_graph=several or c < k - 1, allow_unused=True
                )
        finally:
            self._finish = None
        missing = [c for c in expected if not c.done]
        if missing:
            raise RuntimeError(
                f"the backward pass did not reach {len(missing)} hooked module call(s) "
                f"({', '.join(sorted({type(c.module).__name__ for c in missing}))}); was an output modified in place?"
            )
        for pid, summed in partial.items():  # calls that the residuals do not depend on add nothing
            pieces[pid] = summed.piece()
            if gram is not None:
                pieces[pid].add_gram_lower(gram)
        if gram is not None:
            if narrow:
                t0 = time.perf_counter()
                add_gram_lower(gram, narrow[0] if len(narrow) == 1 else torch.cat(narrow, 1))
                timings["gram"] += time.perf_counter() - t0
            mirror_lower(gram)  # the pieces left the upper-right block to the mirror
        return pieces

    def _on_grad(self, call: _Call, output: int, grad: Tensor | None) -> None:
        """The tensor hook on output ``output`` of ``call`` (``grad``: ``None`` where no
        gradient reaches that output in this pass)."""
        if self._observe is not None:  # the row check's backward passes
            self._observe(call, output, grad)
            return
        # Gated: the hooks stay on the outputs and fire again in any other backward pass.
        left = self._expected.get(id(call))
        if self._finish is None or self._in_handler or call.done or left is None:
            return
        call.grads[output].append(grad)
        if left == 1:  # every column's gradient of each output the passes reach
            self._finish(call)
        else:
            self._expected[id(call)] = left - 1


def _add_weighted_grams(gram: Tensor, pieces: dict[int, Piece], weights: dict[int, float]) -> None:
    """``gram += sum_p w_p J_p J_p^T`` over the pieces (parameter id -> piece; ``weights``
    parameter id -> ``w_p``), but the upper-right block where a piece leaves it to
    :func:`mirror_lower`, as the backward pass adds the plain Gram.

    A piece of weight 1 is added as there; any other is added into a zeroed ``(n, n)`` buffer
    scaled by ``w_p`` (``n^2`` entries: at ``n = 128`` a few microseconds against a layer's
    product), the narrow :class:`Dense` ones as ``sqrt(w_p) J_p`` columns of one product. A bias
    whose Gram part its weight's factors add (``(A A^T + 1) * (G G^T)``) is added on its own when
    its weight differs: the factors without it, its rows ``(n, out)`` as a :class:`Dense`.
    """
    owner = {id(piece): pid for pid, piece in pieces.items()}
    # a weight's id -> the id of the bias its factors fold in (FoldedBias.weight is that weight's piece)
    folded = {owner[id(piece.weight)]: pid for pid, piece in pieces.items() if type(piece) is FoldedBias}
    narrow: list[Tensor] = []
    buffer: Tensor | None = None
    for pid, piece in pieces.items():
        if type(piece) is FoldedBias:
            continue  # added by its weight's factors, or below on its own
        bias = folded.get(pid)
        parts = [(piece, weights[pid])]
        if bias is not None and weights[bias] != weights[pid]:
            parts = [(replace(piece, with_bias=False), weights[pid]), (Dense(pieces[bias].jac), weights[bias])]
        for part, weight in parts:
            if type(part) is Dense and part.jac.shape[1] < NARROW_COLUMNS:
                narrow.append(part.jac if weight == 1 else part.jac * math.sqrt(weight))
            elif weight == 1:
                part.add_gram_lower(gram)
            else:
                buffer = torch.zeros_like(gram) if buffer is None else buffer.zero_()
                part.add_gram_lower(buffer)
                gram.add_(buffer, alpha=weight)
    if narrow:
        add_gram_lower(gram, narrow[0] if len(narrow) == 1 else torch.cat(narrow, 1))


def supports_any(model: nn.Module, params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` belongs to a module of ``model`` that the hooks engine takes: one
    with a handler that supports the instance, or any other module (:data:`AUTOGRAD_ROWS`)."""
    wanted = {id(p) for p in params}
    for module in model.modules():
        if _refusal(handler_for(module) or AUTOGRAD_ROWS, module) is not None:
            continue
        if any(id(p) in wanted for p in module.parameters(recurse=False)):
            return True
    return False
