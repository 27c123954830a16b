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

Cost: two backward passes down to the first hooked module (no weight-gradient kernel), holding one
output gradient at a time beyond what the backward pass itself holds. It runs once per forward
signature (the autograd graph's node types and the hooked calls' modules and shapes,
:func:`graph_signature`) and the engine keeps the verdict, so a training loop pays it on its first
step.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor


def children(node: Any) -> list[Any]:
    """The autograd nodes that ``node`` sends gradients to."""
    return [nxt for nxt, _ in node.next_functions if nxt is not None]


def post_order(root: Any) -> list[Any]:
    """Autograd nodes reachable from ``root``, children before parents (iterative depth-first)."""
    visited, post = {root}, []
    stack = [(root, iter(children(root)))]
    while stack:
        node, it = stack[-1]
        for nxt in it:
            if nxt not in visited:
                visited.add(nxt)
                stack.append((nxt, iter(children(nxt))))
                break
        else:
            stack.pop()
            post.append(node)
    return post


def graph_signature(post: Sequence[Any], calls: Hashable) -> tuple:
    """What a verdict of :func:`rows_not_samples` depends on: the graph's node types and fan-out
    in post-order, and ``calls`` (the hooked calls' modules and shapes)."""
    return (tuple((type(node), len(node.next_functions)) for node in post), calls)


# Random projections per row of each checked output gradient (see the module docstring).
PROJECTIONS = 4


def rows_not_samples(
    residuals: Tensor, count: int, backward: Callable[[Tensor, Callable[[int, Tensor], None]], None]
) -> list[bool]:
    """For each of ``count`` hooked outputs (``(b, ...)``, reachable from ``residuals``), whether
    some row ``j`` of it reaches the residuals ``(b, k)`` of a sample other than ``j``.

    Args:
        residuals: ``(b, k)``, with the graph retained.
        count: number of outputs checked, indexed ``0 .. count - 1``.
        backward: ``backward(weights, observe)`` runs one backward pass of ``residuals`` weighted by
            ``weights`` ``(b, k)`` (the graph retained) and calls ``observe(n, grad)`` with the
            gradient at output ``n`` as soon as it is formed (once per output and pass).
    An output not observed in both passes, or whose gradient does not have ``b`` rows, fails.
    """
    b, k = residuals.shape
    generator = torch.Generator().manual_seed(0)
    u = 1 + torch.rand(b, k, generator=generator, dtype=torch.float64)
    s = 1 + torch.rand(b, generator=generator, dtype=torch.float64)
    directions: dict[int, Tensor] = {}
    projected: list[dict[int, Tensor]] = [{}, {}]  # pass -> output -> (b, PROJECTIONS)
    norms: list[dict[int, Tensor]] = [{}, {}]  # pass -> output -> (b,) row norms
    wrong_rows: set[int] = set()

    for step, weights in enumerate((u, s.unsqueeze(1) * u)):

        def observe(n: int, grad: Tensor, step: int = step) -> None:
            if grad.dim() == 0 or grad.shape[0] != b:
                wrong_rows.add(n)
                return
            flat = grad.detach().reshape(b, -1).to(torch.float64)
            if n not in directions:
                w = torch.randn(flat.shape[1], PROJECTIONS, generator=generator, dtype=torch.float64)
                directions[n] = w.to(flat.device)
            projected[step][n] = (flat @ directions[n]).cpu()
            norms[step][n] = flat.norm(dim=1).cpu()

        backward(weights.to(residuals), observe)

    tolerance = torch.finfo(residuals.dtype).eps ** 0.5
    failed = []
    for n in range(count):
        if n in wrong_rows or any(n not in p for p in projected):
            failed.append(True)
            continue
        difference = float((projected[1][n] - s.unsqueeze(1) * projected[0][n]).abs().max())
        scale = float(torch.maximum(norms[1][n], s * norms[0][n]).max())
        failed.append(difference > tolerance * scale)
    return failed
