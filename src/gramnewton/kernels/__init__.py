"""Engines that compute the per-sample Gram matrix ``G = J J^T`` and ``J^T r``."""

from .base import Closure, GramEngine, GramSystem, residuals_2d
from .functional import ReferenceEngine, jacobian_rows
from .hooks import HooksEngine

__all__ = ["Closure", "GramEngine", "GramSystem", "HooksEngine", "ReferenceEngine", "jacobian_rows", "residuals_2d"]
