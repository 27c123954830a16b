"""Choosing an engine for a model or a list of parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .base import GramEngine
from .functional import FunctionalEngine
from .hooks import HooksEngine, supports_any
from .reference import ReferenceEngine

ENGINES = ("auto", "hooks", "reference", "functional")


def select_engine(params: Sequence[Tensor], model: nn.Module | None, engine: str | GramEngine) -> GramEngine:
    """Return the engine named by ``engine`` for ``params``.

    ``"auto"`` picks the fastest engine that supports ``model``: :class:`HooksEngine` when at
    least one of ``params`` belongs to a module it handles (the others then go to the reference
    engine, with a warning), else the reference engine. Both are exact for any closure: the
    hooks engine routes parameters it cannot see through (e.g. residuals with input derivatives)
    to the reference engine. ``"functional"`` is :class:`FunctionalEngine`, the fast exact engine
    for a :class:`~gramnewton.engines.FunctionalResidual` closure (physics-informed residuals).
    ``"hooks"`` needs a model. An engine instance is returned as given.
    """
    if not isinstance(engine, str):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r}; expected one of {ENGINES} or an engine instance")
    if engine == "hooks" and model is None:
        raise ValueError("engine='hooks' needs the model: pass the nn.Module to GramGaussNewton")
    if engine == "functional":
        return FunctionalEngine(params)
    if engine == "hooks" or (engine == "auto" and model is not None and supports_any(model, params)):
        return HooksEngine(model, params)
    return ReferenceEngine(params)
