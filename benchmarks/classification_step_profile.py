"""Where the time of a GGN training step goes, against an Adam step, on real batches.

Not a test. ``--task classification`` (default), the demo's classification setting
(``gramnewton demo --task classification``): resnet8_fixup on the standardised mnist-5k training
split, batch 128, label smoothing 0.1 (the lever of docs/classification.md), Adam ``lr=1e-2``;
``--task regression``, the regression demo (``make demo``): resnet8_fixup on rotated-mnist, batch
128, the square loss, Adam ``lr=3e-3``. Both with the demo's initialisation and batch order of
seed 0, each method on its own copy of the model. Methods (``--methods``), stepped one after the
other on the same batch, round by round (a slow phase of the shared machine hits all alike):

- ``adam``: Adam (``F.cross_entropy`` with the same smoothing, or the mean squared error), the
  baseline;
- ``ggn``: ``GramGaussNewton(model)`` with the defaults (``loss="cross_entropy"`` for classification);
- ``ggn_trust_low``: the same with ``GainRatioDamping(check_every=4, trust_above=0.25)``: at the
  damping floor, every gain ratio that leaves ``alpha`` where it is keeps the trust;
- ``ggn_subset<s>`` (``s`` in 16, 32, 64): the defaults with ``GainRatioDamping(check_every=4,
  subset=s)``: the gain ratio measured on the batch's first ``s`` samples.

Every GGN closure takes the rows to evaluate (as the lab's training step does), so every method
runs the same closure code.

(A fixed ``alpha`` at the rule's floor, ``1e-8``, with no re-evaluation at all, diverged within
the first steps here: NaN logits. The damping is needed while the network leaves its
zero-initialised start.)

Per GGN step, from the hooks engine's own timers (``last_timings``) and a timed closure: the
forward with hooks, the backward without weight gradients, the per-sample gradients, the Gram
matrix, the re-evaluation of the batch after the step (the closure's second call, by the gain-ratio
rule), the products ``J^T c`` and ``J phi_{t-1}`` (momentum) of the engine's system (timed by
wrapping this run's ``engine.compute``), and the rest (output factors, solve, apply, diagnostics,
Python). The means matter
for an epoch's time (the re-evaluation runs on some steps only), the medians are given too. The
gain ratios measured and the steps rejected are recorded. Steps ``--skip`` and later are counted
(the first ones include the per-layer path timing of the engine).

``torch.set_num_threads(--threads)`` (default 2), ``OMP_WAIT_POLICY=PASSIVE``, the load average
before and after. Usage::

    python benchmarks/classification_step_profile.py --steps 120 --out benchmarks/results/classification_step_profile.json
    python benchmarks/classification_step_profile.py --task regression --methods ggn ggn_subset32 \
        --out benchmarks/results/regression_step_profile.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402
from results_log import host  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from gramnewton import GramGaussNewton  # noqa: E402
from gramnewton.damping import GainRatioDamping  # noqa: E402
from gramnewton.engines import GramSystem  # noqa: E402
from gramnewton.lab.data import get_dataset  # noqa: E402
from gramnewton.lab.experiments.demo import DemoConfig, initial_model  # noqa: E402
from gramnewton.lab.experiments.training import ALL, batch_order, make_train_step, residuals  # noqa: E402
from gramnewton.losses import smooth_targets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# task -> (data set, the optimizers' loss, Adam's learning rate)
TASKS = {"classification": ("mnist", "cross_entropy", 1e-2), "regression": ("rotated-mnist", "mse", 3e-3)}
GGN_METHODS: dict[str, Callable[[nn.Module, str], GramGaussNewton]] = {
    "ggn": lambda m, loss: GramGaussNewton(m, loss=loss),
    "ggn_trust_low": lambda m, loss: GramGaussNewton(
        m, loss=loss, adaptive_damping=GainRatioDamping(check_every=4, trust_above=0.25)
    ),
    **{
        f"ggn_subset{s}": lambda m, loss, s=s: GramGaussNewton(
            m, loss=loss, adaptive_damping=GainRatioDamping(check_every=4, subset=s)
        )
        for s in (16, 32, 64)
    },
}
PARTS = ("forward", "backward", "per_sample", "gram", "reevaluate", "products", "rest")


class GGNRun:
    """One GGN optimizer on its own model; ``step(x, y)`` records the step's parts (:data:`PARTS`)."""

    def __init__(
        self, make: Callable[[nn.Module, str], GramGaussNewton], model: nn.Module, loss: str, smoothing: float
    ):
        self.model, self.opt, self.loss, self.smoothing = model, make(model, loss), loss, smoothing
        self.parts: dict[str, list[float]] = {p: [] for p in PARTS}
        self.gain_ratios: list[float | None] = []
        self.rejected = 0
        self.products: list[float] = []  # this step's J^T c and J phi_{t-1} (the engine's, after its passes)
        compute = self.opt.engine.compute

        def timed_compute(*args: Any, **kwargs: Any) -> GramSystem:  # the engine's system, its products timed
            system = compute(*args, **kwargs)
            j_times = None if system.j_times is None else self._timed(system.j_times)
            return dataclasses.replace(system, jt_times=self._timed(system.jt_times), j_times=j_times)

        self.opt.engine.compute = timed_compute  # this instance only

    def _timed(self, product: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def timed(v: Any) -> Any:
            start = time.perf_counter()
            out = product(v)
            self.products.append(time.perf_counter() - start)
            return out

        return timed

    def step(self, x: Tensor, y: Tensor) -> None:
        calls: list[float] = []
        self.products.clear()

        def closure(rows: slice = ALL) -> Tensor | tuple[Tensor, Tensor]:
            start = time.perf_counter()
            outputs = self.model(x[rows])
            if self.loss == "mse":
                value: Tensor | tuple[Tensor, Tensor] = residuals(outputs, y[rows])
            else:
                value = outputs, smooth_targets(outputs, y[rows], self.smoothing)
            calls.append(time.perf_counter() - start)
            return value

        start = time.perf_counter()
        self.opt.step(closure)
        total = time.perf_counter() - start
        t = self.opt.engine.last_timings
        reevaluate = sum(calls[1:])  # the first call ran inside the engine's forward
        backward = t["backward"] - t["per_sample"] - t["gram"]
        products = sum(self.products)
        rest = total - t["forward"] - t["reference"] - t["backward"] - reevaluate - products
        parts = (t["forward"], backward, t["per_sample"], t["gram"], reevaluate, products, rest)
        for name, value in zip(PARTS, parts):
            self.parts[name].append(value)
        self.gain_ratios.append(self.opt.last_gain_ratio if len(calls) > 1 else None)
        self.rejected += bool(self.opt.last_diagnostics.rejected)


def summarise(times: list[float]) -> dict[str, float]:
    return {"mean_ms": 1e3 * statistics.mean(times), "median_ms": 1e3 * statistics.median(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="classification", choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=["ggn", "ggn_trust_low"], choices=list(GGN_METHODS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="classification only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "classification_step_profile.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset, loss, adam_lr = TASKS[args.task]
    smoothing = args.label_smoothing if loss == "cross_entropy" else 0.0
    config = DemoConfig(dataset, task=args.task, seed=0)
    train = get_dataset(dataset, split="train", seed=0)
    init = initial_model(config)
    adam_model = copy.deepcopy(init)
    adam_model.train()
    adam = make_train_step(adam_model, torch.optim.Adam(adam_model.parameters(), lr=adam_lr), loss, smoothing)
    runs = {}
    for name in args.methods:
        model = copy.deepcopy(init)
        model.train()
        runs[name] = GGNRun(GGN_METHODS[name], model, loss, smoothing)
    order = [i for epoch in range(args.steps) for i in batch_order(len(train), args.batch, 0, epoch)]
    order = [i for i in order if len(i) == args.batch][: args.steps]  # full batches only: one shape
    step_times: dict[str, list[float]] = {name: [] for name in ["adam", *runs]}
    load_before = os.getloadavg()
    for idx in order:
        x, y = train[idx]
        for name in step_times:  # same batch, one after the other
            start = time.perf_counter()
            if name == "adam":
                adam(x, y)
            else:
                runs[name].step(x, y)
            step_times[name].append(time.perf_counter() - start)
    adam_mean = statistics.mean(step_times["adam"][args.skip :])
    results: dict[str, Any] = {"adam": summarise(step_times["adam"][args.skip :])}
    for name, run in runs.items():
        ratios = [r for r in run.gain_ratios[args.skip :] if r is not None]
        results[name] = {
            **summarise(step_times[name][args.skip :]),
            "mean_over_adam": statistics.mean(step_times[name][args.skip :]) / adam_mean,
            "parts": {p: summarise(v[args.skip :]) for p, v in run.parts.items()},
            "measured_steps": len(ratios),
            "counted_steps": len(run.gain_ratios[args.skip :]),
            "gain_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
            "gain_ratios_below_low": sum(r < 0.25 for r in ratios),
            "gain_ratios_above_high": sum(r > 0.75 for r in ratios),
            "rejected_steps": run.rejected,
            "final_alpha": run.opt.param_groups[0]["alpha"],
        }
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "host": host(),
        "results": results,
        "step_times_s": step_times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"load {load_before[0]:.2f} -> {record['loadavg_after'][0]:.2f}, {args.threads} threads, steps {args.skip}-")
    print(f"{'method':<16} {'mean ms':>8} {'median':>8} {'x Adam':>7} " + " ".join(f"{p:>10}" for p in PARTS))
    print(f"{'adam':<16} {results['adam']['mean_ms']:>8.1f} {results['adam']['median_ms']:>8.1f} {1.0:>7.2f}")
    for name in runs:
        r = results[name]
        parts = " ".join(f"{r['parts'][p]['mean_ms']:>10.1f}" for p in PARTS)
        print(f"{name:<16} {r['mean_ms']:>8.1f} {r['median_ms']:>8.1f} {r['mean_over_adam']:>7.2f} {parts}")
        print(
            f"    measured {r['measured_steps']}/{r['counted_steps']}, rho quartiles "
            f"{[round(q, 3) for q in r['gain_ratio_quartiles']]}, below low {r['gain_ratios_below_low']}, "
            f"above high {r['gain_ratios_above_high']}, rejected {r['rejected_steps']}, alpha {r['final_alpha']:.3g}"
        )


if __name__ == "__main__":
    main()
