"""Full-batch GGN with ``alpha = 0`` (Eq. 9) on an ill-conditioned fit, against scipy (issue 11 item 7).

Not a test. A 1-256-1 tanh net fits 16 points of ``sin(3x)`` on ``[-1, 1]`` in float64 (the
problem of ``tests/test_reliability.py``), for several seeds:

- ``ggn_svd``: ``gramnewton.full_batch_step(alpha=0)`` as shipped (solve from ``J`` by SVD);
- ``ggn_gram``: the same step solved from ``G = J J^T`` (``damped_solve``: Cholesky, jitter, eigh);
- ``scipy_lm`` and ``scipy_dogbox``: ``scipy.optimize.least_squares`` with the same analytic
  Jacobian (``lm`` needs at least as many residuals as parameters: zero-padded), tolerances
  1e-15, at most 60 evaluations.

Reported per seed: ``||r||^2`` after each GGN step (10 steps), the first step reaching 1e-20, and
scipy's final ``||r||^2`` with its numbers of residual and Jacobian evaluations. Written to
``benchmarks/results/alpha_zero.json`` with the load average.

Usage::

    python benchmarks/alpha_zero.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import scipy.optimize
import torch
from torch import Tensor, nn

from gramnewton import full_batch_step
from gramnewton.engines import GramSystem, ReferenceEngine, jacobian_rows

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1e-20


def problem(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 256), nn.Tanh(), nn.Linear(256, 1)).double()
    x = torch.linspace(-1, 1, 16, dtype=torch.float64).unsqueeze(1)
    return model, x, torch.sin(3 * x).squeeze(1)


class GramOnly(ReferenceEngine):
    """The reference engine without its Jacobian: the update then solves from ``G``."""

    def compute(self, closure, **options):  # type: ignore[no-untyped-def]
        system = super().compute(closure, **options)
        return GramSystem(system.residuals, system.gram, system.jt_times)


def ggn(seed: int, gram_only: bool, steps: int = 10) -> dict:
    model, x, y = problem(seed)
    params = list(model.parameters())
    engine = GramOnly(params) if gram_only else ReferenceEngine(params)
    losses: list[float] = []
    error = None
    for _ in range(steps):
        try:
            full_batch_step(params, lambda: model(x).squeeze(1) - y, alpha=0.0, engine=engine)
        except Exception as exc:  # a refused step ends the run; recorded, not hidden
            error = f"{type(exc).__name__}: {exc}"
            break
        with torch.no_grad():
            losses.append(float((model(x).squeeze(1) - y).pow(2).sum()))
    hit = next((i + 1 for i, v in enumerate(losses) if v < TARGET), None)
    return {"losses": losses, "first_step_below_1e-20": hit, "error": error}


def scipy_fit(seed: int, method: str) -> dict:
    model, x, y = problem(seed)
    params = list(model.parameters())
    w0 = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    m, n = w0.size, y.numel()
    pad = m - n if method == "lm" else 0

    def load(w: np.ndarray) -> None:
        torch.nn.utils.vector_to_parameters(torch.from_numpy(w), params)

    def fun(w: np.ndarray) -> np.ndarray:
        load(w)
        with torch.no_grad():
            return np.concatenate([(model(x).squeeze(1) - y).numpy(), np.zeros(pad)])

    def jac(w: np.ndarray) -> np.ndarray:
        load(w)
        rows = jacobian_rows((model(x).squeeze(1) - y).unsqueeze(1), params).detach().numpy()
        return np.concatenate([rows, np.zeros((pad, m))])

    res = scipy.optimize.least_squares(fun, w0, jac=jac, method=method, xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=60)
    return {"final": float((res.fun**2).sum()), "nfev": int(res.nfev), "njev": int(res.njev), "status": int(res.status)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/alpha_zero.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    result: dict = {"threads": 2, "loadavg_1min": [os.getloadavg()[0]], "seeds": {}}
    for seed in args.seeds:
        row = {
            "ggn_svd": ggn(seed, gram_only=False),
            "ggn_gram": ggn(seed, gram_only=True),
            "scipy_lm": scipy_fit(seed, "lm"),
            "scipy_dogbox": scipy_fit(seed, "dogbox"),
        }
        result["seeds"][str(seed)] = row
        print(
            f"seed {seed}: ggn_svd hits 1e-20 at step {row['ggn_svd']['first_step_below_1e-20']} "
            f"(last {row['ggn_svd']['losses'][-1]:.1e}); ggn_gram at {row['ggn_gram']['first_step_below_1e-20']} "
            f"(last {row['ggn_gram']['losses'][-1]:.1e}); scipy lm {row['scipy_lm']['final']:.1e} "
            f"({row['scipy_lm']['njev']} J), dogbox {row['scipy_dogbox']['final']:.1e} ({row['scipy_dogbox']['njev']} J)"
        )
    result["loadavg_1min"].append(os.getloadavg()[0])
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
