"""GGN in a diagonal metric: the demo's runs with an engine that scales the Gram by Adam's second moments.

Not a test, and not part of the library: a study of issue 15's seed 0 (docs/convergence.md,
thirty-seventh session). GGN takes the step of least Euclidean norm that fits the batch; in a
metric ``D^{-1}`` (``D`` diagonal, positive) the same kernel regression reads

    phi = mu phi_prev + D J^T (lam J D J^T + alpha I)^{-1} (r - lam mu J phi_prev),

the minimiser of ``lam ||J phi - r / lam||^2 + alpha ||phi - mu phi_prev||^2_{D^{-1}}``. So an
engine that returns the Gram ``J D J^T``, ``v -> D J^T v`` and the plain ``v -> J v`` gives it
through the shipped optimizer unchanged (its momentum, damping rule and rejection).
:class:`DiagonalMetricEngine` forms ``J`` with ``torch.func`` (``vmap(jacrev)``, exact, about twice
the hooks engine's time on the demo's network: compare runs per epoch, not per second) and ``D``
from Adam's second moment of the mini-batch gradient ``g = J^T r / b``: ``v <- beta2 v + (1 - beta2)
g^2``, ``s = sqrt(v / (1 - beta2^t))``, ``D = (s + 1e-3 mean(s))^(-power)`` divided by its mean (so
that ``alpha`` keeps its scale). ``power`` 1 is Adam's metric, 1/2 its square root, 0 the Euclidean one
(the shipped step, as a check of the engine).

The engines are registered as ``adam_metric`` (power 1), ``adam_metric_3q`` (3/4),
``adam_metric_half``, ``adam_metric_quarter`` and ``euclidean_metric`` (0); the command line is
``demo_variants.py``'s, e.g.::

    python benchmarks/diagonal_metric.py --seed 0 --seconds 240 --mark 5 --out runs.json \\
        'GGN/adam-metric={"engine": "adam_metric"}' 'GGN/half-metric={"engine": "adam_metric_half"}'
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from demo_variants import main
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from gramnewton.engines import Closure, GramSystem, register_engine

BETA2 = 0.999  # Adam's default
RELATIVE_EPS = 1e-3  # s + 1e-3 mean(s): a coordinate whose gradients vanish gets a bounded weight


class DiagonalMetricEngine:
    """Exact GGN system in the metric ``D^{-1}``: ``G = J D J^T`` ``(b*k, b*k)``, ``jt_times(v) = D J^T v``,
    ``j_times(u) = J u`` (plain: momentum's ``J phi_prev``). ``J`` ``(b*k, m)`` by ``torch.func`` on the
    input the model was last called with (a forward pre-hook), rows sample-major as every engine's.
    ``D`` is updated once per :meth:`compute` (a rejected step's batch counts too).
    """

    can_skip_gram = False

    def __init__(self, params: Sequence[Tensor], model: nn.Module | None, power: float) -> None:
        if model is None:
            raise ValueError("the diagonal-metric engine needs the model: pass the nn.Module to GramGaussNewton")
        wanted = {id(p) for p in params}
        self.model, self.power = model, power
        self.names = [name for name, p in model.named_parameters() if id(p) in wanted]
        self.params = [p for p in model.parameters() if id(p) in wanted]
        first = self.params[0]
        self.second_moment = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.steps = 0
        self._input: Tensor | None = None
        self._forming = False
        model.register_forward_pre_hook(self._remember_input)

    def _remember_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self._forming:  # not the per-sample calls of jacobian()
            self._input = args[0]

    def jacobian(self) -> Tensor:
        """``J`` ``(b*k, m)`` at the current weights for the last input."""
        if self._input is None:
            raise RuntimeError("the closure did not call the model")
        own = {n: p.detach() for n, p in zip(self.names, self.params)}

        def outputs(values: dict[str, Tensor], sample: Tensor) -> Tensor:
            return functional_call(self.model, values, (sample.unsqueeze(0),)).reshape(-1)

        samples = self._input.detach()
        self._forming = True
        try:
            per_sample = vmap(jacrev(outputs), in_dims=(None, 0))(own, samples)  # name -> (b, k, *shape)
        finally:
            self._forming = False
        b, k = samples.shape[0], next(iter(per_sample.values())).shape[1]
        return torch.cat([per_sample[n].reshape(b * k, -1) for n in self.names], dim=1)

    def update_metric(self, jacobian: Tensor, residuals: Tensor) -> Tensor:
        """Adam's second moment of ``g = J^T r / b`` and ``D = (s + eps mean s)^(-power) / mean``."""
        gradient = jacobian.T @ residuals.reshape(-1) / residuals.shape[0]
        self.steps += 1
        self.second_moment.mul_(BETA2).add_(gradient.square(), alpha=1 - BETA2)
        scale = (self.second_moment / (1 - BETA2**self.steps)).sqrt()
        metric = (scale + RELATIVE_EPS * scale.mean()).pow(-self.power)
        return metric / metric.mean()

    def compute(self, closure: Closure) -> GramSystem:
        with torch.enable_grad():
            value = closure()
        if isinstance(value, tuple):
            raise ValueError("the diagonal-metric engine takes residuals (the square loss) only")
        residuals = value.detach().reshape(value.shape[0], -1)
        jacobian = self.jacobian()
        metric = self.update_metric(jacobian, residuals)
        scaled = jacobian * metric
        sizes = [p.numel() for p in self.params]

        def jt_times(v: Tensor) -> list[Tensor]:
            return [c.view_as(p) for c, p in zip((scaled.T @ v.reshape(-1)).split(sizes), self.params)]

        def j_times(u: Sequence[Tensor]) -> Tensor:
            return jacobian @ torch.cat([t.reshape(-1) for t in u])

        return GramSystem(residuals=residuals, gram=scaled @ jacobian.T, jt_times=jt_times, j_times=j_times)


# the power of Adam's metric in each engine's name: D = (s + eps)^(-power)
POWERS = {"adam_metric": 1.0, "adam_metric_3q": 0.75, "adam_metric_half": 0.5, "adam_metric_quarter": 0.25}
for engine_name, engine_power in (*POWERS.items(), ("euclidean_metric", 0.0)):
    register_engine(engine_name, functools.partial(DiagonalMetricEngine, power=engine_power))

if __name__ == "__main__":
    main()
