"""Choosing an engine for a model or a list of parameters."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .base import GramEngine
from .functional import ReferenceEngine

ENGINES = ("auto", "reference")


def select_engine(params: Sequence[Tensor], model: nn.Module | None, engine: str | GramEngine) -> GramEngine:
    """Return the engine named by ``engine`` for ``params``.

    ``"auto"`` picks the fastest engine that supports ``model``; without a model only the
    reference engine applies. An engine instance is returned as given.
    """
    if not isinstance(engine, str):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"Invalid engine: {engine!r}; expected one of {ENGINES} or an engine instance")
    return ReferenceEngine(params)
