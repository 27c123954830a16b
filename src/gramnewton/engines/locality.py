"""Which parameters does a residual reach only through their modules' outputs?

The hooks engine computes ``dr_i / dw`` for a parameter ``w`` of a hooked module as
``sum_calls sum_outputs (dr_i / d out) (d out / d w)``: the chain rule through the module's
outputs, with the module's own local derivative. That is exact only if every path of the autograd
graph from the residuals to ``w`` enters the module's *local region* (the nodes between the
module's outputs and its inputs) through one of the module's outputs, and no path inside the
region arrives at another of its outputs (the gradient there would hold that path twice). A
residual that differentiates the network with respect to its inputs
(``torch.autograd.grad(..., create_graph=True)``, e.g. a Laplacian) breaks this: the
double-backward nodes hold ``w`` itself (``grad_in = grad_out @ w``), so the graph reaches ``w``
without passing through the output.

:func:`params_off_module_paths` walks the graph once and returns the parameters reached by such a
path, and those of modules with one output computed from another; the engine routes them to an
exact engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Region:
    """The local region of one module call in the autograd graph.

    Attributes:
        outputs: the graph edges ``(node, output_nr)`` of the module's outputs that the engine
            follows (a module returning several tensors has several; a node with several
            outputs, a cuDNN LSTM's or a custom Function's, is entered through these only).
        inputs: the autograd nodes of the module's tensor inputs (where the region ends).
        params: ids of the parameters this call owns (reaching them inside the region is fine).
        family: for a call whose rows may be taken through its recorded graph (its handler needs
            its outputs), an id of its module, else ``None``. Such a call's region also ends at
            the outputs of the same module's earlier calls (a state kept on the module,
            ``self.h``, leads there): its rows stop there (``handlers._cut_outside``), and the
            path beyond is the earlier call's, whose rows hold it.
        adoptable: ids of parameters the module does not own that its rows, taken through its
            graph, may hold (a descendant's that its forward uses without calling the
            descendant: ``nn.MultiheadAttention``'s ``out_proj``): reached inside the region
            (the innermost one) they are the call's, not off path.
    """

    outputs: frozenset[tuple[Any, int]]
    inputs: frozenset[Any]
    params: frozenset[int]
    family: int | None = None
    adoptable: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Locality:
    """What :func:`params_off_module_paths` finds, as ids of watched parameters.

    Attributes:
        off_path: parameters reached by a path outside their modules.
        entangled: parameters of a module one of whose outputs the residuals reach from inside the
            module itself, through another of its outputs (``(h, h * h)``): the gradient arriving
            at the first output already holds the second's, and their rows would count it twice.
        stops: per region (its index), the outputs ``(node, output_nr)`` of its module's earlier
            calls that a path from it reaches while inside it: where its rows must stop.
        adopted: per region (its index), the ``Region.adoptable`` parameters reached inside it.
    """

    off_path: set[int]
    entangled: set[int]
    stops: dict[int, set[tuple[Any, int]]]
    adopted: dict[int, set[int]]


def params_off_module_paths(root: Any, regions: Sequence[Region], watched: Iterable[int], root_nr: int = 0) -> Locality:
    """The parameters in ``watched`` that ``root`` reaches by a path outside their modules, and
    those of modules whose outputs are computed one from another (:class:`Locality`).

    A path is fine if the innermost hooked region it is in, entered through one of that region's
    outputs (the node and which of its outputs), owns the parameter and the path stays inside the
    region (does not leave through an input node) until the parameter's ``AccumulateGrad`` node.
    A path that arrives at an output of an earlier call of the same module (``Region.family``,
    through a state kept on the module) leaves the region there (noted in ``Locality.stops``) and
    enters the earlier call's, whose rows hold it: beyond that call's inputs it is in neither
    (the parameters reached there are off path). Regions nest: a module whose rows come through
    its own graph (its handler needs its output) may call hooked modules inside its forward, whose
    regions the path then enters and leaves (through their inputs) before it is back in the outer
    one; regions sharing an output (an outer module returning an inner one's output) are entered
    outermost first (the inner call is recorded first). A parameter reached with an innermost
    region that may adopt it (``Region.adoptable``) is that region's. Any other path to a watched
    parameter (a use outside every module owning it, a double-backward node, a view of the weight
    used elsewhere, another module's region) makes the parameter "off path".
    A path inside a region that arrives at one of that region's own outputs makes the region
    entangled. Each node is visited at most once per nesting of regions.

    Args:
        root: ``residuals.grad_fn``.
        regions: one per hooked module call, in the order the calls ended.
        watched: ids of the parameters the hooks engine would compute.
        root_nr: which output of ``root`` the residuals are.
    """
    watched = set(watched)
    families = [region.family for region in regions if region.family is not None]
    stopping = len(set(families)) < len(families)  # a module called twice; most networks: none
    stops: dict[int, set[tuple[Any, int]]] = {}
    at_output: dict[tuple[Any, int], list[int]] = {}
    for index, region in enumerate(regions):
        for edge in region.outputs:
            at_output.setdefault(edge, []).append(index)
    found: set[int] = set()
    adopted: dict[int, set[int]] = {}
    entangled: set[int] = set()
    seen: set[tuple[Any, int, tuple[int, ...]]] = set()
    # (node, the output of it the edge leads to, the regions it is in, outermost first (() is
    # outside every region), whether the innermost ones were just entered at this edge)
    stack: list[tuple[Any, int, tuple[int, ...], bool]] = [(root, root_nr, (), False)]
    while stack:
        node, nr, path, entering = stack.pop()
        here = at_output.get((node, nr))  # the regions with an output at this edge (most edges: none)
        if here and stopping and path and getattr(node, "variable", None) is None:
            # an earlier call's output (not a leaf: nothing of that call lies beyond it) ends the
            # regions of its module's later calls: their rows stop here
            ended = [
                i
                for i in path
                if regions[i].family is not None and any(j < i and regions[j].family == regions[i].family for j in here)
            ]
            for i in ended:
                stops.setdefault(i, set()).add((node, nr))
            path = tuple(i for i in path if i not in ended)
        if here and not entering and path:  # before the visit check: the edge may be seen already, entered from outside
            entangled.update(index for index in here if index in path)
        key = (node, nr, path)
        if key in seen:
            continue
        seen.add(key)
        if path and node in regions[path[-1]].inputs:
            stack.append((node, nr, path[:-1], False))  # left the innermost module through one of its inputs
            continue
        entered = [index for index in here if index not in path] if here else None
        if entered:
            stack.append((node, nr, path + tuple(sorted(entered, reverse=True)), True))
            continue
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if variable is not None:
            if id(variable) in watched and (not path or id(variable) not in regions[path[-1]].params):
                if path and id(variable) in regions[path[-1]].adoptable:
                    adopted.setdefault(path[-1], set()).add(id(variable))
                else:
                    found.add(id(variable))
            continue
        stack.extend((child, child_nr, path, False) for child, child_nr in node.next_functions if child is not None)
    # an entangled region's adopted parameters are its call's too
    tangled = {p for index in entangled for p in regions[index].params | adopted.get(index, set()) if p in watched}
    return Locality(found, tangled, stops, adopted)
