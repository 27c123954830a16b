"""The engine interface: what an optimizer needs from a per-sample Jacobian.

An engine runs the user's closure (the forward pass on a mini-batch, returning per-sample
residuals) and returns a :class:`GramSystem`: the residuals, the Gram matrix ``G = J J^T`` and
ways to multiply ``J^T`` and ``J`` by a vector, without the optimizer knowing how ``J`` was
obtained.

Row convention (shared by every engine): the residuals ``(b, k)`` are flattened sample-major,
so row ``i * k + c`` of ``J`` and of ``G`` belongs to sample ``i``, output ``c``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..solve import NonFiniteError, all_finite

Closure = Callable[[], "Tensor | tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class GramSystem:
    """The linear-algebra view of one mini-batch.

    Attributes:
        residuals: ``(b, k)`` detached residuals ``f(w, x_i) - y_i``.
        gram: ``(b*k, b*k)`` Gram matrix ``J J^T``, rows sample-major; ``None`` when the caller
            let the engine skip it (``engine.compute(closure, form_gram=...)``, for an engine with
            ``can_skip_gram``: a parameter-space solve needs only ``J``, and forming ``G`` would
            cost ``(b*k)^2 m``).
        jt_times: maps ``v`` of shape ``(b*k,)`` to ``J^T v`` as one tensor per parameter,
            shaped like the parameter (zeros for parameters the outputs do not depend on).
        j_times: maps ``v``, one tensor per parameter (shaped like it, in the engine's
            ``params`` order), to ``J v`` of shape ``(b*k,)``: the per-sample directional
            derivatives, from what the engine already holds (no forward or backward pass).
            ``None`` when the engine cannot (momentum then refuses to run).
        jacobian_columns: ``(start, stop) -> J[:, start:stop]`` of shape ``(b*k, stop - start)``,
            the columns of the flat parameter vector (parameters flattened and concatenated in
            ``engine.params`` order); materialises only the parameters overlapping the range.
            ``None`` for an engine that cannot materialise ``J`` (data-parallel exact mode and
            the parameter-space solve need it, see :mod:`gramnewton.distributed` and
            :func:`gramnewton.update.choose_solve_space`).
        jacobian: ``(b*k, m)`` Jacobian ``J``, columns in the same order, when the engine holds
            it already (the reference engine: no extra cost); ``None`` otherwise. An undamped
            sample-space solve uses it instead of ``G`` (:func:`gramnewton.solve.jacobian_solve`).
        weighted_gram: ``weights -> sum_p w_p J_p J_p^T`` ``(b*k, b*k)``, one weight ``w_p > 0``
            per parameter (a sequence of floats in the engine's ``params`` order; ``J_p`` the
            parameter's columns of ``J``), formed from what the engine holds at the plain Gram's
            cost: a diagonal metric constant over each parameter (:mod:`gramnewton.metric`).
            ``None`` for an engine that does not (the metric then scales ``jacobian_columns``).
    """

    residuals: Tensor
    gram: Tensor | None
    jt_times: Callable[[Tensor], list[Tensor]]
    j_times: Callable[[Sequence[Tensor]], Tensor] | None = None
    jacobian_columns: Callable[[int, int], Tensor] | None = None
    jacobian: Tensor | None = None
    weighted_gram: Callable[[Sequence[float]], Tensor] | None = None


class GramEngine(Protocol):
    """Computes a :class:`GramSystem` for a fixed list of parameters.

    An engine whose ``can_skip_gram`` attribute is true takes ``compute(closure, *, form_gram)``
    too: ``form_gram(b*k) -> bool``, called once the residuals are known, and ``False`` leaves
    ``GramSystem.gram`` out (:func:`gramnewton.update.compute_system`). The built-in engines
    do; a subclass that overrides ``compute`` must keep that keyword or set ``can_skip_gram = False``.
    """

    params: Sequence[Tensor]

    def compute(self, closure: Closure) -> GramSystem:
        """Run ``closure`` once and return the Gram system of its residuals."""
        ...


# A container's memory limit (cgroup v2, then v1): a process may get less than the machine has.
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device`` (for the CPU the machine's physical memory, or the container's
    limit where lower), ``None`` where unknown. The CPU's is read once per process (per
    :data:`_CGROUP_LIMITS`): read at every step's size check, the limit file cost 5-6% of a small
    network's step (sinc's MLP; docs/convergence.md, fiftieth session)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    return _cpu_memory(_CGROUP_LIMITS)


@functools.cache
def _cpu_memory(limits: tuple[str, ...]) -> int | None:
    """The machine's physical memory, or the first readable of the container limits ``limits`` where lower."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        return None
    for path in limits:
        try:
            with open(path) as limit:
                return min(physical, int(limit.read().strip()))  # "max": no limit, below
        except (OSError, ValueError):
            continue
    return physical


def check_fits(shape: tuple[int, int], residuals: Tensor, what: str) -> None:
    """Raise before an ``(rows, columns)`` matrix in ``residuals``' dtype and device is allocated
    (the Gram matrix, a dense ``J``) when it alone would take more than the device's memory: a
    field per sample (``(b, 1, 64, 64)`` residuals, ``b = 64``: 262,144 rows, a 275 GB Gram) would
    otherwise end in the allocator's error, or the process killed for memory.

    Raises:
        ValueError: saying how large, and what to change; nothing was changed.
    """
    rows, columns = shape
    need = rows * columns * residuals.element_size()
    limit = device_memory(residuals.device)
    if limit is not None and need > limit:
        b, k = residuals.shape
        raise ValueError(
            f"the {what} of {rows:,} x {columns:,} entries (b = {b} samples x k = {k} residuals each) would "
            f"take {need / 2**30:,.1f} GiB, more than the {limit / 2**30:,.1f} GiB of {residuals.device}; use a "
            "smaller batch or fewer residuals per sample (e.g. a subset of each sample's outputs); no parameter "
            "was changed"
        )


def slice_columns(
    block: Callable[[int], Tensor], sizes: Sequence[int], residuals: Tensor, start: int, stop: int
) -> Tensor:
    """Columns ``start:stop`` of the ``(n, sum(sizes))`` matrix whose column blocks are ``block(i)``.

    Args:
        block: ``i -> (n, sizes[i])``, called only for the blocks overlapping the range.
        sizes: the width of each block (a parameter's ``numel``).
        residuals: the ``(b, k)`` residuals: ``n = b*k`` rows, and the dtype and device of the result.
        start, stop: ``0 <= start <= stop <= sum(sizes)``.

    Returns:
        ``(n, stop - start)``: a view of ``block(i)`` when the range lies in one block, else a new
        matrix.

    Raises:
        ValueError: (:func:`check_fits`) a range over several blocks whose new ``(n, stop - start)``
            matrix alone would not fit the device's memory (the whole ``J`` of a parameter-space
            step), before any block is formed.
    """
    spans, offset = [], 0
    for i, size in enumerate(sizes):
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            spans.append((i, lo - offset, hi - offset))
        offset += size
    if len(spans) > 1:
        check_fits((residuals.numel(), stop - start), residuals, "dense Jacobian")
    if not spans:
        return residuals.new_zeros(residuals.numel(), 0)
    parts = [block(i)[:, lo:hi] for i, lo, hi in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


ClosureResult = Tensor | tuple[Tensor, Tensor]
# How many autograd nodes ``_refuse_broadcast`` walks back from the residuals at most, and the
# element-wise operations (``-``, ``+``, ``*``, ``/``) in which it looks for the broadcast.
_BROADCAST_WALK = 16
_ELEMENTWISE = frozenset({"SubBackward0", "RsubBackward1", "AddBackward0", "MulBackward0", "DivBackward0"})


def params_dtype(params: Sequence[Tensor]) -> torch.dtype | None:
    """The one floating dtype of ``params``, or ``None`` when they mix dtypes."""
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else None


def square_loss_residuals(outputs: Tensor, targets: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Residuals ``outputs - targets`` of the square loss, with the shapes checked (no broadcasting).

    Args:
        outputs: ``(b,)``, ``(b, k)`` or ``(b, ...)`` model outputs (e.g. a field or an image per
            sample; :func:`residuals_2d` flattens them).
        targets: the same shape, or ``(b,)`` against ``(b, 1)`` outputs (and ``(b, 1)`` against
            ``(b,)``); cast to the outputs' dtype (float64 targets with a float32 model are fine).
        dtype: the parameters' dtype: outputs in a narrower one (autocast's bfloat16) are cast
            to it first, so that the targets are not rounded to the outputs' few bits (as
            ``model(x) - y`` promotes them).

    Returns:
        ``outputs - targets`` shaped like ``outputs``.
    """
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"closure returned ({type(outputs).__name__}, {type(targets).__name__}); expected (outputs, targets) tensors"
        )
    if outputs.dim() == 0:
        raise ValueError("closure must return per-sample outputs of shape (b,), (b, k) or (b, ...), got a scalar")
    b, k = outputs.shape[0], outputs[0].numel()
    if targets.shape != outputs.shape and not (k == 1 and targets.shape in ((b,), (b, 1))):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match outputs of shape {tuple(outputs.shape)}; "
            "they must have the same shape ((b,) targets go with (b,) or (b, 1) outputs)"
        )
    outputs = widened(outputs, dtype)
    return outputs - targets.reshape(outputs.shape).to(outputs.dtype)


def widened(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` cast to ``dtype`` when it is a floating dtype narrower than it (autocast's
    bfloat16 or float16 outputs of a float32 model: exact), else as is. Residuals, and the
    outputs a loss's curvature is formed from, are in the parameters' precision."""
    narrower = (
        dtype is not None
        and tensor.dtype != dtype  # the usual case, decided without the two finfo look-ups
        and tensor.is_floating_point()
        and dtype.is_floating_point
        and torch.finfo(tensor.dtype).eps > torch.finfo(dtype).eps
    )
    return tensor.to(dtype) if narrower else tensor


def closure_residuals(value: ClosureResult, dtype: torch.dtype | None = None) -> Tensor:
    """The residual tensor of a closure's return value: a tensor as is, a pair
    ``(outputs, targets)`` by :func:`square_loss_residuals` (a loss other than the square loss
    plugs in here); with ``dtype`` (the parameters'), residuals or outputs in a narrower floating
    dtype (autocast) are cast to it. Complex residuals (a misfit in Fourier space, ``fft(f) -
    fft(y)``) are their real and imaginary parts, ``(..., 2)``: ``|r|^2 = Re(r)^2 + Im(r)^2``. A
    step and its re-evaluations pass the same ``dtype``."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TypeError(f"closure returned a tuple of {len(value)} items; expected (outputs, targets)")
        value = square_loss_residuals(*value, dtype)
    if not isinstance(value, Tensor):
        return value
    if value.is_complex():
        value = torch.view_as_real(value.resolve_conj())
    return widened(value, dtype)


@dataclass(frozen=True)
class RandomState:
    """The states of torch's random number generators when a step first ran its closure: the
    CPU generator's and those of the CUDA devices in ``cuda`` (index -> state)."""

    cpu: Tensor
    cuda: dict[int, Tensor]


_recorded: ContextVar[RandomState | None] = ContextVar("gramnewton_recorded_random_state", default=None)


@contextlib.contextmanager
def replayable_randomness(params: Iterable[Tensor]) -> Iterator[None]:
    """Within it, :func:`reevaluate` runs a closure with the random numbers of its first run.

    Entered by a step before its engine runs the closure, so that a closure that draws random
    numbers (dropout, collocation points or augmentations sampled inside it) is re-evaluated on
    the *same* function: the gain ratio then compares the loss the step was fitted to with the
    loss after it, and geodesic acceleration differentiates one function, not two. Recorded:
    the CPU generator and the CUDA devices holding ``params`` (other accelerators' generators
    are not replayed). Re-evaluations leave the generators as they found them, so the random
    numbers a run draws do not depend on how many re-evaluations its damping rule asked for.
    """
    cuda = sorted({_cuda_index(p.device) for p in params if p.is_cuda})  # is_cuda: no device object per parameter
    state = RandomState(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in cuda})
    token = _recorded.set(state)
    try:
        yield
    finally:
        _recorded.reset(token)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _replayed(closure: Callable[..., ClosureResult], *args: Any) -> ClosureResult:
    """``closure(*args)`` with the recorded random state (none recorded: as is), the generators
    restored afterwards."""
    state = _recorded.get()
    if state is None:
        return closure(*args)
    with torch.random.fork_rng(devices=list(state.cuda), device_type="cuda"):
        torch.set_rng_state(state.cpu)
        for index, cuda in state.cuda.items():
            torch.cuda.set_rng_state(cuda, index)
        return closure(*args)


def reevaluate(closure: Callable[..., ClosureResult], *args: Any) -> ClosureResult:
    """``closure(*args)`` for its values alone (a gain ratio, a point along the step): without
    autograd, which a forward for values does not need, and inside :func:`replayable_randomness`
    with the random numbers of the step's first run of the closure. A closure that
    differentiates inside (a physics-informed residual taking ``torch.autograd.grad`` of the
    network with respect to its inputs) fails so, with autograd's "... does not require grad ..."
    error, and only then is run again with autograd; any other error propagates as raised.
    """
    try:
        with torch.no_grad():
            return _replayed(closure, *args)
    except RuntimeError as error:
        if "does not require grad" not in str(error):
            raise
    with torch.enable_grad():
        return _replayed(closure, *args)


def reevaluated_residuals(closure: Callable[..., ClosureResult], dtype: torch.dtype | None, *args: Any) -> Tensor:
    """:func:`reevaluate`'s residuals (:func:`closure_residuals`), refused as the step's first
    evaluation refuses them when they are not a floating-point tensor (integer residuals would be
    truncated into a wrong loss, and with it a wrong gain ratio). Their shape is the caller's check."""
    residuals = closure_residuals(reevaluate(closure, *args), dtype)
    if not isinstance(residuals, Tensor):
        raise TypeError(f"closure returned {type(residuals).__name__} when re-evaluated, not a tensor of residuals")
    if not residuals.is_floating_point():
        raise TypeError(f"residuals must be floating point, got {residuals.dtype} when the closure was re-evaluated")
    return residuals


def residuals_2d(value: ClosureResult, dtype: torch.dtype | None = None) -> Tensor:
    """Validate a closure's return value (residuals, or ``(outputs, targets)``) and view it as ``(b, k)``.

    Args:
        value: ``(b,)`` or ``(b, k)`` residuals, or ``(b, ...)`` ones (a field or an image per
            sample), viewed as ``(b, k)`` with ``k`` the product of the trailing sizes (row
            ``i * k + c`` of ``J`` is entry ``c`` of sample ``i``'s flattened residuals); or
            ``(outputs, targets)`` (see :func:`square_loss_residuals`).
        dtype: the parameters' dtype; residuals in a narrower floating dtype (autocast's
            bfloat16) are cast to it, a wider one is refused (e.g. float64 targets promote a
            float32 model's residuals: the Gram would mix dtypes).

    Raises:
        TypeError: not a tensor.
        ValueError: wrong shape or dtype, no batch, a non-finite entry, a residual ``(b, b)``
            that comes from broadcasting ``(b, 1)`` outputs against ``(b,)`` targets, or
            per-sample losses (``F.mse_loss(..., reduction="none")``, ...) returned as residuals.
    """
    residuals = closure_residuals(value, dtype)
    if not isinstance(residuals, Tensor):
        raise TypeError(f"closure must return a tensor of per-sample residuals, got {type(residuals).__name__}")
    if residuals.dim() == 0:
        raise ValueError(
            "closure must return unreduced per-sample residuals of shape (b,), (b, k) or (b, ...), got a "
            "scalar (a loss?): return model(x) - y, or (model(x), y), not the loss"
        )
    if residuals.numel() == 0:
        raise ValueError(f"closure returned an empty residual tensor of shape {tuple(residuals.shape)}")
    if not residuals.is_floating_point():
        raise TypeError(f"residuals must be floating point, got {residuals.dtype}")
    if dtype is not None and residuals.dtype != dtype:
        raise ValueError(
            f"residuals are {residuals.dtype} but the parameters are {dtype} (e.g. {residuals.dtype} targets); "
            f"return (outputs, targets) from the closure, which casts the targets, or cast them to {dtype}"
        )
    if not all_finite(residuals.detach()):
        count = int((~torch.isfinite(residuals.detach())).sum())
        raise NonFiniteError(
            f"{count} of {residuals.numel()} residuals are NaN or Inf (check the targets and the "
            "model's outputs); no parameter was changed"
        )
    if not residuals.requires_grad:
        raise ValueError(
            "residuals do not depend on any parameter being optimized (requires_grad is False); "
            "run the forward pass inside the closure"
        )
    _refuse_broadcast(residuals)
    _refuse_losses(residuals)
    if residuals.dim() == 2:
        return residuals
    return residuals.unsqueeze(1) if residuals.dim() == 1 else residuals.flatten(1)


# Per-sample losses that a closure may return where residuals are expected (``reduction="none"``),
# by the autograd node that made them, and what to return instead. None of them is ever a residual:
# Gauss-Newton on squared errors would minimise their squares (fourth powers of the residuals).
_LOSS_NODES = {
    "MseLossBackward0": ("squared errors (F.mse_loss(..., reduction='none'))", "return model(x) - y, or (model(x), y)"),
    "SmoothL1LossBackward0": ("per-sample smooth-L1 losses", "return model(x) - y, or (model(x), y)"),
    "HuberLossBackward0": ("per-sample Huber losses", "return model(x) - y, or (model(x), y)"),
    "NllLossBackward0": (
        "per-sample cross-entropies (F.cross_entropy(..., reduction='none'))",
        "for classification pass loss='cross_entropy' and return (logits, labels)",
    ),
    "BinaryCrossEntropyWithLogitsBackward0": (
        "per-sample binary cross-entropies",
        "pass loss='binary_cross_entropy' and return (logits, targets)",
    ),
}


def _refuse_losses(residuals: Tensor) -> None:
    """Raise for per-sample losses returned as residuals (:data:`_LOSS_NODES`)."""
    node = residuals.grad_fn
    name = None if node is None else node.name()
    while name in ("ViewBackward0", "UnsqueezeBackward0", "SqueezeBackward1"):
        node = node.next_functions[0][0]  # a reshape of the losses is still the losses
        name = None if node is None else node.name()
    if name in _LOSS_NODES:
        what, fix = _LOSS_NODES[name]
        raise ValueError(f"closure returned {what}, not residuals: {fix}; no parameter was changed")


def _refuse_broadcast(residuals: Tensor) -> None:
    """Raise for ``(b, b)`` residuals made by broadcasting ``(b, 1)`` outputs against ``(b,)`` targets.

    The autograd graph shows it: walking back from the residuals through nodes that produce a
    ``(b, b)`` tensor, an element-wise operation combines a constant (the targets: no graph) with
    a tensor of only ``b`` entries (the outputs) into ``(b, b)``. A model with ``b`` genuine outputs has no such
    node. Uses ``Node._input_metadata`` (the shapes a node's gradients have); skipped where the
    installed PyTorch lacks it.
    """
    b = residuals.shape[0]
    if residuals.dim() != 2 or residuals.shape[1] != b or b < 2:
        return
    node, seen = residuals.grad_fn, 0
    while node is not None and seen < _BROADCAST_WALK:
        seen += 1
        parents = [(n, i) for n, i in node.next_functions if n is not None]
        shapes = [_output_shape(n, i) for n, i in parents]
        constant = len(parents) < len(node.next_functions)
        if constant and node.name() in _ELEMENTWISE and any(s is not None and s.numel() == b for s in shapes):
            raise ValueError(
                f"the residuals have shape ({b}, {b}): outputs of shape ({b}, 1) were broadcast against "
                f"targets of shape ({b},) (or the reverse); return (outputs, targets) from the closure, "
                "or make the shapes equal (model(x).squeeze(1) - y, or y.unsqueeze(1))"
            )
        same = [n for (n, _), s in zip(parents, shapes) if s is not None and tuple(s) == (b, b)]
        node = same[0] if len(same) == 1 else None


def _output_shape(node: Any, index: int) -> torch.Size | None:
    metadata = getattr(node, "_input_metadata", None)
    return torch.Size(metadata[index].shape) if metadata is not None and index < len(metadata) else None
