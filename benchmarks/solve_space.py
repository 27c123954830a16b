"""Sample-space against parameter-space solve (``solve_space=``) when residuals outnumber parameters.

Not a test. The model is the time-to-target benchmark's sinc network (1-20-1 tanh MLP, ``m = 61``
parameters, float32, hooks engine) on batches of ``b`` points of ``y = sinc(10 x)``. For each batch
size both optimizers start from the same weights and take the same batches; their steps are
interleaved (one step of each per round, so a slow phase of the shared machine hits both alike)
and the median step time over the rounds is reported with its ratio. The two give the same step
up to round-off (push-through identity); the relative difference of the parameters after the
rounds is recorded, and so is the training loss they reach.

Both use ``alpha`` fixed (``--alpha``, default 0.1, the benchmark grid's value at batch 100; the sample-space
system ``lam G + alpha I`` of rank ``m < b`` has ``b - m`` eigenvalues equal to ``alpha``).

Usage::

    python benchmarks/solve_space.py --batch 100 1000 4000 --rounds 20

Writes ``benchmarks/results/solve_space.json`` (``torch.set_num_threads(2)``, load average
before and after every batch size).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gramnewton import GramGaussNewton
from gramnewton.lab.models import get_model

ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


def first_step_error(model: torch.nn.Module, batch: int, alpha: float, gen: torch.Generator) -> dict[str, float]:
    """Relative error of each space's float32 step against the float64 step (both spaces agree in
    float64 to round-off; their difference is recorded as ``float64_spaces``)."""
    x = 2 * torch.rand(batch, 1, generator=gen) - 1
    y = torch.sinc(10 * x)
    steps = {}
    for space in ("sample", "parameter"):
        for dtype in (torch.float32, torch.float64):
            m = copy.deepcopy(model).to(dtype)
            before = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double()
            GramGaussNewton(m, lam=1.0, alpha=alpha, adaptive_damping=False, solve_space=space, momentum=0.0).step(
                lambda m=m, d=dtype: m(x.to(d)) - y.to(d)
            )
            steps[space, dtype] = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double() - before
    exact = steps["parameter", torch.float64]
    error = {s: float((steps[s, torch.float32] - exact).norm() / exact.norm()) for s in ("sample", "parameter")}
    error["float64_spaces"] = float((steps["sample", torch.float64] - exact).norm() / exact.norm())
    return error


def run(batch: int, rounds: int, alpha: float, seed: int = 0) -> dict:
    """Interleaved steps of the two solve spaces on ``rounds`` batches of ``batch`` sinc points."""
    torch.manual_seed(seed)
    model = get_model("mlp", in_channels=1, hidden=(20,), act="tanh")
    models = {space: copy.deepcopy(model) for space in ("sample", "parameter")}
    opts = {
        space: GramGaussNewton(m, lam=1.0, alpha=alpha, adaptive_damping=False, solve_space=space, momentum=0.0)
        for space, m in models.items()
    }
    times: dict[str, list[float]] = {space: [] for space in models}
    losses: dict[str, list[float]] = {space: [] for space in models}
    methods: dict[str, set[str]] = {space: set() for space in models}
    gen = torch.Generator().manual_seed(seed)
    step_error = first_step_error(model, batch, alpha, gen)
    load_before = os.getloadavg()
    for _ in range(rounds):
        x = 2 * torch.rand(batch, 1, generator=gen) - 1
        y = torch.sinc(10 * x)
        for space, m in models.items():
            start = time.perf_counter()
            loss = opts[space].step(lambda m=m: m(x) - y)
            times[space].append(time.perf_counter() - start)
            losses[space].append(float(loss))
            methods[space].add(opts[space].last_diagnostics.solve_method)
    flat = {s: torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for s, m in models.items()}
    median = {s: statistics.median(t[1:]) for s, t in times.items()}  # the first step builds caches
    return {
        "batch": batch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "alpha": alpha,
        "rounds": rounds,
        "median_step_s": median,
        "sample_over_parameter": median["sample"] / median["parameter"],
        "last_loss": {s: v[-1] for s, v in losses.items()},
        "solve_methods": {s: sorted(v) for s, v in methods.items()},
        "first_step_relative_error_vs_float64": step_error,
        "relative_parameter_difference": float((flat["sample"] - flat["parameter"]).norm() / flat["parameter"].norm()),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000, 4000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "solve_space.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    results = []
    for batch in args.batch:
        result = run(batch, args.rounds, args.alpha)
        results.append(result)
        print(
            f"b={batch:5d}  sample {result['median_step_s']['sample'] * 1e3:8.2f} ms"
            f"  parameter {result['median_step_s']['parameter'] * 1e3:8.2f} ms"
            f"  ratio {result['sample_over_parameter']:6.2f}  loss {result['last_loss']}"
            f"  solves {result['solve_methods']}  step error {result['first_step_relative_error_vs_float64']}"
            f"  load {result['loadavg_before']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "threads": THREADS,
                "machine": platform.processor() or platform.machine(),
                "command": "python benchmarks/solve_space.py "
                + " ".join(
                    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()
                    if k != "out"
                ),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
