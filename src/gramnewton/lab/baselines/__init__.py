"""Baseline optimizers that torch.optim lacks (SGD and Adam are torch.optim's own)."""

from .kfac import KFAC

__all__ = ["KFAC"]
