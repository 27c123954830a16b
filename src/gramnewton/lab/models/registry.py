"""Model registry: one named builder per architecture (duplicate names raise)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs`` (``in_channels``, ``num_outputs``, ...)."""
    return MODELS.get(name)(**kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()
