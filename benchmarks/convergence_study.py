"""Why does mini-batch GGN plateau? Per-step diagnostics on the demo task.

Not a test. Trains ``resnet8_fixup`` on ``rotated-mnist`` (the demo task) with one or more GGN
variants and records, for every step ``t`` (with ``phi_t`` the step taken):

- ``batch_before`` / ``batch_after``: the MSE of the step's own batch before and after it;
- ``held_before`` / ``held_after``: the MSE of a fixed held-back batch of training samples
  (``--held`` samples, never used for a step) before and after it;
- ``predicted``: the MSE the linearised model predicts for the own batch (``r - G c``);
- ``rho``: the gain ratio ``(before - after) / (before - predicted)`` on the own batch;
- ``predictable``: ``1 - min_s LOO(s) / mean(r^2)``, the share of the batch's residual that the
  kernel predicts from the batch's other samples (:func:`gramnewton.damping.leave_one_out_ridge`;
  ``ridge_loo`` the best ridge ``s``, ``ridge_used`` the step's ``alpha / lam``);
- ``transfer``: held-back decrease over own-batch decrease;
- ``phi_norm``: ``||phi_t||``; ``alpha``: the damping used; ``rejected``.

Variants (:data:`VARIANTS`) run without momentum unless they set it; ``defaults`` is
``GramGaussNewton(model)`` as a user gets it (momentum 0.9, ``lam=16``, gain-ratio damping).

Decision rules: the plateau is *noise* if the held-back decrease is a small fraction of the
batch decrease and shrinks with larger batches; *damping* if ``alpha`` climbs under the
adaptive rule; *step length* if ``transfer`` > 0 but progress stalls as ``phi_norm`` shrinks;
*curvature* if ``rho`` (own batch) falls well below 1.

Usage::

    python benchmarks/convergence_study.py --variants demo fixed b512 --epochs 10
    python benchmarks/convergence_study.py --report-only   # redraw the figure from the JSON

Writes ``benchmarks/results/convergence_study.json`` and ``docs/figures/convergence_study.png``.
``torch.set_num_threads(2)``; the load average is recorded before and after each variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.damping import leave_one_out_ridge
from gramnewton.lab.data import get_dataset
from gramnewton.lab.experiments.training import batch_order, mean_squared_error, residuals
from gramnewton.lab.models import get_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "convergence_study.json"
FIGURE = ROOT / "docs" / "figures" / "convergence_study.png"
THREADS = 2

# name -> (batch size, GramGaussNewton keyword arguments)
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "demo": (128, dict(lam=8.0, alpha=0.3, adaptive_damping=True)),
    "fixed": (128, dict(lam=8.0, alpha=0.3)),
    "b512": (512, dict(lam=8.0, alpha=0.3, adaptive_damping=True)),
    "b512-fixed": (512, dict(lam=8.0, alpha=0.3)),
    "lam32": (128, dict(lam=32.0, alpha=0.3)),
    "alpha3": (128, dict(lam=8.0, alpha=3.0)),
    "alpha30": (128, dict(lam=8.0, alpha=30.0)),
    "lam1": (128, dict(lam=1.0, alpha=0.3)),
    # GramGaussNewton(model) as a user gets it (the constructor's momentum, not the study's 0)
    "defaults": (128, dict(momentum=0.9)),
}


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(residuals(model(x), y).double().pow(2).mean())


def run_variant(name: str, epochs: float, held: int, seed: int) -> dict[str, Any]:
    batch, kwargs = VARIANTS[name]
    train = get_dataset("rotated-mnist", split="train", seed=seed)
    test = get_dataset("rotated-mnist", split="test", seed=seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))
    held_idx, pool = order[:held], order[held:].sort().values
    xh, yh = train[held_idx]
    torch.manual_seed(seed)
    model = get_model("resnet8_fixup", in_channels=1)
    model.train()
    opt = GramGaussNewton(model, **{"momentum": 0.0, **kwargs})
    steps = int(epochs * (len(train) - held) / batch)
    load_before = os.getloadavg()
    records: list[dict[str, Any]] = []
    epoch, queue = 0, []
    start = time.perf_counter()
    while len(records) < steps:
        if not queue:
            epoch += 1
            queue = [pool[i] for i in batch_order(len(pool), batch, seed, epoch)]
        idx = queue.pop(0)
        x, y = train[idx]
        alpha = opt.param_groups[0]["alpha"]
        held_before = mse(model, xh, yh)
        before_params = [p.detach().clone() for p in opt.engine.params]
        opt.step(lambda: residuals(model(x), y))
        step = opt.last_step
        phi = [-d for d in step.direction]
        r = step.residuals.reshape(-1).double()
        predicted = step.predicted.reshape(-1).double()  # r - J phi_t: with momentum too
        after_params = [p.detach().clone() for p in opt.engine.params]
        # evaluate "after" at the stepped weights even when the adaptive rule undid the step
        with torch.no_grad():
            for p, v in zip(opt.engine.params, before_params):
                p.copy_(v)
            for p, d in zip(opt.engine.params, step.direction):
                p.add_(d)
        batch_after = mse(model, x, y)
        held_after = mse(model, xh, yh)
        with torch.no_grad():
            for p, v in zip(opt.engine.params, before_params):
                p.copy_(v)
        with torch.no_grad():
            for p, v in zip(opt.engine.params, after_params):
                p.copy_(v)
        rejected = all(torch.equal(a, b) for a, b in zip(after_params, before_params))
        batch_before = float(r.pow(2).mean())
        pred = float(predicted.pow(2).mean())
        eig = torch.linalg.eigvalsh(step.gram.double())
        grid = eig.clamp_min(0).mean() * torch.logspace(-5, 2, 36, dtype=torch.float64)
        loo, ridges = leave_one_out_ridge(step.gram, step.residuals, grid)
        used = torch.tensor([alpha / opt.param_groups[0]["lam"]], dtype=torch.float64)
        loo_used = float(leave_one_out_ridge(step.gram, step.residuals, used)[0][0])
        records.append(
            dict(
                step=len(records) + 1,
                epoch=epoch,
                batch_before=batch_before,
                batch_after=batch_after,
                predicted=pred,
                held_before=held_before,
                held_after=held_after,
                rho=(batch_before - batch_after) / (batch_before - pred) if batch_before > pred else math.nan,
                transfer=(held_before - held_after) / (batch_before - batch_after)
                if batch_before != batch_after
                else math.nan,
                phi_norm=float(torch.sqrt(sum(d.double().pow(2).sum() for d in phi))),
                alpha=alpha,
                gram_trace_per_sample=float(eig.sum()) / len(eig),
                gram_eig_max=float(eig[-1]),
                gram_eig_median=float(eig.median()),
                rejected=rejected,
                ridge_used=float(used[0]),
                ridge_loo=float(ridges[loo.argmin()]),
                loo_best=float(loo.min()),
                loo_used=loo_used,
                predictable=1.0 - float(loo.min()) / batch_before,
            )
        )
    seconds = time.perf_counter() - start
    return dict(
        variant=name,
        batch=batch,
        kwargs={k: v for k, v in kwargs.items()},
        steps=steps,
        seconds_with_diagnostics=seconds,
        train_mse=mean_squared_error(model, train),
        test_mse=mean_squared_error(model, test),
        load_before=load_before,
        load_after=os.getloadavg(),
        records=records,
        summary=summarise(records),
    )


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Medians (and mean decreases) over each quarter of the run."""
    out = {}
    n = len(records)
    for q in range(4):
        part = records[q * n // 4 : (q + 1) * n // 4]
        med = lambda key: statistics.median(r[key] for r in part if not math.isnan(r[key]))  # noqa: E731
        out[f"q{q + 1}"] = dict(
            steps=f"{part[0]['step']}-{part[-1]['step']}",
            held_mse=statistics.mean(r["held_before"] for r in part),
            batch_decrease=statistics.mean(r["batch_before"] - r["batch_after"] for r in part),
            held_decrease=statistics.mean(r["held_before"] - r["held_after"] for r in part),
            predicted_decrease=statistics.mean(r["batch_before"] - r["predicted"] for r in part),
            rho=med("rho"),
            phi_norm=med("phi_norm"),
            alpha=med("alpha"),
            rejected=sum(r["rejected"] for r in part) / len(part),
            gram_eig_max=med("gram_eig_max"),
            gram_eig_median=med("gram_eig_median"),
            ridge_used=med("ridge_used"),
            ridge_loo=med("ridge_loo"),
            loo_used_over_best=med("loo_used") / med("loo_best"),
            predictable=med("predictable"),
        )
    return out


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        ("held_before", "held-back MSE (before step)", "log"),
        ("batch_decrease", "own-batch MSE decrease per step (smoothed)", "log"),
        ("held_decrease", "held-back MSE decrease per step (smoothed)", "symlog"),
        ("rho", "gain ratio on own batch (smoothed)", "linear"),
        ("phi_norm", "||phi|| (step norm)", "log"),
        ("ridge_loo", "ridge s = alpha/lam: leave-one-out best (dots) vs used (line)", "log"),
    ]
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for name, res in results.items():
            recs = res["records"]
            epochs = [r["step"] * res["batch"] / (4000 - 512) for r in recs]
            if key == "batch_decrease":
                vals = [r["batch_before"] - r["batch_after"] for r in recs]
            elif key == "held_decrease":
                vals = [r["held_before"] - r["held_after"] for r in recs]
            elif key == "ridge_loo":
                line = ax.plot(epochs, [r["ridge_used"] for r in recs], lw=1)[0]
                ax.plot(epochs, [r["ridge_loo"] for r in recs], ".", ms=2, color=line.get_color())
                continue
            else:
                vals = [r[key] for r in recs]
            if key in ("batch_decrease", "held_decrease", "rho"):
                vals = smooth(vals, 15)
            ax.plot(epochs, vals, label=name, lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epochs")
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=1e-4)
        else:
            ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("GGN on rotated-mnist, resnet8_fixup: per-step diagnostics (benchmarks/convergence_study.py)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["demo", "fixed", "b512"], choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=float, default=10.0, help="epochs of the training pool per variant")
    parser.add_argument("--held", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report_only:
        for name in args.variants:
            res = run_variant(name, args.epochs, args.held, args.seed)
            results[name] = res
            print(f"{name}: train {res['train_mse']:.4f} test {res['test_mse']:.4f} load {res['load_before']}")
            for q, s in res["summary"].items():
                print(" ", q, {k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()})
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1))
    plot(results)


if __name__ == "__main__":
    main()
