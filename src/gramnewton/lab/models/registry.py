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


def check_sizes(**sizes: object) -> None:
    """Raise ``ValueError`` naming the first of ``sizes`` (a width, a channel or output count) that
    is not a positive ``int``: torch builds a layer of width 0 (a network whose output is a
    constant, or NaN) and fails on a negative one with a message that names no argument."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()
