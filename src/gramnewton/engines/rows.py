"""Are the rows of a hooked module's output the samples? A proof from the graph's node types, else
a check by two weighted backward passes.

The hooks engine forms per-sample gradients from row ``j`` (dimension 0) of a module's input and
output, taking row ``j`` to be sample ``j``. Sizes cannot show it: a sequence-first ``(T, b, d)``
tensor with ``T == b``, rows reordered (``x.flip(0)``), or samples mixed after the module
(``h - h.mean(0)``, attention over dimension 0) all have ``b`` rows. Every handler's module maps
its input row ``j`` to its output row ``j`` alone, so it is enough to know that output row ``j``
reaches the residuals of sample ``j`` only.

The proof (:func:`rows_kept_by_graph`). Where every autograd node on the paths from the residuals
to a module's output is of a type known to compute row ``j`` of its output from row ``j`` of its
inputs (element-wise operations, ``x @ W``, convolutions, per-sample norms, pooling, reductions and
softmax along other dimensions, views that keep dimension 0: the tables below, each condition with a
case in ``tests/test_rows_by_graph.py`` that mixes samples without it), the rows are the samples
whatever the values, with no backward pass. Any other node (an index, ``h.mean(0)``, a batch norm
in training mode, a custom Function, attention's fused kernel) leaves the modules below it to the
check.

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

Cost: the proof walks the graph once in Python, about 4 us a node (0.03 ms for sinc's MLP, 0.3 ms
for resnet8_fixup's 72 nodes, 1.0 ms for ResNet-32-Fixup's 276; 2 threads); the check runs two
backward passes down to the first hooked module (no weight-gradient kernel), holding one output
gradient at a time beyond what the backward pass itself holds (about 1.1 ms on sinc's 3-ms step at
b = 500, 23 ms on resnet8_fixup's 47-ms step at b = 128, which the proof now saves). The engine keeps the verdict
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


# The proof from the graph (:func:`rows_kept_by_graph`): how the node types of ordinary networks
# map the rows (dimension 0) of their differentiable inputs to the rows of their outputs.
# Row-wise: output row r is computed from row r of every input that carries hooked rows (those
# inputs have the output's number of dimensions and rows: no broadcasting into dimension 0); the
# value is the input slots (the node's ``next_functions`` order) allowed to carry rows, None for
# any. A product's right operand (a weight) and a convolution's weight and bias may not carry
# them: ``A @ h`` with ``A`` a (b, b) data matrix mixes samples.
ROWWISE: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(
        (
            "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
            "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "NegBackward0", "PowBackward0",
            "PowBackward1", "PowBackward2", "SqrtBackward0", "RsqrtBackward0", "ReciprocalBackward0", "AbsBackward0",
            "ExpBackward0", "Expm1Backward0", "LogBackward0", "Log1pBackward0", "SinBackward0", "CosBackward0",
            "TanhBackward0", "SigmoidBackward0", "ReluBackward0", "LeakyReluBackward0", "EluBackward0",
            "GeluBackward0", "SiluBackward0", "MishBackward0", "SoftplusBackward0", "HardtanhBackward0",
            "HardswishBackward0", "HardsigmoidBackward0", "LogSigmoidBackward0", "ErfBackward0", "ClampBackward1",
            "ClampMinBackward0", "ClampMaxBackward0", "MaximumBackward0", "MinimumBackward0", "WhereBackward0",
            "AddcmulBackward0", "AddcdivBackward0", "LerpBackward0", "LerpBackward1", "ToCopyBackward0",
            "CloneBackward0", "AliasBackward0", "NativeDropoutBackward0", "ExpandBackward0", "BmmBackward0",
        ),
        None,
    ),
    "MmBackward0": (0,),  # (self, mat2)
    "AddmmBackward0": (0, 1),  # (self, mat1, mat2): nn.Linear
    "ConvolutionBackward0": (0,),  # (input, weight, bias)
    "NativeGroupNormBackward0": (0,),  # (input, weight, bias): per sample, over channel groups
    "NativeLayerNormBackward0": (0,),  # over trailing dimensions, dimension 0 not among them (checked)
    "NativeBatchNormBackward0": (0,),  # in eval mode only (checked): running statistics
    "ConstantPadNdBackward0": (0,),  # dimension 0 not padded (checked)
    "PreluKernelBackward0": (0,),
    **dict.fromkeys(
        (
            "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0", "AvgPool2DBackward0",
            "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
            "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0", "UpsampleNearest1DBackward0",
            "UpsampleNearest2DBackward0", "UpsampleNearest3DBackward0", "UpsampleBilinear2DBackward0",
            "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReplicationPad1DBackward0",
            "ReplicationPad2DBackward0",
        ),
        (0,),
    ),
}  # fmt: skip
# Along dimensions: a reduction, softmax, selection, split or concatenation along its saved
# dimensions (``_saved_dim``, relative to the input), a transpose of two, a permutation: keeps
# rows when none of those dimensions is 0 (``h - h.mean(0)``, ``h.flip(0)``, ``h[1:]`` do not).
ALONG_DIMS = frozenset(
    (
        "SumBackward1", "MeanBackward1", "LogsumexpBackward0", "AmaxBackward0", "AminBackward0",
        "LinalgVectorNormBackward0", "SoftmaxBackward0", "LogSoftmaxBackward0", "SelectBackward0", "SliceBackward0",
        "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "CatBackward0", "TransposeBackward0",
        "PermuteBackward0",
    )
)  # fmt: skip
# Views that keep the entries' row-major order: with ``b q`` rows in and ``b p`` out, input rows
# ``j q .. (j+1) q - 1`` are output rows ``j p .. (j+1) p - 1`` (a Linear on ``(b, T, d)`` flattens
# to ``(b T, d)`` and back).
FLAT_VIEWS = frozenset(
    (
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0", "SqueezeBackward1",
        "SqueezeBackward2", "UnsqueezeBackward0",
    )
)  # fmt: skip


def rows_kept_by_graph(post: Sequence[Any], targets: set[Any], b: int) -> set[Any]:
    """The nodes of ``targets`` (hooked outputs' autograd nodes, their outputs ``(b, ...)``) whose
    row ``j`` reaches row ``j`` of the residuals only, proven from the graph: every node on a path
    from the residuals (``post[-1]``) to them keeps rows (:data:`ROWWISE`, :data:`ALONG_DIMS`,
    :data:`FLAT_VIEWS`). The others need the numerical check (:func:`rows_not_samples`).

    Induction from the targets up: every tensor on such a path that carries a target's rows has
    ``b q`` rows, rows ``j q .. (j+1) q - 1`` computed from row ``j`` of the targets alone; each
    node type keeps that; the residuals (``(b, k)``, ``q = 1``) then do. Unlike the numerical
    check this holds whatever the values (a gate at zero), but it knows the node types above
    alone: any other (an index, a batch norm in training mode, a custom Function) leaves the
    targets below it unproven.

    Args:
        post: the residuals' graph in post-order (:func:`post_order`), the residuals' node last.
        targets: the nodes to prove.
        b: the number of samples (rows of the residuals).
    """
    if b == 1:
        return set(targets)  # one row: nothing to mix
    carries: dict[Any, bool] = {}
    for node in post:  # children first: does a path from node reach a target?
        carries[node] = node in targets or any(c is not None and carries[c] for c, _ in node.next_functions)
    unproven: set[Any] = set()
    for node in reversed(post):  # parents first: a node is unproven once a path to it is
        slots = [(i, c, nr) for i, (c, nr) in enumerate(node.next_functions) if c is not None and carries[c]]
        if slots and (node in unproven or not _keeps_rows(node, slots, b)):
            unproven.update(c for _, c, _ in slots)
    return {t for t in targets if t not in unproven}


def _keeps_rows(node: Any, slots: list[tuple[int, Any, int]], b: int) -> bool:
    """Whether ``node`` computes rows ``j q ..`` of its outputs from rows ``j q' ..`` of its inputs
    in ``slots`` (slot, child node, child output) alone (see :func:`rows_kept_by_graph`)."""
    name = type(node).__name__
    try:
        outputs = [tuple(m.shape) for m in node._input_metadata]  # the node's forward outputs
        inputs = [(i, tuple(c._input_metadata[nr].shape)) for i, c, nr in slots]
    except (AttributeError, IndexError, RuntimeError, TypeError):  # no metadata (a node type torch may add): unproven
        return False
    if any(not shape or shape[0] % b for shape in outputs + [s for _, s in inputs]):
        return False
    if name in FLAT_VIEWS:
        return True
    if name in ALONG_DIMS:
        return all(shape[0] == outputs[0][0] for _, shape in inputs) and _dims_exclude_0(node, name, len(inputs[0][1]))
    if name not in ROWWISE or any(shape[0] != outputs[0][0] for shape in outputs):
        return False  # (a norm's other outputs are its statistics per row)
    allowed, out = ROWWISE[name], outputs[0]
    if name == "NativeLayerNormBackward0" and len(node._saved_normalized_shape) >= len(out):
        return False  # normalised over dimension 0 too
    if name == "NativeBatchNormBackward0" and node._saved_training:
        return False  # batch statistics
    if name == "ConstantPadNdBackward0" and len(node._saved_pad) >= 2 * len(out) and any(node._saved_pad[-2:]):
        return False  # pads (or shifts: (1, -1)) dimension 0, the last pair of (last dim's, ..., first dim's)
    return all((allowed is None or i in allowed) and len(s) == len(out) and s[0] == out[0] for i, s in inputs)


def _dims_exclude_0(node: Any, name: str, ndim: int) -> bool:
    """Whether the dimensions ``node`` works along (relative to its ``ndim``-dimensional input)
    leave dimension 0 alone."""

    def index(saved: int) -> int:  # torch saves a negative dimension as 2**64 + dim
        dim = saved - 2**64 if saved >= 2**63 else saved
        return dim + ndim if dim < 0 else dim

    if name == "PermuteBackward0":
        return index(node._saved_dims[0]) == 0
    if name == "TransposeBackward0":
        return index(node._saved_dim0) != 0 and index(node._saved_dim1) != 0
    dims = node._saved_dim
    dims = dims if isinstance(dims, tuple) else (dims,)
    return bool(dims) and all(isinstance(d, int) and index(d) != 0 for d in dims)
