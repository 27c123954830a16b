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

If row ``j`` reaches sample ``j`` only, ``g_B[j] = s_j g_A[j]`` exactly; otherwise the difference is
``sum_{i != j} (s_i - s_j) sum_c u_ic D^c_ij``, non-zero for almost every ``u``, ``s``. A call whose
``max |g_B - s g_A|`` exceeds ``sqrt(eps)`` (of the residuals' dtype) times ``max(|g_B|, |s g_A|)``
fails; its parameters go to the exact reference engine.

Cost: two backward passes down to the first hooked module (no weight-gradient kernel), with the
gradients at every hooked output held at once. It runs once per forward signature (the autograd
graph's node types and the hooked calls' modules and shapes, :func:`graph_signature`) and the
engine keeps the verdict, so a training loop pays it on its first step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge


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


def rows_not_samples(residuals: Tensor, edges: Sequence[GradientEdge]) -> list[bool]:
    """For each hooked output ``edges[n]`` (``(b, ...)``, reachable from ``residuals``), whether some
    row ``j`` of it reaches the residuals ``(b, k)`` of a sample other than ``j``."""
    b, k = residuals.shape
    generator = torch.Generator().manual_seed(0)
    u = (1 + torch.rand(b, k, generator=generator, dtype=torch.float64)).to(residuals)
    s = (1 + torch.rand(b, generator=generator, dtype=torch.float64)).to(residuals)
    unique = list({(id(e.node), e.output_nr): e for e in edges}.values())
    grad_a = torch.autograd.grad(residuals, unique, grad_outputs=u, retain_graph=True)
    grad_b = torch.autograd.grad(residuals, unique, grad_outputs=s.unsqueeze(1) * u, retain_graph=True)
    tolerance = torch.finfo(residuals.dtype).eps ** 0.5
    verdict = {}
    for edge, g_a, g_b in zip(unique, grad_a, grad_b):
        if g_a.dim() == 0 or g_a.shape[0] != b:
            verdict[(id(edge.node), edge.output_nr)] = True
            continue
        expected = s.view(b, *([1] * (g_a.dim() - 1))) * g_a
        scale = float(torch.maximum(g_b.abs().max(), expected.abs().max()))
        verdict[(id(edge.node), edge.output_nr)] = float((g_b - expected).abs().max()) > tolerance * scale
    return [verdict[(id(e.node), e.output_nr)] for e in edges]
