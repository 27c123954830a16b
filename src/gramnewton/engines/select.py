"""Choosing an engine for a model or a list of parameters: a registry of named engines.

Each name maps to a factory ``(params, model) -> GramEngine``; :func:`register_engine` adds one,
so ``GramGaussNewton(model, engine="my_engine")`` can build it. ``"auto"`` is not a registered
engine but the rule in :func:`select_engine`. :func:`called_modules` finds the model a closure
runs, for an optimizer given parameters only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .base import Closure, GramEngine, reevaluate
from .functional import FunctionalEngine
from .hooks import HooksEngine, supports_any
from .reference import ReferenceEngine

EngineFactory = Callable[[Sequence[Tensor], "nn.Module | None"], GramEngine]
ENGINE_FACTORIES: dict[str, EngineFactory] = {}


def register_engine(name: str, factory: EngineFactory) -> EngineFactory:
    """Register ``factory(params, model) -> GramEngine`` under ``name`` (a second use of a name raises).

    ``model`` is the ``nn.Module`` given to the optimizer, or ``None`` when it got parameters only;
    a factory that needs the model should raise a ``ValueError`` saying so.
    """
    if name == "auto" or name in ENGINE_FACTORIES:
        raise ValueError(f"an engine named {name!r} is already registered")
    ENGINE_FACTORIES[name] = factory
    return factory


def _hooks(params: Sequence[Tensor], model: nn.Module | None) -> GramEngine:
    if model is None:
        raise ValueError("engine='hooks' needs the model: pass the nn.Module to GramGaussNewton")
    return HooksEngine(model, params)


register_engine("hooks", _hooks)
register_engine("reference", lambda params, model: ReferenceEngine(params))
register_engine("functional", lambda params, model: FunctionalEngine(params))


def engine_names() -> tuple[str, ...]:
    """``"auto"`` and every registered engine name."""
    return ("auto", *ENGINE_FACTORIES)


def select_engine(params: Sequence[Tensor], model: nn.Module | None, engine: str | GramEngine) -> GramEngine:
    """Return the engine named by ``engine`` for ``params``.

    ``"auto"`` picks the fastest engine that supports ``model``: :class:`HooksEngine` when at
    least one of ``params`` belongs to a module it takes (any module, unless its handler refuses
    the instance, e.g. an Embedding with ``scale_grad_by_freq``; parameters it cannot take go to the reference engine,
    with a warning), else the reference engine. (A network of raw parameters in one module, an
    8-96-96-1 MLP at b = 128 and a 1-20-1 one at b = 1000: 8.4 and 9.9 ms a step on the hooks
    engine's per-sample recomputation, 14.8 and 249 ms on the reference engine.) Both are exact for any closure: the
    hooks engine routes parameters it cannot see through (e.g. residuals with input derivatives)
    to the reference engine. ``"functional"`` is :class:`FunctionalEngine`, the fast exact engine
    for a :class:`~gramnewton.engines.FunctionalResidual` closure (physics-informed residuals).
    ``"hooks"`` needs a model. Other names are looked up in the registry
    (:func:`register_engine`). An engine instance is returned as given.
    """
    if not isinstance(engine, str):
        return engine
    if engine == "auto":
        if model is not None and supports_any(model, params):
            return HooksEngine(model, params)
        return ReferenceEngine(params)
    if engine not in ENGINE_FACTORIES:
        raise ValueError(f"Invalid engine: {engine!r}; expected one of {engine_names()} or an engine instance")
    return ENGINE_FACTORIES[engine](params, model)


def called_modules(
    closure: Closure, params: Sequence[Tensor], *, before_call: Callable[[nn.Module], None] | None = None
) -> nn.Module | None:
    """The modules that ``closure`` calls outermost and that own some of ``params`` (the model it
    runs): one module, an ``nn.ModuleList`` of several (e.g. an encoder and a head called one
    after the other), or ``None`` when no called module owns any of them (a network of raw
    tensors). For an optimizer given parameters only (``GramGaussNewton(model.parameters())``,
    torch.optim's idiom), so that ``"auto"`` can still choose the hooks engine.

    ``closure`` is run once without gradients (with autograd if it differentiates inside, see
    :func:`~.base.reevaluate`, which inside a step also replays the step's random draws and
    leaves the generators as they were), with global forward hooks that note the nesting of
    module calls; the hooks are removed before this returns. Parameters the closure uses outside
    every module it calls stay with the reference engine (the hooks engine routes them).
    ``before_call(module)`` runs before each outermost call, e.g. to refuse a module (raising)
    before its forward pass changes anything (a BatchNorm's running statistics)."""
    wanted = {id(p) for p in params}
    depth = 0  # module calls open around the current one
    outermost: dict[int, nn.Module] = {}

    def enter(module: nn.Module, args: Any) -> None:
        nonlocal depth
        if depth == 0:
            if before_call is not None:
                before_call(module)
            outermost.setdefault(id(module), module)
        depth += 1

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal depth
        depth -= 1

    handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave, always_call=True)]
    try:
        # a compiled model runs eagerly (as in the engine's forward): nothing is compiled for this
        # one run, and torch's note that its hooks fire twice under global hooks (these two only
        # count calls) is not shown
        with warnings.catch_warnings(), torch.compiler.set_stance("force_eager"):
            warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
            reevaluate(closure)
    finally:
        for handle in handles:
            handle.remove()
    owners = [m for m in outermost.values() if any(id(p) in wanted for p in m.parameters())]
    if not owners:
        return None
    return owners[0] if len(owners) == 1 else nn.ModuleList(owners)
