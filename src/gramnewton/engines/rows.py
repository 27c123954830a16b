"""Are the rows of a hooked module's output the samples? A check by two weighted backward passes.

The hooks engine forms per-sample gradients from row ``j`` (dimension 0) of a module's input and
output, taking row ``j`` to be sample ``j``. Sizes cannot show it: a sequence-first ``(T, b, d)``
tensor with ``T == b``, rows reordered (``x.flip(0)``), or samples mixed after the module
(``h - h.mean(0)``, attention over dimension 0) all have ``b`` rows. Every handler's module maps
its input row ``j`` to its output row ``j`` alone, so it is enough to know that output row ``j``
reaches the residuals of sample ``j`` only.

The check. Let ``D^c_ij = d r_ic / d y_j`` (``y_j``: row ``j`` of the module's output, ``r``: the
``(b, k)`` residuals). Two backward passes of the residuals weighted by ``u_ic`` and ``s_i u_ic``
(``u``, ``s`` drawn from ``[1, 2)`` with a fixed seed) give at the module's output

    g_A[j] = sum_ic u_ic D^c_ij,        g_B[j] = sum_ic s_i u_ic D^c_ij.

If row ``j`` reaches sample ``j`` only, ``g_B[j] = s_j g_A[j]`` exactly; otherwise the difference
``d_j = sum_{i != j} (s_i - s_j) sum_c u_ic D^c_ij`` is non-zero for almost every ``u``, ``s``.

Memory. Holding ``g_A`` and ``g_B`` of every hooked output at once would cost two copies of the
forward's activations (the first step's peak, about 2x an SGD step's on a ResNet). Instead each
gradient is reduced, as soon as the backward pass forms it, to ``P = PROJECTIONS`` numbers per row:
``p[j] = W^T vec(g[j])`` with ``W`` an ``(N, P)`` standard normal matrix drawn once per output
(``N`` entries per row), accumulated in float64. The projections are linear, so
``p_B[j] - s_j p_A[j] = W^T d_j``: each of its ``P`` entries is a normal variable of standard deviation
``||d_j||`` (zero only if ``d_j = 0``), while the rounding left in ``g_B - s g_A`` projects to about
``eps ||g_j||``. A call fails when ``max_j |p_B[j] - s_j p_A[j]|`` exceeds ``sqrt(eps)`` (of the
residuals' dtype) times ``max_j max(||g_B[j]||, s_j ||g_A[j]||)``; its parameters go to the exact
reference engine. (A mixing ``d`` escapes only if all ``P`` projections fall below the tolerance,
probability about ``(tolerance * scale / ||d||)^P``; the elementwise form of the check needed the
two full gradients.)

Precision: the passes run with float32 products and convolutions in full precision. On a GPU
PyTorch lets cuDNN's convolutions round float32 to TF32 by default (a 10-bit mantissa: relative
rounding about 5e-4, above the float32 tolerance ``sqrt(eps) = 3.5e-4``), which failed the check of
every convolution of a float32 model there and sent them all to the reference engine (a ResNet-32
step 30x an SGD step on an H200; docs/performance.md, "On a GPU"). A graph built under
``torch.autocast`` computes some gradients in bfloat16 (or float16) whatever the settings: its
tolerance is that dtype's ``sqrt(eps)`` (0.088 for bfloat16; mixing samples, as ``h - h.mean(0)``
does, leaves differences of the order of the gradients themselves).

Cost: two backward passes down to the first hooked module (no weight-gradient kernel), holding one
output gradient at a time beyond what the backward pass itself holds. The engine keeps the verdict
per forward signature (the autograd graph's node types, the dimensions and offsets its operations
work along, the indices that pick rows along dimension 0, and the hooked calls' modules and
shapes, :func:`graph_signature`) and checks again at the signature's 2nd, 4th, 8th, ... forward,
so a training loop pays it about ``log2(steps)`` times (at every forward when a closure picks rows
by indices that change every step: ``head(h + h[randperm(b)])`` with ``h``'s modules routed, the
head checked each step, 168 ms a step as without, the routed layers' reference engine dominating).
Why again: the check is numerical, at the parameters of one forward, and a mixing through a term
that is zero there (a gate ``h + gamma * h.mean(0)`` at ``gamma = 0``, ReZero's start) shows only
once training moves it (:meth:`~gramnewton.engines.hooks.HooksEngine._rows_not_samples`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


def post_order(root: Any) -> list[Any]:
    """Autograd nodes reachable from ``root``, children before parents (iterative depth-first)."""
    visited, post = {root}, []
    # each node's edges read once, without a list of its children (this walk runs every step)
    stack = [(root, iter(root.next_functions))]
    while stack:
        node, it = stack[-1]
        for nxt, _ in it:
            if nxt is not None and nxt not in visited:
                visited.add(nxt)
                stack.append((nxt, iter(nxt.next_functions)))
                break
        else:
            stack.pop()
            post.append(node)
    return post


def graph_signature(post: Sequence[Any], calls: Hashable) -> tuple:
    """What a verdict of :func:`rows_not_samples` depends on: the graph's node types and fan-out
    in post-order, each node's placement arguments (:data:`PLACEMENT`) and the contents of the
    indices that pick rows along dimension 0 (:data:`ROW_INDEXING`), and ``calls`` (the hooked
    calls' modules and shapes)."""
    # 0.1 ms for the Fixup ResNet-32's 274 nodes at b = 128, 0.05 ms with the node types and reduction
    # dimensions alone (the attribute names each node type has are found once per type)
    return (tuple(_node_key(node) for node in post), calls)


# Saved arguments that say along which dimension, by how much or from where an operation moves
# entries: ``h - h.mean(1)`` and ``h - h.mean(0)``, ``h.flip(1)`` and ``h.flip(0)``, ``h.roll(0, 0)``
# and ``h.roll(1, 0)`` have one node type each; only the second of each pair mixes samples.
PLACEMENT = ("_saved_dim", "_saved_dims", "_saved_dim0", "_saved_dim1", "_saved_shifts", "_saved_repeats")
PLACEMENT += ("_saved_start", "_saved_end", "_saved_step", "_saved_index")  # slice, select (an int index)
# Operations that pick or place rows by an index tensor, with the attribute holding it. Whether
# ``h[idx]`` mixes samples depends on the values of ``idx`` (``arange(b)``: no; a swap: yes), so
# the index's contents are part of the signature when it acts along dimension 0 (a negative
# dimension, saved as ``2**64 + dim``, may be 0 too), where the samples are: a closure that
# reorders rows once the check had passed on the identity (``model(x)[order] - y``) was 46% off at
# its 3rd forward. Indices along other dimensions (``h[:, cols]``, a random subset of each
# sample's outputs) and those of embeddings, pooling or ``max`` (data-dependent every step) are
# not, so the check does not run again at every step for them.
ROW_INDEXING = {
    "IndexBackward0": "_saved_indices",
    "IndexPutBackward0": "_saved_indices",
    "TakeBackward0": "_saved_index",
    "IndexSelectBackward0": "_saved_index",
    "GatherBackward0": "_saved_index",
    "ScatterBackward0": "_saved_index",
    "ScatterBackward1": "_saved_index",
    "ScatterAddBackward0": "_saved_index",
    "ScatterReduceBackward0": "_saved_index",
    "IndexAddBackward0": "_saved_index",
    "IndexCopyBackward0": "_saved_index",
    "IndexFillBackward0": "_saved_index",
    "IndexFillBackward1": "_saved_index",
    "IndexReduceBackward0": "_saved_index",
    "SortBackward0": "_saved_indices",
    "SortBackward1": "_saved_indices",
}
_SAVED: dict[type, tuple[tuple[str, ...], str | None]] = {}  # node type -> (its PLACEMENT names, its index)


def _node_key(node: Any) -> tuple:
    """``node``'s part of :func:`graph_signature`."""
    kind = type(node)
    saved = _SAVED.get(kind)
    if saved is None:
        names = dir(kind)
        saved = _SAVED[kind] = (tuple(n for n in PLACEMENT if n in names), ROW_INDEXING.get(kind.__name__))
    placement, index = saved
    key = (kind, len(node.next_functions))
    if placement:  # most nodes (a product, an activation) have none: no getattr at all
        key += tuple(_value(getattr(node, n)) for n in placement)
    if index is None:
        return key
    indices = getattr(node, index)
    if isinstance(indices, Tensor):
        indices = (indices,)
    if index == "_saved_indices" and kind.__name__.startswith("Index"):
        # ``h[idx]``, ``index_put``: one index per dimension from the first (None: not indexed)
        along_rows = bool(indices) and indices[0] is not None
    else:
        dim = getattr(node, "_saved_dim", 0)
        along_rows = dim == 0 or dim >= 2**63
    if along_rows:
        key += tuple(None if t is None else _Contents(t) for t in indices)
    return key


def _value(value: Any) -> Hashable:
    """A placement argument as a key: an index tensor is left out (see :data:`ROW_INDEXING`)."""
    return None if isinstance(value, Tensor) else value


class _Contents:
    """An index tensor as part of a key: equal to another of the same values (a copy is kept, so
    that writing to the index later does not change the key); hashed by its shape and dtype alone,
    which costs no read of its values (keys differing in values only share a bucket)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor.detach().clone()

    def __hash__(self) -> int:
        return hash((self.tensor.shape, self.tensor.dtype))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Contents)
            and other.tensor.shape == self.tensor.shape
            and other.tensor.dtype == self.tensor.dtype
            and other.tensor.device == self.tensor.device
            and torch.equal(other.tensor, self.tensor)
        )


# Random projections per row of each checked output gradient (see the module docstring).
PROJECTIONS = 4
# Entries converted to float64 at a time (bounds the transient copy of a gradient to 2 MiB; in
# whole rows, at least one). Blocks of a fixed 16 rows made a batch of 20,000 two-column rows
# 5,000 tiny products: 39 s for the check of a 61-parameter MLP's first step.
BLOCK_ENTRIES = 2**18


@contextlib.contextmanager
def full_float32_precision() -> Iterator[None]:
    """No TF32 rounding of float32 matrix products or cuDNN convolutions inside the block (the
    settings are process-wide; the previous ones are restored on leaving)."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def rows_not_samples(
    residuals: Tensor,
    widths: Sequence[int],
    backward: Callable[[Tensor, Callable[[int, Tensor | None], None]], None],
    precision: torch.dtype | None = None,
) -> list[bool]:
    """For each hooked output ``n`` (``(b, ...)`` with ``widths[n]`` entries per row, reachable from
    ``residuals``), whether some row ``j`` of it reaches the residuals ``(b, k)`` of a sample other
    than ``j``.

    Args:
        residuals: ``(b, k)``, with the graph retained.
        widths: entries per row of each checked output, indexed ``0 .. len(widths) - 1``.
        backward: ``backward(weights, observe)`` runs one backward pass of ``residuals`` weighted by
            ``weights`` ``(b, k)`` (the graph retained) and calls ``observe(n, grad)`` with the
            gradient at output ``n``, its batch in dimension 0, as soon as it is formed (once per
            output and pass); ``None`` is autograd's zero gradient (no row reaches any sample).
        precision: the least precise dtype the graph computes in (autocast's bfloat16), whose
            ``sqrt(eps)`` is the tolerance; default the residuals' dtype.
    An output not observed in both passes, or whose gradient is not ``(b, ...)`` with ``widths[n]``
    entries per row, fails.

    Everything the check keeps (directions, projections, norms) is allocated before the backward
    passes: small tensors allocated between the passes' large transient gradients would pin those
    gradients' freed blocks and fragment the allocator's heap.
    """
    b, k = residuals.shape
    count = len(widths)
    # drawn on the CPU with a seeded CPU generator whatever torch's default device (the same numbers everywhere)
    generator, cpu = torch.Generator().manual_seed(0), dict(dtype=torch.float64, device="cpu")
    u = 1 + torch.rand(b, k, generator=generator, **cpu)
    s = 1 + torch.rand(b, generator=generator, **cpu)
    f64 = dict(dtype=torch.float64, device=residuals.device)
    directions = [torch.randn(w, PROJECTIONS, generator=generator, **cpu).to(**f64) for w in widths]
    projected = torch.zeros(2, count, b, PROJECTIONS, **f64)  # pass, output, row: W^T vec(g[row])
    norms = torch.zeros(2, count, b, **f64)  # ||g[row]||
    seen = [[False] * count, [False] * count]
    wrong_rows: set[int] = set()

    for step, weights in enumerate((u, s.unsqueeze(1) * u)):

        def observe(n: int, grad: Tensor | None, step: int = step) -> None:
            if grad is None:  # its projections and norms stay zero: nothing mixed
                seen[step][n] = True
                return
            if grad.dim() == 0 or grad.shape[0] != b or grad[0].numel() != widths[n]:
                wrong_rows.add(n)
                return
            flat = grad.detach().reshape(b, widths[n])
            rows = max(1, BLOCK_ENTRIES // max(1, widths[n]))
            for start in range(0, b, rows):
                block = flat[start : start + rows].to(torch.float64)
                torch.matmul(block, directions[n], out=projected[step, n, start : start + rows])
                torch.linalg.vector_norm(block, dim=1, out=norms[step, n, start : start + rows])
            seen[step][n] = True

        with full_float32_precision():  # the tolerance is float32's (module docstring, "Precision")
            backward(weights.to(residuals), observe)

    tolerance = torch.finfo(precision or residuals.dtype).eps ** 0.5
    s = s.to(projected.device)
    difference = (projected[1] - s.view(1, b, 1) * projected[0]).abs().amax((1, 2)).tolist()
    scale = torch.maximum(norms[1], s * norms[0]).amax(1).tolist()
    return [
        n in wrong_rows or not (seen[0][n] and seen[1][n]) or difference[n] > tolerance * scale[n] for n in range(count)
    ]
