"""Before/after of one GGN step in one process: the core at a git revision against the working tree.

Not a test. Child processes at different times see different machines (on the shared 2-core CPU
the SGD step of one network varied 1.6x between back-to-back children); here both versions of
the optimizer step the same network, interleaved round by round with an SGD step, in one process,
and the ratios of medians are the figures to read.

The revision's ``src/gramnewton`` (its core: the lab is left out) is extracted with ``git archive``
into a temporary directory and imported as ``gramnewton_before``; its ``nn.py`` is replaced by the
working tree's classes (``ScalarBias``, ``ScalarScale``), which the models are built from and the
engines' handlers key on. Every method gets its own copy of the model (same seed). The GGN steps
are those of ``benchmarks/step_cost.py``: ``plain`` (momentum 0, fixed ``alpha = 1e6``, which keeps
the weights where they are) or, with ``--demo``, ``GramGaussNewton(model)``'s defaults, first stepped
until the damping rule sits at its floor (as ``ggn_demo`` there), or with ``--options`` the
constructor's keyword arguments given as JSON (e.g. time_to_target.py's sinc configuration with
geodesic acceleration; both versions then take the same steps, bit for bit when the change keeps them).

``torch.set_num_threads(--threads)`` (default 2), ``OMP_WAIT_POLICY=PASSIVE`` (set before torch
starts); the load average before and after is recorded. With ``--profile N`` each GGN version
then takes ``N`` more steps under ``cProfile`` (after the timed rounds, so the timings are
unaffected): the functions with the largest cumulative and own time per step are recorded
(cProfile's overhead inflates them; read them as shares, the timed medians as costs).
Results are appended to ``--out``::

    python benchmarks/step_ab.py --rev 4cf6bb2 --model two_layer --batch 32 --reps 400
    python benchmarks/step_ab.py --rev 4cf6bb2 --model resnet8 --batch 128 --reps 12 --demo
    python benchmarks/step_ab.py --rev 5c56b22 --model sinc --batch 1000 --reps 400 --demo --profile 300
    python benchmarks/step_ab.py --rev 8b26c99 --model sinc --batch 1000 --reps 400 --options \
        '{"lam": 1, "alpha": 1, "momentum": 0, "geodesic_acceleration": true,
          "adaptive_damping": {"name": "gain_ratio", "reject_below": -Infinity}}'
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import importlib
import json
import os
import pstats
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gramnewton  # noqa: E402
from gramnewton.lab.experiments.training import make_train_step, residuals  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402
from results_log import append_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "gramnewton_before"


def import_revision(rev: str, into: Path) -> object:
    """``src/gramnewton`` of ``rev`` (without the lab) imported as :data:`BEFORE`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src/gramnewton"], check=True, capture_output=True
    ).stdout
    path = into / "archive.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    package = into / BEFORE
    (into / "src" / "gramnewton").rename(package)
    subprocess.run(["rm", "-rf", str(package / "lab")], check=True)
    # the models are built from the working tree's modules; the old handlers must recognise them
    (package / "nn.py").write_text("from gramnewton.nn import ScalarBias, ScalarScale  # noqa: F401\n")
    sys.path.insert(0, str(into))
    return importlib.import_module(BEFORE)


def ggn_step(
    package: object, model: nn.Module, x: torch.Tensor, y: torch.Tensor, demo: bool, options: dict | None = None
) -> Callable[[], object]:
    """One GGN step of ``package``'s optimizer (plain, the demo's defaults, primed, or ``options``)."""
    if options is not None:
        opt = package.GramGaussNewton(model, **options)
    elif demo:
        opt = package.GramGaussNewton(model)
    else:
        opt = package.GramGaussNewton(model, momentum=0.0, alpha=1e6, adaptive_damping=False)

    def step() -> object:
        return opt.step(lambda: residuals(model(x), y))

    if demo and options is None:
        for _ in range(step_cost.DEMO_PRIMING_STEPS):
            if opt.damping.trusted:
                break
            step()
    return step


def profile(step: Callable[[], object], steps: int, top: int = 25) -> dict[str, list[dict]]:
    """``steps`` calls of ``step`` under cProfile: the ``top`` functions by cumulative and by own
    time, as ``{"function", "calls_per_step", "cumulative_us", "own_us"}`` per step."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, own, cumulative, callers)
    rows = [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "calls_per_step": calls / steps,
            "cumulative_us": cumulative / steps * 1e6,
            "own_us": own / steps * 1e6,
        }
        for (file, line, name), (calls, _, own, cumulative, _) in stats.items()
    ]
    return {key: sorted(rows, key=lambda r: -r[key])[:top] for key in ("cumulative_us", "own_us")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rev", required=True, help="git revision whose core is 'before'")
    p.add_argument("--model", choices=list(step_cost.MODELS), required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--demo", action="store_true", help="the optimizer's defaults (momentum, gain-ratio damping)")
    p.add_argument("--options", type=json.loads, help="GramGaussNewton keyword arguments as JSON (instead of --demo)")
    p.add_argument("--after-first", action="store_true", help="build and run 'after' before 'before' each round")
    p.add_argument("--profile", type=int, default=0, help="steps of each GGN version under cProfile afterwards")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_ab.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        before_package = import_revision(args.rev, Path(tmp))
        steps: dict[str, Callable[[], object]] = {}
        model, x, y = step_cost.setup(args.model, args.batch)
        sgd = make_train_step(model, torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9))
        steps["sgd"] = lambda: sgd(x, y)
        versions = [("before", before_package), ("after", gramnewton)]
        for name, package in reversed(versions) if args.after_first else versions:
            model, x_, y_ = step_cost.setup(args.model, args.batch)
            steps[name] = ggn_step(package, model, x_, y_, args.demo, args.options)
        load = os.getloadavg()
        started = datetime.datetime.now(datetime.UTC).isoformat()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for rnd in range(args.warmup + args.reps):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
                if rnd >= args.warmup:
                    times[name].append(elapsed)
        load_after = os.getloadavg()
        profiles = {name: profile(steps[name], args.profile) for name in ("before", "after")} if args.profile else {}
    median = {name: statistics.median(ts) for name, ts in times.items()}
    run = {
        "rev": args.rev,
        "model": args.model,
        "batch": args.batch,
        "demo": args.demo,
        "options": args.options,
        "after_first": args.after_first,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "started": started,
        "load_average": load,
        "load_average_after": load_after,
        "median_s": median,
        "times_s": times,
        "ratio_to_sgd": {name: median[name] / median["sgd"] for name in median},
        "after_over_before": median["after"] / median["before"],
        "profile_steps": args.profile,
        "profile": profiles,
        # each version times its conv paths once per layer shape and keeps the fastest (noisy
        # timings can keep a slower one): what each chose
        "conv_paths": {
            name: {str(key[1:3]): path for key, path in package.engines.handlers.CONV_WEIGHT_PATHS.choices.items()}
            for name, package in (("before", before_package), ("after", gramnewton))
        },
    }
    append_record(args.out, run)
    print(
        f"{args.model} b={args.batch} {'options' if args.options else 'demo' if args.demo else 'plain'} (load {load[0]:.1f}): "
        + ", ".join(f"{n} {median[n] * 1e3:.3f} ms ({run['ratio_to_sgd'][n]:.2f}x SGD)" for n in median)
        + f"; after/before {run['after_over_before']:.3f}",
        flush=True,
    )
    for name, tables in profiles.items():
        print(f"{name}: cProfile, us per step (cumulative / own), largest cumulative first")
        for row in tables["cumulative_us"][:15]:
            print(
                f"  {row['cumulative_us']:8.0f} {row['own_us']:8.0f}  {row['calls_per_step']:5.1f}x  {row['function']}"
            )


if __name__ == "__main__":
    main()
