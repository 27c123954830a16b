"""The hooks engine's parts of one step, layer by layer, against the GEMM they amount to.

Not a test. For one network and batch (``benchmarks/step_cost.py``'s models; default the
regression demo's ``resnet8_fixup`` on 28x28 images, b = 128, one output), ``--steps`` calls of
``HooksEngine.compute`` followed by ``J^T c`` and ``J v`` (``c`` random ``(b*k,)``, ``v`` the
``J^T c`` just computed: the two products a momentum step asks for), with timers around

- every Gram update (``handlers.add_gram_lower``: the symmetric rank-k update of one piece,
  ``(n, numel)``), recorded with its shape and its achieved GFLOP/s (``2 * 3/4 * n^2 * numel``
  flops where the symmetric update's halves are taken, ``handlers.halves_pay``, else ``2 n^2 numel``);
- every piece's ``jt_times`` and ``j_times`` (by piece class and parameter size);
- the engine's own timers (``last_timings``: forward, backward, per-sample gradients, Gram).

Then the floor those Gram calls are compared with, timed in the same process, interleaved: one
symmetric update and one full product ``J J^T`` of a ``(n, P)`` matrix, ``P`` the summed width of
every piece the step added (the per-sample gradients of the whole network in one buffer), and a
square 2048 GEMM (the CPU's GEMM speed). Medians over the counted steps (the first ``--skip``
include the conv paths' timing trials).

``--kept-by-convolution``: every kept convolution (``handlers.KeptConv``) computes ``J^T c`` and
``J v`` by convolutions, as before gram8 (not from its per-sample gradients while they sit intact
in the workspace's scratch).
``torch.set_num_threads(--threads)`` (default 2), ``OMP_WAIT_POLICY=PASSIVE``, the load average
before and after; results appended to ``--out``::

    python benchmarks/engine_parts.py --model resnet8 --batch 128 --steps 30
    python benchmarks/engine_parts.py --model resnet8 --batch 128 --steps 30 --kept-by-convolution
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP

import torch  # noqa: E402

from gramnewton.engines import handlers  # noqa: E402
from gramnewton.engines.hooks import HooksEngine  # noqa: E402
from gramnewton.lab.experiments.training import residuals  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost  # noqa: E402
from results_log import append_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def gram_flops(n: int, numel: int) -> float:
    """Flops of one :func:`handlers.add_gram_lower` call on ``(n, numel)``."""
    return 2.0 * n * n * numel * (0.75 if handlers.halves_pay(n, numel) else 1.0)


def best_of(fn: Callable[[], object], runs: int) -> float:
    """Fastest of ``runs`` timed calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def instrument() -> tuple[list[tuple[tuple[int, int], float]], dict[str, list[float]]]:
    """Wrap the Gram update and the pieces' products with timers; returns where they record."""
    gram_calls: list[tuple[tuple[int, int], float]] = []
    products: dict[str, list[float]] = defaultdict(list)
    update = handlers.add_gram_lower

    def timed_update(gram: torch.Tensor, jac: torch.Tensor) -> None:
        start = time.perf_counter()
        update(gram, jac)
        gram_calls.append((tuple(jac.shape), time.perf_counter() - start))

    handlers.add_gram_lower = timed_update

    def timer(product: Callable, name: str) -> Callable:
        def timed(self: object, v: torch.Tensor) -> object:
            start = time.perf_counter()
            out = product(self, v)
            narrow = isinstance(self, handlers.Dense) and self.jac.shape[1] == 1  # the scalar parameters
            products[f"{type(self).__name__}{' (1 column)' if narrow else ''}.{name}"].append(
                time.perf_counter() - start
            )
            return out

        return timed

    for cls in (handlers.Dense, handlers.PermutedDense, handlers.KeptConv, handlers.Factored):
        for name in ("jt_times", "j_times"):
            setattr(cls, name, timer(getattr(cls, name), name))
    return gram_calls, products


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=list(step_cost.MODELS), default="resnet8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kept-by-convolution", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/engine_parts.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kept_by_convolution:
        handlers.KeptConv._intact = lambda self: None
    gram_calls, products = instrument()
    model, x, y = step_cost.setup(args.model, args.batch)
    engine = HooksEngine(model)
    closure = lambda: residuals(model(x), y)  # noqa: E731
    load = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC).isoformat()
    per_step: list[dict[str, float]] = []
    layers: dict[tuple[int, tuple[int, int]], list[float]] = defaultdict(list)
    product_steps: dict[str, list[float]] = defaultdict(list)
    shapes: list[tuple[int, int]] = []
    for step in range(args.steps):
        gram_calls.clear()
        products.clear()
        start = time.perf_counter()
        system = engine.compute(closure)
        computed = time.perf_counter()
        jtc = system.jt_times(torch.randn(system.residuals.numel()))
        after_jt = time.perf_counter()
        system.j_times(jtc)
        end = time.perf_counter()
        if step < args.skip:
            continue
        per_step.append(
            {
                **engine.last_timings,
                "compute": computed - start,
                "jt_times": after_jt - computed,
                "j_times": end - after_jt,
                "gram_calls": sum(t for _, t in gram_calls),
            }
        )
        shapes = [shape for shape, _ in gram_calls]
        for index, (shape, t) in enumerate(gram_calls):
            layers[(index, shape)].append(t)
        for key, ts in products.items():
            product_steps[key].append(sum(ts))
    # the floor: every piece's per-sample gradients in one (n, P) buffer; none when no piece went
    # through add_gram_lower (a small network's Linear layers add their Gram parts from factors)
    n = shapes[0][0] if shapes else 0
    width = sum(numel for _, numel in shapes)
    jac = torch.randn(n, width)
    gram = torch.zeros(n, n)
    square = torch.randn(2048, 2048)
    floors: dict[str, list[float]] = defaultdict(list)
    for _ in range(5 if shapes else 0):  # interleaved: a slow phase of the machine hits every floor alike
        floors["one_symmetric_update"].append(best_of(lambda: handlers.add_gram_lower(gram, jac), 3))
        floors["one_full_product"].append(best_of(lambda: torch.mm(jac, jac.T), 3))
        floors["square_2048"].append(best_of(lambda: torch.mm(square, square), 2))
    floor = {key: min(ts) for key, ts in floors.items()}
    load_after = os.getloadavg()
    median = {key: statistics.median(s[key] for s in per_step) for key in per_step[0]}
    layer_rows = [
        {
            "index": index,
            "shape": list(shape),
            "median_ms": statistics.median(ts) * 1e3,
            "gflops": gram_flops(*shape) / statistics.median(ts) / 1e9,
        }
        for (index, shape), ts in sorted(layers.items())
    ]
    run = {
        "model": args.model,
        "batch": args.batch,
        "steps_counted": len(per_step),
        "threads": torch.get_num_threads(),
        "kept_by_convolution": args.kept_by_convolution,
        "started": started,
        "load_average": load,
        "load_average_after": load_after,
        "median_s": median,
        "gram_layers": layer_rows,
        "products_median_ms": {k: statistics.median(ts) * 1e3 for k, ts in sorted(product_steps.items())},
        "floor_s": floor,
        "floor_gflops": {
            "one_symmetric_update": gram_flops(n, width) / floor["one_symmetric_update"] / 1e9,
            "one_full_product": 2.0 * n * n * width / floor["one_full_product"] / 1e9,
            "square_2048": 2.0 * 2048**3 / floor["square_2048"] / 1e9,
        }
        if floor
        else {},
        "gram_width": width,
        "conv_paths": {str(key[1:3]): path for key, path in handlers.CONV_WEIGHT_PATHS.choices.items()},
    }
    append_record(args.out, run)
    print(
        f"{args.model} b={args.batch} (load {load[0]:.2f} -> {load_after[0]:.2f}), medians over {len(per_step)} steps:"
    )
    print("  " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in median.items()))
    total = sum(r["median_ms"] for r in layer_rows)
    print(f"  Gram calls: {len(layer_rows)}, sum of medians {total:.2f} ms, width P = {width}")
    for r in layer_rows:
        print(f"    {str(tuple(r['shape'])):>14} {r['median_ms']:7.3f} ms {r['gflops']:6.1f} GFLOP/s")
    if floor:
        print(
            "  floor: one symmetric update {:.2f} ms ({:.1f} GFLOP/s), one full product {:.2f} ms ({:.1f}), "
            "square 2048 GEMM {:.1f} GFLOP/s".format(
                floor["one_symmetric_update"] * 1e3,
                run["floor_gflops"]["one_symmetric_update"],
                floor["one_full_product"] * 1e3,
                run["floor_gflops"]["one_full_product"],
                run["floor_gflops"]["square_2048"],
            )
        )
    print("  products: " + ", ".join(f"{k} {v:.2f} ms" for k, v in run["products_median_ms"].items()))


if __name__ == "__main__":
    main()
