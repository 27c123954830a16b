"""Cost of the hooks engine's row check (issue 11 item 2): steady state and first step.

Not a test. One process, ``torch.set_num_threads(2)``, ``OMP_WAIT_POLICY=PASSIVE`` (spinning
OpenMP threads make steps on a shared 2-core machine many times slower, see step_cost.py): a
ResNet-32 Fixup at batch 32 on 32x32 inputs; each round runs, interleaved and in a rotating
order, one SGD step, one GGN step with the row check as shipped (verdict cached per forward
signature) and one GGN step with the check switched off (the engine before the check), and a second engine with the
check (an A/A control: the spread between two identical engines). Medians
over rounds and their ratios to the SGD step of the same rounds are written to
``benchmarks/results/row_check_cost.json`` with the load average. Also recorded: the steady-state
bookkeeping of the check alone (the graph signature of one step, mean of 100), and the first
step of a fresh engine (check included) against a second step.

Usage::

    python benchmarks/row_check_cost.py --reps 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402

from gramnewton import GramGaussNewton  # noqa: E402
from gramnewton.engines import HooksEngine  # noqa: E402
from gramnewton.engines.rows import graph_signature, post_order  # noqa: E402
from gramnewton.lab.models import get_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/row_check_cost.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = get_model("resnet32_fixup")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randn(args.batch)
    closure = lambda: model(x).squeeze(1) - y  # noqa: E731

    checked, unchecked, control = HooksEngine(model), HooksEngine(model), HooksEngine(model)
    unchecked._rows_not_samples = lambda calls, residuals, post: []  # the engine without the check
    start = time.perf_counter()
    checked.compute(closure)
    first = time.perf_counter() - start
    start = time.perf_counter()
    checked.compute(closure)
    second = time.perf_counter() - start

    sgd = torch.optim.SGD(model.parameters(), lr=1e-6)
    engines = (("check", checked), ("no_check", unchecked), ("check_again", control))
    ggn = {
        name: GramGaussNewton(model, alpha=1e6, adaptive_damping=False, engine=e, momentum=0.0) for name, e in engines
    }

    def sgd_step() -> None:
        sgd.zero_grad()
        closure().pow(2).mean().backward()
        sgd.step()

    steps = {"sgd": sgd_step, **{name: (lambda o=o: o.step(closure)) for name, o in ggn.items()}}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    loads = [os.getloadavg()[0]]
    order = list(steps)
    for rep in range(args.reps):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            step = steps[name]
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    post = post_order(closure().grad_fn)
    t0 = time.perf_counter()
    for _ in range(100):
        graph_signature(post, ())
    bookkeeping = (time.perf_counter() - t0) / 100
    result = {
        "model": "resnet32_fixup",
        "batch": args.batch,
        "threads": 2,
        "reps": args.reps,
        "median_s": median,
        "ratio_to_sgd": {name: median[name] / median["sgd"] for name in median},
        "check_over_no_check": median["check"] / median["no_check"],
        "check_over_check_again": median["check"] / median["check_again"],
        "times_s": times,
        "signature_s": bookkeeping,
        "first_compute_s": first,
        "second_compute_s": second,
        "loadavg_1min": loads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
