"""PINN benchmark: relative L2 error against training seconds, GGN against Adam and L-BFGS.

Not a test. The problems are those of ``examples/poisson.py``: ``-Laplace u = f`` on
``[0, 1]^d``, ``--problem 2d`` (``u* = sin(pi x) sin(pi y)``) or ``5d`` (``u* = sum_i cos(pi x_i)``,
arXiv 2505.12149). Every method starts from the same initialisation per seed and trains on the
same collocation points (drawn once per seed; ``--resample`` draws new points every step for the
methods that take a step per batch: GGN and Adam) for the same wall-clock budget.

Methods (``--methods``):

- ``ggn``: :class:`LineSearchGGN` of the example: the GGN direction with ``alpha = 1e-10`` and a
  grid line search on the step length (the ENGD-W protocol of arXiv 2505.12149).
- ``ggn-lm``: ``GramGaussNewton(adaptive_damping=...)``: Levenberg-Marquardt damping instead of a
  line search.
- ``ggn-lm-geo``: ``ggn-lm`` with ``geodesic_acceleration=True`` (Levenberg-Marquardt's
  second-order correction: one more residual evaluation and solve per step).

GGN gets the residual in the form ``--form``: ``taylor`` (default; the forward Laplacian, hooks
engine) or ``functional`` (``torch.func``, functional engine).
- ``ggn-momentum``: ``ggn`` with SPRING's momentum ``MOMENTUM`` on the direction (its line search
  too), when the installed gramnewton has ``momentum``; skipped otherwise.
- ``adam-<lr>``: ``torch.optim.Adam`` on the loss ``1/2 sum_parts mean r^2`` for each ``--adam-lrs``.
- ``lbfgs``: ``torch.optim.LBFGS`` (full batch, ``line_search_fn="strong_wolfe"``, ``lr=1``,
  ``history_size=100``), 20 iterations per recorded step.

Protocol: ``torch.set_num_threads(--threads)``; the clock counts training only (the error on
10,000 fixed uniform points is evaluated whenever ``--eval-every`` seconds of training passed,
outside the clock); ``os.getloadavg()`` is recorded before and after every run. Runs are
sequential in one process, methods interleaved per seed. Results: a JSON file and a figure of
the relative L2 error against seconds (one thin line per seed).

Usage::

    python benchmarks/pinn.py --problem 2d --seconds 120 --seeds 0 1 2
    python benchmarks/pinn.py --problem 5d --seconds 300 --seeds 0 --methods ggn adam-1e-3 lbfgs
    python benchmarks/pinn.py --report-only --problem 2d      # redraw the figure from the JSON
    python benchmarks/pinn.py --problem 5d --engine-cost 100 500 --cost-engines taylor functional
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from poisson import (  # noqa: E402
    ENGINES,
    PROBLEMS,
    LineSearchGGN,
    Poisson,
    Residual,
    autograd_residual,
    ggn_optimizer,
    make_error,
    make_model,
    make_residual,
)

from gramnewton import GramGaussNewton, gram_gauss_newton_direction  # noqa: E402
from gramnewton.engines import FunctionalEngine, ReferenceEngine  # noqa: E402

TARGETS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
MOMENTUM = 0.5  # stable on the 2-D problem in a 60 s trial, where 0.9 diverged; not tuned further
DIMS = {"2d": 2, "5d": 5}


def make_stepper(method: str, model: torch.nn.Module, problem: Poisson, form: str) -> Callable[[Residual], None] | None:
    """A function that takes one step given the residual, or ``None`` if unavailable. GGN uses the
    engine of the residual ``form``; Adam and L-BFGS get the residual with ``torch.autograd.grad``
    (faster for them)."""
    if method == "ggn":
        return LineSearchGGN(model, form=form).step
    if method == "ggn-lm":
        return ggn_optimizer(model, form=form).step
    if method == "ggn-lm-geo":
        return ggn_optimizer(model, form=form, geodesic_acceleration=True).step
    if method == "ggn-momentum":
        if "momentum" not in inspect.signature(gram_gauss_newton_direction).parameters:
            return None
        return LineSearchGGN(model, momentum=MOMENTUM, form=form).step
    if method.startswith("adam-"):
        opt = torch.optim.Adam(model.parameters(), lr=float(method.split("-", 1)[1]))

        def adam_step(residual):
            opt.zero_grad()
            loss = 0.5 * autograd_residual(model, problem, residual)().pow(2).sum()
            loss.backward()
            opt.step()

        return adam_step
    if method == "lbfgs":
        opt = torch.optim.LBFGS(
            model.parameters(), lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe",
            tolerance_grad=0.0, tolerance_change=0.0,
        )  # fmt: skip

        def lbfgs_step(residual):
            rows = autograd_residual(model, problem, residual)

            def closure():
                opt.zero_grad()
                loss = 0.5 * rows().pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)

        return lbfgs_step
    raise ValueError(f"unknown method {method!r}")


def run(
    method: str,
    dim: int,
    seed: int,
    seconds: float,
    eval_every: float,
    resample: bool,
    ggn_points: list[int] | None,
    form: str = "taylor",
) -> dict:
    """Train one method for ``seconds`` of training time; the error history and the load."""
    problem, widths, n_in, n_bd = PROBLEMS[dim]
    if ggn_points and method.startswith("ggn"):  # GGN's own per-step batch
        n_in, n_bd = ggn_points
    model = make_model(dim, widths, seed)
    stepper = make_stepper(method, model, problem, form)
    if stepper is None:
        return {"method": method, "seed": seed, "skipped": "not available in this version of GramGaussNewton"}
    points = torch.Generator().manual_seed(seed)
    error = make_error(model, problem)
    form = form if method.startswith("ggn") else "taylor"  # the others only read its points
    residual = make_residual(model, problem, n_in, n_bd, points, form)
    per_batch = resample and method != "lbfgs"
    history = [(0.0, 0, error())]
    load_before, clock, steps, last_eval, failure = os.getloadavg(), 0.0, 0, 0.0, None
    while clock < seconds:
        start = time.perf_counter()
        try:
            if per_batch:
                residual = make_residual(model, problem, n_in, n_bd, points, form)
            stepper(residual)
        except Exception as exc:  # a failed method is a result, not a crash of the benchmark
            failure = f"{type(exc).__name__}: {exc}"
            break
        clock += time.perf_counter() - start
        steps += 1
        if clock - last_eval >= eval_every or clock >= seconds:
            err = error()
            history.append((clock, steps, err))
            last_eval = clock
            if not math.isfinite(err):
                failure = "non-finite error"
                break
    return {
        "method": method,
        "seed": seed,
        "history": history,
        "steps": steps,
        "final_error": history[-1][2],
        "points": f"{n_in}+{n_bd}",
        "failure": failure,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def time_to(history: list, target: float) -> float | None:
    return next((t for t, _, e in history if e <= target), None)


def summarize(runs: list[dict]) -> list[dict]:
    """Per method: median final error, and per target how many seeds reached it and the median
    time of those that did (``None`` if none did)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        done = [r for r in runs if r["method"] == method and "history" in r]
        if not done:
            continue
        row = {"method": method, "seeds": len(done), "final_error": statistics.median(r["final_error"] for r in done)}
        row["steps"] = statistics.median(r["steps"] for r in done)
        for target in TARGETS:
            times = [t for t in (time_to(r["history"], target) for r in done) if t is not None]
            row[f"t_{target:g}"] = statistics.median(times) if times else None
            row[f"n_{target:g}"] = len(times)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| method | seeds | steps (median) | final rel. L2 (median) | "
        + " | ".join(f"s to {t:g} (seeds)" for t in TARGETS)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(TARGETS))]
    for r in rows:
        cells = [
            f"{r[f't_{t:g}']:.1f} ({r[f'n_{t:g}']}/{r['seeds']})" if r[f"t_{t:g}"] is not None else "never"
            for t in TARGETS
        ]
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['steps']:.0f} | {r['final_error']:.2e} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in result["runs"]:
        if "history" not in r:
            continue
        color = colors.setdefault(r["method"], f"C{len(colors)}")
        t, _, e = zip(*r["history"])
        ax.plot(
            [max(x, 1e-2) for x in t],
            e,
            color=color,
            lw=1.2,
            label=r["method"] if r["seed"] == result["seeds"][0] else None,
        )
    ax.set(xscale="log", yscale="log", xlabel="training seconds", ylabel="relative L2 error")
    cfg = result["config"]
    ggn = f" (GGN {'+'.join(map(str, cfg['ggn_points']))})" if cfg.get("ggn_points") else ""
    ax.set_title(
        f"{cfg['problem']} Poisson, {cfg['parameters']} parameters, {cfg['points']} points{ggn}, "
        f"{cfg['threads']} thread(s)",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


COST_ENGINES = ("taylor", "functional", "auto-autograd", "reference")


def engine_cost(dim: int, batch: int, repeats: int, names: list[str]) -> dict:
    """Seconds per Gram system of one residual batch (``batch`` interior + ``batch // 5`` boundary
    points), for each of ``names``: ``taylor`` (the forward-Laplacian closure, ``engine="auto"``:
    the hooks engine), ``functional`` (``FunctionalResidual``, ``vmap(jacrev)``), and
    ``auto-autograd`` / ``reference`` on the residual written with ``torch.autograd.grad`` (the
    hooks engine routing to the reference engine, and the reference engine). Medians of
    ``repeats`` interleaved rounds; ratios to the first name, and the largest Gram difference to it."""
    problem, widths, _, _ = PROBLEMS[dim]
    model = make_model(dim, widths, 0)
    params = list(model.parameters())

    def closure(form: str) -> Residual:  # the same points for every form
        return make_residual(model, problem, batch, batch // 5, torch.Generator().manual_seed(0), form)

    builders = {
        "taylor": lambda: (GramGaussNewton(model).engine, closure("taylor")),
        "functional": lambda: (FunctionalEngine(params), closure("functional")),
        "auto-autograd": lambda: (GramGaussNewton(model).engine, autograd_residual(model, problem, closure("taylor"))),
        "reference": lambda: (ReferenceEngine(params), autograd_residual(model, problem, closure("taylor"))),
    }
    engines = {name: builders[name]() for name in names}
    times: dict[str, list[float]] = {name: [] for name in engines}
    grams: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hooks engine's routing warning (auto-autograd)
        for _ in range(repeats):
            for name, (engine, residual) in engines.items():
                start = time.perf_counter()
                grams[name] = engine.compute(residual).gram
                times[name].append(time.perf_counter() - start)
    base, first = statistics.median(times[names[0]]), grams[names[0]]
    return {
        "dim": dim,
        "rows": batch + batch // 5,
        "parameters": sum(p.numel() for p in params),
        "repeats": repeats,
        "loadavg": os.getloadavg(),
        "seconds": {n: statistics.median(t) for n, t in times.items()},
        f"ratio_to_{names[0]}": {n: statistics.median(t) / base for n, t in times.items()},
        "max_rel_gram_difference": {n: float((g - first).abs().max() / first.abs().max()) for n, g in grams.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", choices=sorted(DIMS), default="2d")
    parser.add_argument("--seconds", type=float, default=120.0, help="training seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["ggn", "ggn-lm", "ggn-momentum", "lbfgs"])
    parser.add_argument("--tag", default="", help="suffix of the default JSON and figure names")
    parser.add_argument("--adam-lrs", type=float, nargs="*", default=[1e-3, 1e-2])
    parser.add_argument("--eval-every", type=float, default=1.0, help="training seconds between evaluations")
    parser.add_argument("--resample", action="store_true", help="new collocation points every step (GGN, Adam)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ggn-points", type=int, nargs=2, help="interior and boundary points of GGN's steps")
    parser.add_argument("--out", type=Path, help="JSON (default benchmarks/results/pinn_<problem>.json)")
    parser.add_argument(
        "--figure", type=Path, help="PNG (default: next to --out if given, else docs/figures/pinn_<problem>.png)"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--append", action="store_true", help="add the runs to those already in --out")
    parser.add_argument("--form", choices=sorted(ENGINES), default="taylor", help="GGN's residual form (and engine)")
    parser.add_argument("--engine-cost", type=int, nargs="*", metavar="ROWS", help="time the engines instead")
    parser.add_argument("--cost-engines", nargs="+", choices=COST_ENGINES, default=list(COST_ENGINES))
    parser.add_argument("--repeats", type=int, default=3, help="rounds of --engine-cost")
    args = parser.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"pinn_{args.problem}{args.tag}.json"
    # a run written elsewhere (--out) must not overwrite the committed figure of the docs
    default_figure = ROOT / "docs" / "figures" / f"pinn_{args.problem}{args.tag}.png"
    fig_path = args.figure or (args.out.with_suffix(".png") if args.out else default_figure)
    if args.engine_cost is not None:
        torch.set_num_threads(args.threads)
        costs = [
            engine_cost(DIMS[args.problem], n, args.repeats, args.cost_engines) for n in args.engine_cost or [100, 400]
        ]
        path = args.out or ROOT / "benchmarks" / "results" / f"pinn_engine_cost_{args.problem}.json"
        path.write_text(
            json.dumps({"command": " ".join(["python", *sys.argv]), "threads": args.threads, "runs": costs}, indent=1)
        )
        for c in costs:
            print(json.dumps(c))
        return
    if args.report_only:
        result = json.loads(out.read_text())
    else:
        torch.set_num_threads(args.threads)
        dim = DIMS[args.problem]
        problem, widths, n_in, n_bd = PROBLEMS[dim]
        methods = [*args.methods, *(f"adam-{lr:g}" for lr in args.adam_lrs)]
        result = {
            "config": {
                "problem": args.problem,
                "widths": widths,
                "parameters": sum(p.numel() for p in make_model(dim, widths, 0).parameters()),
                "points": f"{n_in}+{n_bd}",
                "seconds": args.seconds,
                "eval_every": args.eval_every,
                "resample": args.resample,
                "ggn_points": args.ggn_points,
                "form": args.form,
                "threads": args.threads,
                "methods": methods,
                "command": " ".join(["python", *sys.argv]),
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            },
            "seeds": args.seeds,
            "runs": [],
        }
        if args.append and out.exists():
            previous = json.loads(out.read_text())
            previous["config"].setdefault("appended", []).append(result["config"])
            result = {**previous, "runs": previous["runs"]}
        for seed in args.seeds:
            for method in methods:
                r = run(method, dim, seed, args.seconds, args.eval_every, args.resample, args.ggn_points, args.form)
                result["runs"].append(r)
                status = r.get("skipped") or r.get("failure") or f"{r['steps']} steps, rel. L2 {r['final_error']:.2e}"
                print(f"seed {seed} {method:14s} {status}  load {r.get('loadavg_before', ('-',))[0]}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1))
    result["summary"] = summarize(result["runs"])
    out.write_text(json.dumps(result, indent=1))
    figure(result, fig_path)
    print(table(result["summary"]))


if __name__ == "__main__":
    main()
