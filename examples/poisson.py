"""Physics-informed network for the Poisson equation, trained with Gram-Gauss-Newton.

``-Laplace u = f`` on the unit cube ``[0, 1]^d``, ``u = u*`` on its boundary, with two
manufactured solutions:

- ``--dim 2``: ``u*(x, y) = sin(pi x) sin(pi y)`` (zero on the boundary),
- ``--dim 5``: ``u*(x) = sum_i cos(pi x_i)``, the 5-D problem of arXiv 2505.12149 (their
  ``cos_sum``: a 5-64-64-48-48-1 tanh network, 10065 parameters, 3000 interior and 500 boundary
  points, float64).

The residual is ``sqrt(1/n_in) (-Laplace u - f)`` at interior points and
``sqrt(1/n_bd) (u - u*)`` at boundary points (half its squared norm is the usual PINN loss), in
one of two forms (``--form``):

- ``taylor`` (default): :func:`gramnewton.pinn.taylor_residual`, the Laplacian propagated
  forward through the MLP (:class:`gramnewton.pinn.ForwardLaplacian`); a plain closure whose
  per-sample Jacobian the default hooks engine computes exactly (``engine="auto"``);
- ``functional``: :func:`gramnewton.pinn.residual`, a :class:`gramnewton.engines.FunctionalResidual`
  with the Laplacian by ``torch.func.hessian``, for the ``functional`` engine (``vmap(jacrev)``).

Run:  PYTHONPATH=src python examples/poisson.py --dim 2 --seconds 60
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gramnewton import GainRatioDamping, GramGaussNewton, gram_gauss_newton_direction, pinn
from gramnewton.engines import FunctionalResidual
from gramnewton.engines.select import select_engine
from gramnewton.solve import check_damping
from gramnewton.update import check_momentum

Residual = FunctionalResidual | pinn.TaylorResidual
# residual form -> the engine that computes its Gram matrix exactly and fast
ENGINES = {"taylor": "auto", "functional": "functional"}


@dataclass(frozen=True)
class Poisson:
    """``-Laplace u = f`` on ``[0, 1]^dim`` with the manufactured solution named ``solution``."""

    dim: int
    solution: str  # "sin_product" or "cos_sum"

    def exact(self, x: Tensor) -> Tensor:
        """``u*`` at ``(..., dim)`` points, shape ``(...)``."""
        if self.solution == "sin_product":
            return torch.sin(math.pi * x).prod(-1)
        return torch.cos(math.pi * x).sum(-1)

    def source(self, x: Tensor) -> Tensor:
        """``f = -Laplace u*`` (both solutions are eigenfunctions of the Laplacian)."""
        scale = self.dim if self.solution == "sin_product" else 1
        return scale * math.pi**2 * self.exact(x)


# dimension -> (problem, hidden widths, interior points, boundary points)
PROBLEMS = {
    2: (Poisson(2, "sin_product"), (64,), 900, 120),
    5: (Poisson(5, "cos_sum"), (64, 64, 48, 48), 3000, 500),
}


def make_model(dim: int, widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """A float64 tanh MLP ``dim -> widths -> 1`` with PyTorch's default initialisation."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in zip((dim, *widths), widths):
        layers += [nn.Linear(n_in, n_out), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 1)).double()


def make_residual(
    model: nn.Sequential, problem: Poisson, n_in: int, n_bd: int, generator: torch.Generator, form: str = "taylor"
) -> Residual:
    """Fresh collocation points and the weighted interior + boundary residual on them, in the
    ``form`` ``"taylor"`` (forward Laplacian) or ``"functional"`` (``torch.func``)."""
    box = ([0.0] * problem.dim, [1.0] * problem.dim)
    x_in = pinn.sample_interior(n_in, *box, generator=generator)
    x_bd = pinn.sample_boundary(n_bd, *box, generator=generator)
    if form == "taylor":
        return pinn.taylor_residual(
            model,
            (lambda t, x: -t.laplacian[:, 0] - problem.source(x), x_in),
            (lambda t, x: t.value[:, 0] - problem.exact(x), x_bd),
        )
    if form != "functional":
        raise ValueError(f"unknown residual form {form!r}; expected one of {sorted(ENGINES)}")
    u = pinn.pointwise(model)

    def interior(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return -pinn.laplacian(lambda y: u(p, y), x) - problem.source(x)

    def boundary(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return u(p, x) - problem.exact(x)

    return pinn.residual(dict(model.named_parameters()), (interior, x_in), (boundary, x_bd))


def points_and_scales(residual: Residual) -> tuple[tuple[Tensor, Tensor], tuple[float, float]]:
    """The interior and boundary points of ``residual`` and their rows' scales."""
    if isinstance(residual, FunctionalResidual):
        (x_in,), (x_bd,) = (t.inputs for t in residual.terms)
        return (x_in, x_bd), (residual.terms[0].weight, residual.terms[1].weight)
    (_, x_in, w_in), (_, x_bd, w_bd) = residual.parts
    return (x_in, x_bd), (w_in, w_bd)


def autograd_residual(model: nn.Module, problem: Poisson, residual: Residual) -> Callable[[], Tensor]:
    """The same rows as ``residual`` (its points and weights), with the Laplacian by
    ``torch.autograd.grad(create_graph=True)`` on the whole batch: what first-order optimizers
    are given (for them faster than the per-sample ``torch.func`` form)."""
    (x_in, x_bd), (w_in, w_bd) = points_and_scales(residual)

    def closure() -> Tensor:
        x = x_in.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(problem.dim))
        interior = w_in * (-lap - problem.source(x_in))
        return torch.cat([interior, w_bd * (model(x_bd).squeeze(-1) - problem.exact(x_bd))])

    return closure


def make_error(model: nn.Module, problem: Poisson, n_eval: int = 10_000, seed: int = 12345) -> Callable[[], float]:
    """Relative L2 error of ``model`` on ``n_eval`` fixed uniform points of the domain."""
    x = pinn.sample_interior(
        n_eval, [0.0] * problem.dim, [1.0] * problem.dim, generator=torch.Generator().manual_seed(seed)
    )
    exact = problem.exact(x)

    def error() -> float:
        with torch.no_grad():
            return pinn.relative_l2(model(x).squeeze(-1), exact)

    return error


def ggn_optimizer(model: nn.Module, alpha: float = 1e-3, form: str = "taylor", **kwargs) -> GramGaussNewton:
    """GGN with Levenberg-Marquardt damping (``alpha`` adapted), the engine of the residual ``form``."""
    damping = GainRatioDamping(min_alpha=1e-12)
    return GramGaussNewton(
        model, lam=1.0, alpha=alpha, engine=ENGINES[form], adaptive_damping=damping, **{"momentum": 0.0, **kwargs}
    )


class LineSearchGGN:
    """GGN with a grid line search on the step length: ENGD-W, and SPRING with ``momentum > 0``
    (the protocols of arXiv 2505.12149).

    Each step computes the direction ``d = -phi_t`` of :func:`gramnewton.gram_gauss_newton_direction`
    with a tiny fixed ``alpha`` (nearly the undamped Gauss-Newton direction; with momentum ``mu``,
    ``phi_t = mu phi_{t-1} + J^T (G + alpha I)^{-1} (r - mu J phi_{t-1})``) and moves to
    ``w + eta d`` for the ``eta`` in ``1, 1/2, 1/4, ...`` with the smallest loss on the step's
    points (the halving stops at the first ``eta`` that does no better than the previous one;
    ``eta = 0`` if none decreases it). Each trial costs one evaluation of the residuals, no
    Jacobian. The system is solved in parameter space when there are fewer parameters than
    residuals (``solve_space="auto"``). ``form`` is the residual form the steps will get (it
    picks the engine: :data:`ENGINES`).
    """

    def __init__(
        self, model: nn.Module, alpha: float = 1e-10, momentum: float = 0.0, halvings: int = 30, form: str = "taylor"
    ):
        # refused here, before a run starts, not at its first step
        check_damping(1.0, alpha)
        check_momentum(momentum)
        if isinstance(halvings, bool) or not isinstance(halvings, int) or halvings < 1:
            raise ValueError(f"Invalid halvings: {halvings!r} (must be an int >= 1)")
        if form not in ENGINES:
            raise ValueError(f"unknown residual form {form!r}; expected one of {sorted(ENGINES)}")
        self.engine = select_engine(list(model.parameters()), model, ENGINES[form])
        self.alpha, self.momentum, self.halvings = alpha, momentum, halvings
        self.phi: list[Tensor] | None = None  # the previous direction, unscaled (SPRING's phi)
        self.last_eta = 0.0

    @torch.no_grad()
    def step(self, residual: Residual) -> Tensor:
        """One step; returns the mean squared residual before it (like ``GramGaussNewton.step``)."""
        with torch.enable_grad():
            found = gram_gauss_newton_direction(
                self.engine, residual, lam=1.0, alpha=self.alpha, momentum=self.momentum, previous=self.phi,
                solve_space="auto",
            )  # fmt: skip
        if self.momentum:
            self.phi = [-d for d in found.direction]
        params, start = self.engine.params, [p.detach().clone() for p in self.engine.params]
        best, self.last_eta, eta = float(found.residuals.pow(2).sum()), 0.0, 1.0
        for _ in range(self.halvings):
            for p, w, d in zip(params, start, found.direction):
                p.copy_(w + eta * d)
            loss = float(residual().pow(2).sum())
            if loss < best:
                best, self.last_eta = loss, eta
            elif self.last_eta > 0:
                break
            eta /= 2
        for p, w, d in zip(params, start, found.direction):
            p.copy_(w + self.last_eta * d)
        return found.loss


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a width or point count of 0 would train a constant)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (NaN or 0 would run no step, silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, choices=sorted(PROBLEMS), default=2)
    parser.add_argument("--seconds", type=positive_seconds, default=60.0, help="training time budget")
    parser.add_argument("--resample", action="store_true", help="new collocation points every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--momentum", type=float, default=0.0, help="SPRING momentum of the GGN direction, in [0, 1)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--widths", type=positive_int, nargs="+", help="hidden widths (default: the problem's)")
    parser.add_argument(
        "--points", type=positive_int, nargs=2, help="interior and boundary points (default: the problem's)"
    )
    parser.add_argument("--form", choices=sorted(ENGINES), default="taylor", help="residual form (and engine)")
    args = parser.parse_args()
    try:  # one line, before any work, as argparse's own errors
        check_momentum(args.momentum)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    problem, widths, n_in, n_bd = PROBLEMS[args.dim]
    widths = tuple(args.widths or widths)
    n_in, n_bd = args.points or (n_in, n_bd)
    model = make_model(args.dim, widths, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    error = make_error(model, problem)
    opt = LineSearchGGN(model, momentum=args.momentum, form=args.form)
    residual = make_residual(model, problem, n_in, n_bd, generator, args.form)
    print(f"{args.dim}-D Poisson, {sum(p.numel() for p in model.parameters())} parameters, {n_in}+{n_bd} points")
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        if args.resample:
            residual = make_residual(model, problem, n_in, n_bd, generator, args.form)
        loss = opt.step(residual)
        step += 1
        elapsed = time.perf_counter() - start
        print(
            f"step {step:4d}  {elapsed:7.1f} s  loss {float(loss):.3e}  eta {opt.last_eta:.3g}  rel. L2 {error():.3e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
