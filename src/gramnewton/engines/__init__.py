"""Engines that compute the per-sample Gram matrix ``G = J J^T`` and ``J^T r``."""

from .base import Closure, GramEngine, GramSystem, residuals_2d
from .functional import FunctionalEngine, FunctionalResidual, Term
from .handlers import register_handler
from .hooks import HooksEngine
from .reference import ReferenceEngine, jacobian_rows
from .select import register_engine

__all__ = [
    "Closure",
    "FunctionalEngine",
    "FunctionalResidual",
    "GramEngine",
    "GramSystem",
    "HooksEngine",
    "ReferenceEngine",
    "Term",
    "jacobian_rows",
    "register_engine",
    "register_handler",
    "residuals_2d",
]
