"""Training loops of the studies, generic over the model: full-batch GGN and cyclic mini-batches.

Every loop uses the project's own update (:func:`gramnewton.full_batch_step`); on a batch,
Eq. 10 is Eq. 9 restricted to that batch, so the same function serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...update import full_batch_step
from .closed_form import make_engine

BatchStep = Callable[[Tensor, Tensor], None]


def residual(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``f(x) - y`` of a single-output model, ``(n,)``, without a graph."""
    with torch.no_grad():
        return model(x).squeeze(1) - y


def trainable(model: nn.Module) -> list[Tensor]:
    """The parameters that require grad (``W`` only for the two-layer net)."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class FullBatchTrace:
    """``steps`` full-batch GGN steps.

    Attributes:
        residuals: ``steps + 1`` vectors ``f_t - y`` of shape ``(n,)``, ``t = 0..steps``.
        grams: ``steps`` Gram matrices ``G_t`` of shape ``(n, n)``, ``t = 0..steps-1``.
    """

    residuals: list[Tensor]
    grams: list[Tensor]


def run_full_batch(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, engine: str = "closed_form", stop_below: float = 0.0
) -> FullBatchTrace:
    """Full-batch GGN (Eq. 9, ``lam = 1``, ``alpha = 0``) on ``x`` ``(n, d)``, ``y`` ``(n,)``.

    Stops early, with fewer entries in the trace, once ``||f_t - y|| <= stop_below``.
    """
    residuals, grams = [], []
    for _ in range(steps):
        if float(residual(model, x, y).norm()) <= stop_below:
            break
        step = full_batch_step(trainable(model), lambda: model(x).squeeze(1) - y, engine=make_engine(engine, model, x))
        residuals.append(step.residuals[:, 0].clone())
        grams.append(step.gram)
    residuals.append(residual(model, x, y))
    return FullBatchTrace(residuals, grams)


def ggn_batch_step(model: nn.Module, engine: str = "closed_form") -> BatchStep:
    """Mini-batch GGN (Eq. 10, ``lam = 1``, ``alpha = 0``) on one batch ``(xb, yb)``."""

    def step(xb: Tensor, yb: Tensor) -> None:
        full_batch_step(trainable(model), lambda: model(xb).squeeze(1) - yb, engine=make_engine(engine, model, xb))

    return step


def sgd_batch_step(model: nn.Module, lr: float) -> BatchStep:
    """Plain SGD with step ``lr`` on ``1/2 sum_{i in B} (f_i - y_i)^2`` (the sum, as in the GGN residual map)."""
    opt = torch.optim.SGD(trainable(model), lr=lr)

    def step(xb: Tensor, yb: Tensor) -> None:
        opt.zero_grad()
        (0.5 * (model(xb).squeeze(1) - yb).square().sum()).backward()
        opt.step()

    return step


def run_epochs(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, epochs: int, step: BatchStep) -> list[Tensor]:
    """Cyclic mini-batches in a fixed order (as Theorem 2 assumes); ``n`` must be a multiple of ``batch_size``.

    Returns:
        ``epochs + 1`` residual vectors ``f_{tk} - y`` of shape ``(n,)``, one per epoch boundary.
    """
    n = x.shape[0]
    if n % batch_size:
        raise ValueError(f"n = {n} must be a multiple of the batch size {batch_size}")
    out = [residual(model, x, y)]
    for _ in range(epochs):
        for start in range(0, n, batch_size):
            step(x[start : start + batch_size], y[start : start + batch_size])
        out.append(residual(model, x, y))
    return out
