"""Cost of one classification step for every curvature mode, as a ratio to an SGD step.

Not a test. Model resnet8_fixup, inputs 28x28 (1 channel), batch 128, 10 classes (the issue's
setting). Methods, each with its own copy of the model, interleaved in one process (each round
runs one step of every method, so a slow phase of the shared machine hits all alike); the figure
is the median over rounds and its ratio to the median SGD step of the same run:

- ``sgd``: ``F.cross_entropy`` backward + SGD with momentum (the baseline, ratio 1).
- ``adam``, ``kfac``: Adam, and K-FAC with the sampled cross-entropy Fisher (factors and inverses
  refreshed every step here, its most expensive setting; the default refreshes them every 10 / 100).
- ``ggn_exact``, ``ggn_top_c1``, ``ggn_top_c2``, ``ggn_gradient``: ``GramGaussNewton(loss="cross_entropy")``
  with each curvature estimate (hooks engine).
- ``ggn_mse_k10``: the regression step on ``(b, 10)`` residuals (the issue's "27x" reference).

A large ``alpha`` (1e6) keeps the weights, and so the timings, where they are. ``torch.set_num_threads``
is set explicitly (``--threads``, default 2) and the load average is recorded before and after.

Usage::

    python benchmarks/classification_step_cost.py --reps 7
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results_log import host
from torch import Tensor, nn

from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.training import make_train_step
from gramnewton.lab.models import get_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "classification_step_cost.json"
# method -> (optimizer spec, loss of the training step)
METHODS: dict[str, tuple[dict, str]] = {
    "sgd": ({"name": "sgd", "lr": 1e-6}, "cross_entropy"),
    "adam": ({"name": "adam", "lr": 1e-6}, "cross_entropy"),
    "kfac": (
        {"name": "kfac", "lr": 1e-6, "loss": "cross_entropy", "factor_every": 1, "inverse_every": 1},
        "cross_entropy",
    ),
    "ggn_exact": (
        {
            "name": "ggn",
            "momentum": 0.0,
            "alpha": 1e6,
            "adaptive_damping": False,
            "loss": "cross_entropy",
            "curvature": "exact",
        },
        "cross_entropy",
    ),
    "ggn_top_c1": (
        {
            "name": "ggn",
            "alpha": 1e6,
            "adaptive_damping": False,
            "loss": "cross_entropy",
            "curvature": "top_c",
            "top_c": 1,
        },
        "cross_entropy",
    ),
    "ggn_top_c2": (
        {
            "name": "ggn",
            "alpha": 1e6,
            "adaptive_damping": False,
            "loss": "cross_entropy",
            "curvature": "top_c",
            "top_c": 2,
        },
        "cross_entropy",
    ),
    "ggn_gradient": (
        {
            "name": "ggn",
            "momentum": 0.0,
            "alpha": 1e6,
            "adaptive_damping": False,
            "loss": "cross_entropy",
            "curvature": "gradient",
        },
        "cross_entropy",
    ),
    "ggn_mse_k10": ({"name": "ggn", "momentum": 0.0, "alpha": 1e6, "adaptive_damping": False}, "mse"),
}


def make_step(method: str, batch: int, classes: int) -> Callable[[], None]:
    """One step of ``method`` on a fixed random batch (its own model copy, same initial weights)."""
    torch.manual_seed(0)
    model = get_model("resnet8_fixup", in_channels=1, num_outputs=classes)
    with torch.no_grad():  # Fixup zero-initialises layers; timings should not depend on that
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(batch, 1, 28, 28)
    labels = torch.randint(0, classes, (batch,))
    spec, loss = METHODS[method]
    step = make_train_step(model, build_optimizer(spec, model), loss=loss)
    y: Tensor = labels if loss == "cross_entropy" else nn.functional.one_hot(labels, classes).float()
    return lambda: step(x, y)


def measure(methods: list[str], batch: int, classes: int, reps: int, warmup: int) -> dict:
    steps = {m: make_step(m, batch, classes) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rnd in range(warmup + reps):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            if rnd >= warmup:
                times[method].append(time.perf_counter() - start)
    sgd = statistics.median(times["sgd"])
    return {
        m: {"median_s": statistics.median(ts), "ratio_to_sgd": statistics.median(ts) / sgd, "times_s": ts}
        for m, ts in times.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    methods = ["sgd", *[m for m in args.methods if m != "sgd"]]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = measure(methods, args.batch, args.classes, args.reps, args.warmup)
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "setting": {
            "model": "resnet8_fixup",
            "input": [1, 28, 28],
            "batch": args.batch,
            "classes": args.classes,
            "reps": args.reps,
            "warmup": args.warmup,
            "threads": args.threads,
        },
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "host": host(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"load average {load_before[0]:.1f} -> {record['loadavg_after'][0]:.1f}; {args.threads} threads")
    print(f"{'method':<14} {'median s':>9} {'x SGD':>7}")
    for method, r in results.items():
        print(f"{method:<14} {r['median_s']:>9.4f} {r['ratio_to_sgd']:>7.2f}")


if __name__ == "__main__":
    main()
