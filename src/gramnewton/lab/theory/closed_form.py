"""Closed-form Gram system of the two-layer network of Eq. 12 (no dense Jacobian).

For ``f(x) = (1/sqrt(M)) sum_r a_r sigma(w_r . x)`` with only ``W`` trained, row ``i`` of ``J``
is ``(1/sqrt(M)) a_r sigma'(w_r . x_i) x_i`` for each neuron ``r``, so

    G_ij = (1/M) sum_r a_r^2 sigma'(w_r . x_i) sigma'(w_r . x_j) (x_i . x_j),
    (J^T v)_r = (a_r / sqrt(M)) sum_i v_i sigma'(w_r . x_i) x_i,
    (J V)_i = sum_r (a_r / sqrt(M)) sigma'(w_r . x_i) (V_r . x_i).

Both cost ``O(n M d + n^2 M)`` memory-light work, where the reference engine's dense ``J`` of
shape ``(n, M d)`` took 23 s and 6.7 GB per step at ``M = 2^16``, ``n = 64`` on this machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ...engines import Closure, GramEngine, GramSystem, ReferenceEngine, residuals_2d
from ..models import TwoLayerNet
from .activation import activation_derivative


class TwoLayerEngine:
    """Gram engine for a single-output :class:`TwoLayerNet` evaluated on fixed ``inputs`` ``(b, d)``.

    The closure must return the residuals of exactly these ``b`` inputs, in order.
    """

    def __init__(self, model: TwoLayerNet, inputs: Tensor):
        if model.a.shape[1] != 1:
            raise ValueError(f"TwoLayerEngine supports one output, the model has {model.a.shape[1]}")
        self.model = model
        self.inputs = inputs.flatten(1)
        self.params = [model.hidden.weight]

    def compute(self, closure: Closure) -> GramSystem:
        with torch.enable_grad():
            residuals = residuals_2d(closure())
        if residuals.shape[0] != self.inputs.shape[0]:
            raise ValueError(f"closure returned {residuals.shape[0]} residuals for {self.inputs.shape[0]} inputs")
        weight = self.model.hidden.weight.detach()
        x = self.inputs.to(weight.dtype)
        width = weight.shape[0]
        slopes = activation_derivative(self.model.act, x @ weight.T)  # (b, M)
        a = self.model.a[:, 0].to(weight.dtype)  # (M,)
        gram = ((slopes * a.square()) @ slopes.T / width) * (x @ x.T)

        def jt_times(v: Tensor) -> list[Tensor]:
            v = v.to(weight.dtype)
            return [(a / math.sqrt(width)).unsqueeze(1) * (slopes.T @ (v.unsqueeze(1) * x))]

        def j_times(v: Sequence[Tensor]) -> Tensor:
            # (J v)_i = sum_r (a_r / sqrt(M)) sigma'(w_r . x_i) (v_r . x_i)
            return ((x @ v[0].to(weight.dtype).T) * slopes * (a / math.sqrt(width))).sum(1)

        return GramSystem(residuals=residuals.detach(), gram=gram, jt_times=jt_times, j_times=j_times)


ENGINES = ("closed_form", "reference")


def make_engine(kind: str, model: torch.nn.Module, inputs: Tensor) -> GramEngine:
    """``"closed_form"`` (:class:`TwoLayerEngine`, two-layer net only) or ``"reference"`` (dense ``J``)."""
    if kind == "closed_form":
        if not isinstance(model, TwoLayerNet):
            raise ValueError(f"the closed-form engine needs a TwoLayerNet, got {type(model).__name__}")
        return TwoLayerEngine(model, inputs)
    if kind == "reference":
        return ReferenceEngine([p for p in model.parameters() if p.requires_grad])
    raise ValueError(f"unknown engine {kind!r}; expected one of {ENGINES}")
