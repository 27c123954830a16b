"""Engines that compute the per-sample Gram matrix ``G = J J^T`` and ``J^T r``."""

from .base import Closure, GramEngine, GramSystem, residuals_2d
from .hooks import HooksEngine
from .reference import ReferenceEngine, jacobian_rows

__all__ = ["Closure", "GramEngine", "GramSystem", "HooksEngine", "ReferenceEngine", "jacobian_rows", "residuals_2d"]
