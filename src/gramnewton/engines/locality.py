"""Which parameters does a residual reach only through their modules' outputs?

The hooks engine computes ``dr_i / dw`` for a parameter ``w`` of a hooked module as
``sum_calls (dr_i / d out_call) (d out_call / d w)``: the chain rule through the module's output,
with the module's own local derivative. That is exact only if every path of the autograd graph
from the residuals to ``w`` enters the module's *local region* (the nodes between the module's
output and its inputs) through the module's output. A residual that differentiates the network
with respect to its inputs (``torch.autograd.grad(..., create_graph=True)``, e.g. a Laplacian)
breaks this: the double-backward nodes hold ``w`` itself (``grad_in = grad_out @ w``), so the
graph reaches ``w`` without passing through the output.

:func:`params_off_module_paths` walks the graph once and returns the parameters reached by such a
path; the engine routes them to an exact engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Region:
    """The local region of one module call in the autograd graph.

    Attributes:
        output: the autograd node that produced the module's output.
        inputs: the autograd nodes of the module's tensor inputs (where the region ends).
        params: ids of the parameters this call owns (reaching them inside the region is fine).
        output_nr: which output of ``output`` the module's output is: a node with several (a
            cuDNN LSTM's output and states, a custom Function's) is entered through that one only.
    """

    output: Any
    inputs: frozenset[Any]
    params: frozenset[int]
    output_nr: int = 0


def params_off_module_paths(root: Any, regions: Sequence[Region], watched: Iterable[int], root_nr: int = 0) -> set[int]:
    """Ids in ``watched`` of parameters that ``root`` reaches by a path outside their modules.

    A path is fine if the innermost hooked region it is in, entered through that region's output
    (the node and which of its outputs), owns the parameter and the path stays inside the region (does not leave through an
    input node) until the parameter's ``AccumulateGrad`` node. Regions nest: a module whose rows
    come through its own graph (its handler needs its output) may call hooked modules inside its
    forward, whose regions the path then enters and leaves (through their inputs) before it is
    back in the outer one; regions sharing an output node (an outer module returning an inner
    one's output) are entered outermost first (the inner call is recorded first). Any other path
    to a watched parameter (through a double-backward node, a view of the weight used elsewhere,
    another module's region) makes the parameter "off path". Each node is visited at most once
    per nesting of regions.

    Args:
        root: ``residuals.grad_fn``.
        regions: one per hooked module call, in the order the calls ended.
        watched: ids of the parameters the hooks engine would compute.
        root_nr: which output of ``root`` the residuals are.
    """
    watched = set(watched)
    at_output: dict[tuple[Any, int], list[int]] = {}
    for index, region in enumerate(regions):
        at_output.setdefault((region.output, region.output_nr), []).append(index)
    found: set[int] = set()
    seen: set[tuple[Any, int, tuple[int, ...]]] = set()
    # (node, the output of it the edge leads to, the regions it is in, outermost first; () is
    # outside every region)
    stack: list[tuple[Any, int, tuple[int, ...]]] = [(root, root_nr, ())]
    while stack:
        node, nr, path = stack.pop()
        if (node, nr, path) in seen:
            continue
        seen.add((node, nr, path))
        if path and node in regions[path[-1]].inputs:
            stack.append((node, nr, path[:-1]))  # left the innermost module through one of its inputs
            continue
        entered = [index for index in at_output.get((node, nr), ()) if index not in path]
        if entered:
            stack.append((node, nr, path + tuple(sorted(entered, reverse=True))))
            continue
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if variable is not None:
            if id(variable) in watched and (not path or id(variable) not in regions[path[-1]].params):
                found.add(id(variable))
            continue
        stack.extend((child, child_nr, path) for child, child_nr in node.next_functions if child is not None)
    return found
