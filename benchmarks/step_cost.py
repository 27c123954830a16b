"""Cost of one optimizer step: SGD, Adam, GGN (hooks engine), GGN (reference engine).

Not a test. For every (model, batch) the methods are interleaved in one process: each round
runs one step of every method, so a slow phase of the machine hits all of them alike; the figure
reported is the median over rounds, and its ratio to the SGD step of the same run. The JSON also
has the median of the per-round ratios (``ratio_to_sgd_per_round``), which a load change in the
middle of a run moves less (a jemalloc row read 0.99 as a ratio of medians where its rounds read
1.44, 1.45, 0.97, 1.42 and 1.53); the tables show it in brackets where the two differ by more
than 0.02. Peak memory is
the peak resident set (``VmHWM``) of a fresh child process that runs only that method (import and data
included, so the ratio to SGD's is a conservative one; the JSON also has the peak above the
resident set just before the first step).

A GGN step's floor (``gram_floor`` in the JSON) is an SGD step plus the parts of a GGN step that no
engine forming the exact Gram matrix in float32 can skip, each timed alone in the same rounds: for
the wide two-layer net the bare products of its factorised Gram, ``(A A^T) * (G G^T)`` with ``A``
(b, d) and ``G`` (b, M); for the ResNets (:data:`FLOOR_MODELS`) the symmetric products of every
parameter's per-sample gradients (``handlers.add_gram_lower`` on a ``(b, numel)`` block, one per
weight, the narrow parameters in one) and, for each convolution the engine keeps as its input and
output gradient (``KeptConv``, the memory rule), the weight-gradient convolution of its ``J^T r``.
The per-sample gradients themselves are left out (at best they cost SGD's weight gradients, which
the floor's SGD step already holds), as are the hooks, the solve and the update: so ``floor / SGD``
is a ratio no engine reaches on this machine without more memory or fewer flops.

Results are merged into ``--out`` (default ``benchmarks/results/step_cost.json``); a run recorded
under ``benchmarks/results`` also regenerates the tables of ``docs/performance.md`` (``--doc``), a
scratch run elsewhere (``--out /tmp/x.json``) leaves the docs alone unless ``--doc`` is given.

Usage (the full grid takes long; run subsets, results are merged into the JSON)::

    python benchmarks/step_cost.py --models fixup32 fixup64 --batch 128 --reps 7
    python benchmarks/step_cost.py --models two_layer --batch 32 128 256
    python benchmarks/step_cost.py --models fixup32 --batch 128 --allocators system   # one allocator

Allocators (``--allocators``, default ``tuned system`` plus ``jemalloc`` when ``libjemalloc.so.2``
is installed): every (model, batch) is run once per allocator, each in a fresh child process,
back to back. ``tuned`` is glibc after ``gramnewton.tune_allocator()`` (what the ``gramnewton``
command does; the default here too), ``system`` is glibc as a user gets it, ``jemalloc`` is
``LD_PRELOAD``-ed with freed pages kept. Minor page faults per step (pages the kernel had to map
and zero: the allocator's cost) are recorded with every method.
The children also set ``OMP_WAIT_POLICY`` (default ``PASSIVE``): on a 2-core machine shared with other
jobs, OpenMP threads that spin at barriers made a small ``(32, 4096)`` product 100x slower with
2 threads (63 ms against 0.6 ms passive); the setting is recorded with every run.
``--omp-wait-policy unset`` leaves it unset, libgomp's default (spin a while, then sleep): what a
user's process has; run it alone on the machine (under the CPU lock).

``--alone ROUNDS`` also steps SGD and GGN (``ggn_fast``) each alone in a fresh process, ROUNDS
times in turn, and records their ratio per round (``alone`` in the JSON): a user's process runs one
optimizer, while the interleaved rounds share one allocator, whose state each method's frees move
for the other (docs/performance.md, twenty-ninth session).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from results_log import host
from torch import Tensor, nn
from tqdm import tqdm

from gramnewton import tune_allocator
from gramnewton.engines import GramSystem, HooksEngine, ReferenceEngine, handlers
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.training import make_train_step
from gramnewton.lab.models import TwoLayerNet, get_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"  # runs recorded here regenerate docs/performance.md
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
ALLOCATORS = ("tuned", "system", "jemalloc")
METHODS = ("sgd", "adam", "ggn_fast", "ggn_demo", "ggn_ref")
# ggn_demo's rule is first stepped (at most this many steps) to where the demo spends its run:
# alpha at its floor with gain ratios above ``high``, one re-evaluated step in ``check_every``
DEMO_PRIMING_STEPS = 60


@dataclass(frozen=True)
class ModelSpec:
    """A network and its batches: ``data(b)`` gives ``(x, y)`` (default: standard normal ``x`` of
    ``input_shape`` and ``y`` of shape ``(b,)``)."""

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    data: Callable[[int], tuple[Tensor, Tensor]] | None = None


def sinc_batch(b: int) -> tuple[Tensor, Tensor]:
    """``b`` uniform points of ``[-1, 1]`` and ``sinc(10 x)``: the time-to-target benchmark's sinc task."""
    x = 2 * torch.rand(b, 1) - 1
    return x, torch.sinc(10 * x).squeeze(1)


MODELS = {
    "fixup32": ModelSpec(lambda: get_model("resnet32_fixup"), (3, 32, 32)),
    "fixup64": ModelSpec(lambda: get_model("resnet32_fixup"), (3, 64, 64)),
    "gn32": ModelSpec(lambda: get_model("resnet32_gn"), (3, 32, 32)),
    "two_layer": ModelSpec(lambda: TwoLayerNet(10, width=4096), (10,)),
    # the network `gramnewton demo` trains, on its (1, 28, 28) images
    "resnet8": ModelSpec(lambda: get_model("resnet8_fixup", in_channels=1, num_outputs=1), (1, 28, 28)),
    # the same network on benchmarks/time_to_target.py's rotated-digits images, (1, 8, 8)
    "resnet8_digits": ModelSpec(lambda: get_model("resnet8_fixup", in_channels=1, num_outputs=1), (1, 8, 8)),
    # benchmarks/time_to_target.py's sinc task: 1-20-1 tanh MLP, 61 parameters
    "sinc": ModelSpec(lambda: get_model("mlp", in_channels=1, hidden=(20,), act="tanh"), (1,), sinc_batch),
    # benchmarks/time_to_target.py's concrete-10k and concrete-100k networks (8-96-96-1 and
    # 8-310-310-1 tanh MLPs with biases), their full batch being 824 rows
    "concrete10k": ModelSpec(lambda: get_model("mlp", in_channels=8, hidden=(96, 96), act="tanh"), (8,)),
    "concrete100k": ModelSpec(lambda: get_model("mlp", in_channels=8, hidden=(310, 310), act="tanh"), (8,)),
}


class TimedEngine:
    """Wraps an engine to time ``compute`` and ``jt_times`` (the rest of a step is solve + apply).

    It passes ``form_gram`` through to an engine that takes it (``can_skip_gram``), as the
    optimizer would: without it a parameter-space step (sinc at batch 1000) would form a Gram
    that the unwrapped engine skips."""

    def __init__(self, engine: HooksEngine | ReferenceEngine):
        self.engine, self.params = engine, engine.params
        self.can_skip_gram = getattr(engine, "can_skip_gram", False)
        self.times: dict[str, float] = {}

    def compute(self, closure: Callable[[], Tensor], **options: Any) -> GramSystem:
        start = time.perf_counter()
        system = self.engine.compute(closure, **options)
        self.times = {"compute": time.perf_counter() - start}
        self.times.update(getattr(self.engine, "last_timings", {}))

        def jt_times(v: Tensor) -> list[Tensor]:
            t0 = time.perf_counter()
            out = system.jt_times(v)
            self.times["update_jt"] = time.perf_counter() - t0
            return out

        return dataclasses.replace(system, jt_times=jt_times)


def make_step(method: str, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Callable[[], Tensor], Callable[[], dict]]:
    """A function doing one step of ``method`` and one returning its last breakdown.

    Every optimizer comes from the lab's factory and steps through
    :func:`~gramnewton.lab.experiments.training.make_train_step`, as in training.
    """
    if method in ("sgd", "adam"):
        opt = build_optimizer({"name": method, "lr": 1e-6}, model)  # SGD: the factory's momentum 0.9
        return _bound(make_train_step(model, opt), x, y), first_order_breakdown(model, opt)
    params = list(model.parameters())
    engine = TimedEngine(ReferenceEngine(params) if method == "ggn_ref" else HooksEngine(model, params))
    if method == "ggn_demo":
        return demo_step(model, engine, x, y)
    # a large alpha keeps the weights (and so the timings) where they are over many steps
    ggn = build_optimizer(
        {"name": "ggn", "momentum": 0.0, "alpha": 1e6, "engine": engine, "adaptive_damping": False}, model
    )
    return _bound(make_train_step(model, ggn), x, y), lambda: dict(engine.times)


def demo_step(
    model: nn.Module, engine: TimedEngine, x: Tensor, y: Tensor
) -> tuple[Callable[[], Tensor], Callable[[], dict]]:
    """GGN as the demo trains it (``GramGaussNewton(model)``'s defaults: momentum 0.9, gain-ratio
    damping re-evaluating one step in four once ``alpha`` sits at its floor), primed into that
    steady state; the breakdown records whether the step was re-evaluated (``re_evaluated``)."""
    ggn = build_optimizer({"name": "ggn", "engine": engine}, model)
    step = _bound(make_train_step(model, ggn), x, y)
    for _ in range(DEMO_PRIMING_STEPS):
        if ggn.damping.trusted:
            break
        step()

    def breakdown() -> dict:
        measured = ggn.last_diagnostics.gain_ratio is not None
        return {**engine.times, "re_evaluated": float(measured), "check_every": ggn.damping.check_every}

    return step, breakdown


def _bound(step: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    return lambda: step(x, y)


def first_order_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], dict]:
    """Hooks that split a first-order step into forward, backward (to the last gradient
    accumulated) and the rest (the optimizer's update); returns the last step's split.

    One Python call per parameter and step is the hooks' overhead (microseconds).
    """
    marks: dict[str, float] = {}

    def mark(name: str) -> Callable[..., None]:
        return lambda *_: marks.__setitem__(name, time.perf_counter())

    model.register_forward_pre_hook(mark("start"))
    model.register_forward_hook(mark("forward"))
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(mark("backward"))
    optimizer.register_step_post_hook(mark("end"))

    def breakdown() -> dict:
        return {
            "forward": marks["forward"] - marks["start"],
            "backward": marks["backward"] - marks["forward"],
            "optimizer_step": marks["end"] - marks["backward"],
        }

    return breakdown


def gram_floor_step(b: int, d: int, width: int) -> Callable[[], None]:
    """The factorised Gram products of the two-layer net, alone."""
    a, g = torch.randn(b, d), torch.randn(b, width)

    def products() -> None:
        (a @ a.T).mul_(g @ g.T)

    return products


# The ResNets whose floor is timed (:func:`floor_parts`; every convolution of theirs has its
# per-sample gradients materialised or kept, none factorised); the two-layer net has its own.
FLOOR_MODELS = ("fixup32", "fixup64", "gn32", "resnet8")


def kept_convolutions(model: nn.Module, x: Tensor) -> list[handlers.KeptConv]:
    """The pieces of ``model``'s 2-d convolution weights that the hooks engine keeps as their input
    and output gradient (:class:`~gramnewton.engines.handlers.KeptConv`: the memory rule,
    ``KEEP_FACTORS_ABOVE``) for the batch ``x`` ``(b, ...)``: the handler itself decides, on random
    ``x`` and ``g`` of the shapes one forward pass records."""
    shapes: list[tuple[nn.Module, torch.Size, torch.Size]] = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: shapes.append((m, args[0].shape, out.shape)))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    pieces = [
        handlers.handler_for(m).contributions(m, torch.randn(a), torch.randn(g), frozenset({"weight"}))["weight"]
        for m, a, g in shapes
    ]
    return [piece for piece in pieces if isinstance(piece, handlers.KeptConv)]


def floor_parts(model: nn.Module, x: Tensor) -> dict[str, Callable[[], None]]:
    """The floor's parts of a GGN step on ``model`` for the batch ``x`` ``(b, ...)``, each alone.

    ``gram_products``: ``gram += J_p J_p^T`` (lower triangle and mirror, as the engine) for every
    parameter ``p`` with at least ``b`` entries, from one reused block of per-sample gradients (a
    contiguous ``(b, numel)`` view of its first entries), and one product for the narrower
    parameters together (the engine joins them too). ``kept_jt``: ``J^T v`` of every
    :func:`kept_convolutions` piece, one weight-gradient convolution each.
    """
    b = x.shape[0]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    wide = [n for n in sizes if n >= b]
    narrow = sum(n for n in sizes if n < b)
    storage, gram = torch.randn(b * max(wide + [narrow])), torch.zeros(b, b)

    def gram_products() -> None:
        gram.zero_()
        for n in wide + ([narrow] if narrow else []):
            handlers.add_gram_lower(gram, storage[: b * n].view(b, n))  # contiguous, as the engine's pieces
        handlers.mirror_lower(gram)

    kept, v = kept_convolutions(model, x), torch.randn(b)

    def kept_jt() -> None:
        for piece in kept:
            piece.jt_times(v)

    return {"gram_products": gram_products, "kept_jt": kept_jt}


def setup(model_name: str, batch: int) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    spec = MODELS[model_name]
    model = spec.build()
    with torch.no_grad():  # Fixup zero-initialises layers; timings should not depend on that
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if spec.data is not None:
        return model, *spec.data(batch)
    return model, torch.randn(batch, *spec.input_shape), torch.randn(batch)


def time_config(model_name: str, batch: int, methods: list[str], reps: int, warmup: int) -> dict:
    """Median step time, ratio to SGD and breakdown of each method, interleaved."""
    steps, breakdowns = {}, {}
    for method in methods:  # every method gets its own copy of the model
        model, x, y = setup(model_name, batch)
        steps[method], breakdowns[method] = make_step(method, model, x, y)
    floor: dict[str, Callable[[], None]] = {}
    if "sgd" in steps:  # the floor adds to SGD's step, so it is timed only beside it
        if model_name == "two_layer":
            floor = {"gram_products": gram_floor_step(batch, 10, 4096)}
        elif model_name in FLOOR_MODELS:
            floor = floor_parts(*setup(model_name, batch)[:2])
    steps.update(floor)
    times: dict[str, list[float]] = {m: [] for m in steps}
    faults: dict[str, list[int]] = {m: [] for m in steps}
    system: dict[str, list[float]] = {m: [] for m in steps}
    parts: dict[str, list[dict]] = {m: [] for m in steps}
    # a bar of rounds / total rounds, shown on a terminal only
    for rnd in tqdm(range(warmup + reps), desc=f"{model_name} b={batch}", unit="round", leave=False, disable=None):
        for method, step in steps.items():
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            if rnd >= warmup:
                times[method].append(elapsed)
                faults[method].append(after.ru_minflt - usage.ru_minflt)
                system[method].append(after.ru_stime - usage.ru_stime)
                parts[method].append(breakdowns.get(method, dict)())
    result = {}
    for method, ts in times.items():
        med = statistics.median(ts)
        entry = {
            "median_s": med,
            "times_s": ts,
            "ratio_to_sgd": med / statistics.median(times["sgd"]) if "sgd" in times else None,
            "ratio_to_sgd_per_round": (
                statistics.median(t / base for t, base in zip(ts, times["sgd"])) if "sgd" in times else None
            ),
            # pages the kernel mapped (and zeroed) during a step, and the kernel time: the allocator's cost
            "minor_faults_per_step": statistics.median(faults[method]),
            "system_s_per_step": statistics.median(system[method]),
        }
        keys = set().union(*parts[method]) if parts[method] else set()
        if keys:
            entry["breakdown_s"] = {k: statistics.median(p.get(k, 0.0) for p in parts[method]) for k in sorted(keys)}
        if "re_evaluated" in keys:
            entry.update(amortised(ts, parts[method]))
        result[method] = entry
    if floor:
        sgd = statistics.median(times["sgd"])
        floor_s = {part: result.pop(part)["median_s"] for part in floor}  # the parts are no methods
        entry: dict[str, Any] = {"floor_s": sgd + sum(floor_s.values()), "parts_s": floor_s}
        entry["floor_over_sgd"] = entry["floor_s"] / sgd
        rounds = zip(times["sgd"], *(times[part] for part in floor))
        entry["floor_over_sgd_per_round"] = statistics.median(1 + sum(extra) / base for base, *extra in rounds)
        if model_name == "two_layer":
            entry["gram_flops"] = 2 * batch * batch * (10 + 4096)
        if "ggn_fast" in result:
            entry["ggn_fast_over_floor"] = result["ggn_fast"]["median_s"] / entry["floor_s"]
        result["gram_floor"] = entry
    return result


def amortised(times: list[float], parts: list[dict]) -> dict:
    """Median step with and without the gain-ratio re-evaluation, and their average over a
    ``check_every``-step cycle (what a training run pays per step in the rule's steady state)."""
    checked = [t for t, p in zip(times, parts) if p["re_evaluated"]]
    plain = [t for t, p in zip(times, parts) if not p["re_evaluated"]]
    out = {"re_evaluated_steps": len(checked), "plain_steps": len(plain)}
    if checked and plain:
        every = parts[0]["check_every"]
        out["plain_s"], out["re_evaluated_s"] = statistics.median(plain), statistics.median(checked)
        out["amortised_s"] = ((every - 1) * out["plain_s"] + out["re_evaluated_s"]) / every
    return out


def alone(model_name: str, batch: int, method: str, allocator: str, warmup: int, reps: int) -> dict:
    """``method`` stepped alone in a fresh child process, as in a user's training process: ``warmup``
    steps, then ``reps`` timed ones (their times and minor page faults), and the child's peak RSS
    in MB (``VmHWM``: import and data included; also above the resident set before the first step)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    code = (
        "import json, resource, sys, time, torch; sys.path.insert(0, sys.argv[1]); import step_cost as s; "
        "s.apply_allocator(sys.argv[6]); torch.set_num_threads(int(sys.argv[5])); model, x, y = s.setup(sys.argv[2], int(sys.argv[3])); "
        "step, _ = s.make_step(sys.argv[4], model, x, y); "
        "before = s.high_water_kb(); times, faults = [], []\n"
        "for i in range(int(sys.argv[7]) + int(sys.argv[8])):\n"
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.perf_counter(); step()\n"
        "    t1 = time.perf_counter(); f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    if i >= int(sys.argv[7]): times.append(t1 - t0); faults.append(f1 - f0)\n"
        "print(json.dumps(dict(before_kb=before, peak_kb=s.high_water_kb(), times_s=times, faults=faults)))"
    )
    args = [str(Path(__file__).parent), model_name, str(batch), method, str(torch.get_num_threads()), allocator]
    out = subprocess.run(
        [sys.executable, "-c", code, *args, str(warmup), str(reps)],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    ).stdout.splitlines()[-1]
    record = json.loads(out)
    before, peak = record.pop("before_kb") / 1024, record.pop("peak_kb") / 1024
    return {**record, "peak_rss_mb": peak, "peak_above_start_mb": peak - before}


def peak_memory(model_name: str, batch: int, method: str, allocator: str, steps: int = 2) -> dict:
    """Peak RSS (MB) of a child process that builds the model and runs ``steps`` steps of ``method``."""
    record = alone(model_name, batch, method, allocator, 0, steps)
    return {"peak_rss_mb": record["peak_rss_mb"], "peak_above_start_mb": record["peak_above_start_mb"]}


def alone_rounds(model_name: str, batch: int, allocator: str, warmup: int, reps: int, rounds: int) -> dict:
    """SGD and GGN (``ggn_fast``) each stepped alone (:func:`alone`), ``rounds`` times in turn.

    The interleaved rounds of :func:`time_config` share one process, and so one allocator: with
    glibc, a block one method frees moves the thresholds that decide whether the other's next
    blocks are mapped afresh (at 64x64 SGD faulted 172-528k pages a step depending on what GGN had
    freed, docs/performance.md, twenty-ninth session). A user's process runs one optimizer; each
    round here starts one process per method, back to back, and its ratio compares the two
    processes' median steps."""
    runs: dict[str, list[dict]] = {"sgd": [], "ggn_fast": []}
    for _ in range(rounds):
        for method in runs:
            runs[method].append(alone(model_name, batch, method, allocator, warmup, reps))
    medians = {m: [statistics.median(r["times_s"]) for r in rs] for m, rs in runs.items()}
    per_round = [g / s for g, s in zip(medians["ggn_fast"], medians["sgd"])]
    return {
        "rounds": rounds,
        "median_s": medians,
        "faults_per_step": {m: [statistics.median(r["faults"]) for r in rs] for m, rs in runs.items()},
        "ratio_per_round": per_round,
        "ratio": statistics.median(per_round),
    }


def high_water_kb() -> int:
    """Peak resident set of this process so far (``VmHWM``), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def reference_skip_reason(model_name: str, batch: int, limit: int) -> str | None:
    if model_name != "two_layer" and batch > limit:
        return (
            f"reference engine skipped at b={batch} > --ref-max-batch={limit}: it stores J of b x m "
            "floats and runs b vmapped backward passes, minutes per step on 2 cores"
        )
    return None


COST_MODEL_CASES = {
    # name: (module, input shape)
    "linear 10->4096 (two-layer net), b=128": (lambda: nn.Linear(10, 4096, bias=False), (128, 10)),
    "linear 64->1 (ResNet head), b=128": (lambda: nn.Linear(64, 1, bias=False), (128, 64)),
    "linear 32->32 over 16 positions, b=32": (lambda: nn.Linear(32, 32, bias=False), (32, 16, 32)),
    "conv1x1 64->64 at 4x4, b=32": (lambda: nn.Conv2d(64, 64, 1, bias=False), (32, 64, 4, 4)),
    "conv3x3 16->16 at 8x8, b=32": (lambda: nn.Conv2d(16, 16, 3, padding=1, bias=False), (32, 16, 8, 8)),
    "conv3x3 16->16 at 32x32, b=128 (ResNet stage 1)": (
        lambda: nn.Conv2d(16, 16, 3, padding=1, bias=False),
        (128, 16, 32, 32),
    ),
}


def check_cost_model(reps: int) -> dict:
    """Time both weight forms (Gram + ``J^T v``) of single layers against the cost model's choice."""
    out = {}
    for name, (build, shape) in COST_MODEL_CASES.items():
        torch.manual_seed(0)
        module, x = build(), torch.randn(*shape)
        with torch.no_grad():
            g = torch.randn_like(module(x))
        n = shape[0]
        positions = g[0].numel() // g.shape[1] if isinstance(module, nn.Conv2d) else g[0].numel() // g.shape[-1]
        timings: dict[str, float | None] = {"factorised": None}  # None: its (n*S)^2 temporaries do not fit
        forms = [("materialised", False)] + (
            [("factorised", True)] if (n * positions) ** 2 <= handlers.MAX_FACTORED_ENTRIES else []
        )
        for form, forced in forms:
            original = handlers.factored_is_cheaper
            handlers.factored_is_cheaper = lambda *a, _f=forced, **k: _f
            try:
                handler = handlers.handler_for(module)
                ts = []
                for _ in range(reps + 1):
                    start = time.perf_counter()
                    piece = handler.contributions(module, x, g, frozenset({"weight"}), True)["weight"]
                    gram = torch.zeros(n, n)
                    piece.add_gram_lower(gram)
                    piece.jt_times(torch.randn(n))
                    ts.append(time.perf_counter() - start)
                timings[form] = statistics.median(ts[1:])
            finally:
                handlers.factored_is_cheaper = original
        picked = handlers.handler_for(module).contributions(module, x, g, frozenset({"weight"}), True)["weight"]
        choice = "factorised" if isinstance(picked, handlers.Factored) else "materialised"
        faster = min((f for f in timings if timings[f] is not None), key=timings.get)
        out[name] = {"seconds": timings, "model_choice": choice, "measured_faster": faster}
    return out


def render_cost_model(check: dict) -> list[str]:
    lines = [
        "",
        "## Cost model check (materialised vs factorised weight Gram, one layer)",
        "",
        "| layer | materialised s | factorised s | cost model picks | measured faster |",
        "|---|---|---|---|---|",
    ]
    for name, c in check.items():
        fact = "too large" if c["seconds"]["factorised"] is None else f"{c['seconds']['factorised']:.5f}"
        lines.append(
            f"| {name} | {c['seconds']['materialised']:.5f} | {fact} | {c['model_choice']} | {c['measured_faster']} |"
        )
    return lines


BEGIN, END = "<!-- step_cost:begin -->", "<!-- step_cost:end -->"


def write_doc(path: Path, generated: str) -> None:
    """Replace the generated part of ``path`` (between the markers), keeping hand-written text."""
    block = f"{BEGIN}\n{generated}{END}\n"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


ALLOCATOR_TITLES = {
    "system": "system glibc, as a user gets it (no tuning, no LD_PRELOAD)",
    "tuned": "glibc after `gramnewton.tune_allocator()` (what the `gramnewton` command and the benchmarks do)",
    "jemalloc": f"jemalloc, `LD_PRELOAD={JEMALLOC}` `MALLOC_CONF={JEMALLOC_CONF}`",
}


def render_run(run: dict) -> str:
    """One table row: timings, ratios, faults, memory and the GGN breakdown of one run."""
    m = run["methods"]

    def ratio(name: str) -> str:
        if name not in m:
            return "skipped" if name in run.get("skipped", {}) else "-"
        text = f"{m[name]['ratio_to_sgd']:.2f}"
        per_round = m[name].get("ratio_to_sgd_per_round")  # runs recorded before it existed lack it
        if per_round is not None and abs(per_round - m[name]["ratio_to_sgd"]) > 0.02:
            text += f" ({per_round:.2f})"
        return text

    mem = run.get("memory", {})
    mem_ratio = (
        f"{mem['ggn_fast']['peak_rss_mb'] / mem['sgd']['peak_rss_mb']:.2f}"
        if "ggn_fast" in mem and "sgd" in mem
        else "-"
    )
    bd = m.get("ggn_fast", {}).get("breakdown_s", {})
    if bd:
        hooks = bd["per_sample"] + bd["gram"]
        rest = m["ggn_fast"]["median_s"] - bd["compute"] - bd.get("update_jt", 0.0)
        parts = f"{bd['forward']:.3f} / {bd['backward'] - hooks:.3f} / {bd['per_sample']:.3f} / {bd['gram']:.3f} / {bd.get('update_jt', 0):.3f} / {rest:.3f}"
    else:
        parts = "-"
    sgd_bd = m["sgd"].get("breakdown_s", {})
    sgd = f"{m['sgd']['median_s']:.3f}" + (f" ({sgd_bd['forward']:.3f} / {sgd_bd['backward']:.3f})" if sgd_bd else "")
    faults = " / ".join(
        f"{m[k]['minor_faults_per_step']:.0f}" if k in m and "minor_faults_per_step" in m[k] else "-"
        for k in ("sgd", "ggn_fast")
    )
    return (
        f"| {run['model']} | {run['batch']} | {run['started'][:16]} | {run['load_average'][0]:.1f} | {sgd} | "
        f"{ratio('adam')} | {ratio('ggn_fast')} | {ratio('ggn_ref')} | {mem_ratio} | {faults} | {parts} |"
    )


def render_demo(runs: list[dict]) -> list[str]:
    """The demo network's steps as ratios to Adam's (the demo races GGN against Adam on wall time)."""
    lines = [
        "",
        "## The demo network: GGN against Adam",
        "",
        "`ggn_demo` is `GramGaussNewton(model)` as the demo trains it (momentum 0.9, gain-ratio damping in",
        "its steady state: one step in four re-evaluated); amortised = (3 plain + 1 re-evaluated) / 4.",
        "",
        "| model | b | allocator | run | load | SGD s | Adam s | GGN fast / Adam | GGN demo plain / Adam | re-evaluated / Adam | amortised / Adam |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        m = run["methods"]
        adam, d = m["adam"]["median_s"], m["ggn_demo"]

        def over(seconds: float | None) -> str:
            return "-" if seconds is None else f"{seconds / adam:.2f}"

        fast = m.get("ggn_fast", {}).get("median_s")
        lines.append(
            f"| {run['model']} | {run['batch']} | {run['allocator_name']} | {run['started'][:16]} | "
            f"{run['load_average'][0]:.1f} | {m['sgd']['median_s']:.3f} | {adam:.3f} | {over(fast)} | "
            f"{over(d.get('plain_s'))} | {over(d.get('re_evaluated_s'))} | {over(d.get('amortised_s'))} |"
        )
    return lines


def render_markdown(results: dict, source: str = "benchmarks/results/step_cost.json") -> str:
    """The generated part of docs/performance.md from the runs in ``results`` (read from ``source``)."""
    lines = [
        "## Step cost: GGN against SGD and Adam",
        "",
        f"Generated by `benchmarks/step_cost.py` from `{source}`; every row is one",
        "child process of that script (methods interleaved, medians of the timed steps, 2 threads,",
        "`OMP_WAIT_POLICY=PASSIVE`), one table per allocator, the stock one first. `load`: the machine's",
        "1-minute load average when the run started (2 cores, shared with other jobs).",
        "Ratios are to the SGD step of the same run (ratio of the medians; in brackets the median of the",
        "per-round ratios where the two differ by more than 0.02). Memory is the peak RSS of a child process running only",
        "that method, as a ratio to SGD's (absolute figures in the JSON). Faults: minor page faults per step",
        "(pages the kernel mapped and zeroed for the allocator), SGD / GGN fast.",
    ]
    header = [
        "",
        "| model | b | run | load | SGD s (fwd / bwd) | Adam/SGD | GGN fast/SGD | GGN ref/SGD | mem fast/SGD | faults/step | GGN fast: fwd / bwd w/o weight grads / per-sample grads / Gram / J^T r / solve+apply (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = []
    configs = [k for k in results if k != "cost_model"]
    runs = [run for key in configs for run in results[key] if "allocator_name" in run]
    runs.sort(key=lambda r: (r["model"], r["batch"], r["started"]))
    for allocator in ("system", "tuned", "jemalloc"):
        mine = [run for run in runs if run["allocator_name"] == allocator]
        if not mine:
            continue
        lines += ["", f"### Allocator: {ALLOCATOR_TITLES[allocator]}", *header]
        for run in mine:
            lines.append(render_run(run))
            if "gram_floor" in run["methods"]:
                floors.append((run, run["methods"]["gram_floor"]))
    if floors:
        lines += [
            "",
            "## GGN against its floor",
            "",
            "Floor = SGD step + the parts of a GGN step no exact float32 engine skips, timed alone in the same",
            "rounds (`benchmarks/step_cost.py`'s docstring): the wide two-layer net's factorised Gram products",
            "`(A A^T) * (G G^T)` (A: b x 10, G: b x 4096); a ResNet's per-parameter Gram products and the",
            "weight-gradient convolutions of `J^T r` for the layers kept as `(x, g)`.",
            "",
            "| model | b | allocator | run | floor parts (s) | floor s | floor / SGD | GGN fast s | GGN fast / floor |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run, f in sorted(floors, key=lambda pair: (pair[0]["model"] != "two_layer", pair[0]["model"])):
            parts = f.get("parts_s") or {}
            named = ", ".join(f"{k} {v:.4f}" for k, v in parts.items()) or f"Gram flops {f['gram_flops']:.3g}"
            over_sgd = f["floor_s"] / run["methods"]["sgd"]["median_s"]
            lines.append(
                f"| {run['model']} | {run['batch']} | {run['allocator_name']} | {run['started'][:16]} | {named} | "
                f"{f['floor_s']:.4f} | {over_sgd:.2f} | {run['methods']['ggn_fast']['median_s']:.4f} | "
                f"{f.get('ggn_fast_over_floor', float('nan')):.2f} |"
            )
    demo = [run for run in runs if "ggn_demo" in run["methods"] and "adam" in run["methods"]]
    if demo:
        lines += render_demo(demo)
    if "cost_model" in results:
        lines += render_cost_model(results["cost_model"][-1])
    skipped = {
        reason
        for key, runs in results.items()
        if key != "cost_model"
        for run in runs
        for reason in run.get("skipped", {}).values()
    }
    if skipped:
        lines += ["", "Skipped:", *[f"- {reason}" for reason in sorted(skipped)]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", nargs="+", type=int, default=[32, 128, 256])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--reps", type=int, default=5, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ref-max-batch", type=int, default=32, help="largest batch for the reference engine on ResNets")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument(
        "--alone",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time SGD and GGN (ggn_fast) each alone in a fresh process, ROUNDS times in turn "
        "(a user's process runs one optimizer; the interleaved rounds share one allocator)",
    )
    p.add_argument(
        "--cost-model", action="store_true", help="only time single layers against the Linear/Conv cost model"
    )
    default_allocators = [a for a in ALLOCATORS if a != "jemalloc" or Path(JEMALLOC).exists()]
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=default_allocators)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # measures one allocator
    p.add_argument(
        "--omp-wait-policy",
        choices=["PASSIVE", "ACTIVE", "unset"],
        default="PASSIVE",
        help="the children's OMP_WAIT_POLICY; unset: libgomp's default, what a user has",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_cost.json")
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="the doc whose generated tables to rewrite (default: docs/performance.md when --out is "
        "under benchmarks/results, else none, so a scratch run leaves the docs alone)",
    )
    args = p.parse_args(argv)
    if "jemalloc" in args.allocators and not Path(JEMALLOC).exists():
        # LD_PRELOAD of a missing library only warns: the rows would be glibc's, labelled jemalloc
        p.error(f"--allocators jemalloc needs {JEMALLOC} (Debian/Ubuntu: apt install libjemalloc2)")
    if args.doc is None and args.out.resolve().is_relative_to(RESULTS_DIR):
        args.doc = ROOT / "docs/performance.md"
    return args


def allocator_env(allocator: str, omp_wait_policy: str) -> dict[str, str]:
    """Environment of a child measuring ``allocator`` (both settings act only at process start)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    if allocator == "jemalloc":
        env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    return env


def apply_allocator(allocator: str) -> str:
    """Set up ``allocator`` in this (fresh) process; returns how it ended up, for the record."""
    if allocator == "jemalloc":
        if "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
            raise SystemExit("jemalloc requested but not preloaded")
        return f"jemalloc ({JEMALLOC_CONF})"
    if allocator == "tuned":
        tuning = tune_allocator()
        if tuning.applied:
            return "glibc tuned (" + ", ".join(f"{k}={v}" for k, v in tuning.settings.items()) + ")"
        return f"glibc, not tuned: {tuning.reason}"
    return "glibc (system defaults)"


def run_children(args: argparse.Namespace) -> None:
    """One child process per (model, batch, allocator), back to back; each appends its run."""
    common = ["--methods", *args.methods, "--reps", str(args.reps), "--warmup", str(args.warmup)]
    common += ["--ref-max-batch", str(args.ref_max_batch), "--threads", str(args.threads)]
    common += ["--omp-wait-policy", args.omp_wait_policy, "--out", str(args.out)]
    common += ["--doc", str(args.doc)] if args.doc else []
    common += ["--no-memory"] if args.no_memory else []
    common += ["--alone", str(args.alone)] if args.alone else []
    for model_name in args.models:
        for batch in args.batch:
            for allocator in args.allocators:
                cmd = [sys.executable, __file__, "--child", "--models", model_name, "--batch", str(batch)]
                cmd += ["--allocators", allocator, *common]
                subprocess.run(cmd, check=True, env=allocator_env(allocator, args.omp_wait_policy))


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (as the doc names it)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.child and not args.cost_model:
        run_children(args)
        return
    if args.cost_model and os.environ.get("OMP_WAIT_POLICY", "unset") != args.omp_wait_policy:
        os.execve(sys.executable, [sys.executable, *sys.argv], allocator_env("tuned", args.omp_wait_policy))
    allocator = apply_allocator(args.allocators[0])
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.cost_model:
        results.setdefault("cost_model", []).append(check_cost_model(args.reps))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        if args.doc:
            write_doc(args.doc, render_markdown(results, _relative(args.out)))
        print("\n".join(render_cost_model(results["cost_model"][-1])))
        return
    for model_name in args.models:
        for batch in args.batch:
            started = datetime.datetime.now(datetime.UTC).isoformat()
            skip = reference_skip_reason(model_name, batch, args.ref_max_batch)
            methods = [m for m in args.methods if not (m == "ggn_ref" and skip)]
            run = {
                "model": model_name,
                "batch": batch,
                "started": started,
                "allocator_name": args.allocators[0],
                "allocator": allocator,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "host": host(),
                "load_average": os.getloadavg(),
                "methods": time_config(model_name, batch, methods, args.reps, args.warmup),
                "load_average_after": os.getloadavg(),
                # the measured per-sample conv weight-gradient path of each layer shape that had a choice
                "conv_paths": {
                    f"in {tuple(key[1])} out {tuple(key[2])} stride {key[4]}": name
                    for key, name in handlers.CONV_WEIGHT_PATHS.choices.items()
                },
            }
            if skip and "ggn_ref" in args.methods:
                run["skipped"] = {"ggn_ref": skip}
            if not args.no_memory:
                run["memory"] = {
                    m: peak_memory(model_name, batch, m, args.allocators[0])
                    for m in methods
                    if m in ("sgd", "ggn_fast")
                }
            if args.alone:
                run["alone"] = alone_rounds(model_name, batch, args.allocators[0], args.warmup, args.reps, args.alone)
            # re-read: other children of the same run may have written in between
            results = json.loads(args.out.read_text()) if args.out.exists() else {}
            results.setdefault(f"{model_name}/b{batch}", []).append(run)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
            if args.doc:
                write_doc(args.doc, render_markdown(results, _relative(args.out)))
            m = run["methods"]
            print(
                f"{model_name} b={batch} [{args.allocators[0]}, load {run['load_average'][0]:.1f}]: "
                + ", ".join(
                    f"{k} {v['median_s']:.3f}s" + (f" ({v['ratio_to_sgd']:.2f}x)" if v["ratio_to_sgd"] else "")
                    for k, v in m.items()
                    if "median_s" in v
                ),
                flush=True,
            )
            if "gram_floor" in m:
                f = m["gram_floor"]
                print(
                    f"  floor {f['floor_s']:.3f}s = {f['floor_over_sgd']:.2f}x SGD "
                    f"(per round {f['floor_over_sgd_per_round']:.2f}; parts "
                    + ", ".join(f"{k} {v:.3f}s" for k, v in f["parts_s"].items())
                    + ")",
                    flush=True,
                )
            if args.alone:
                a = run["alone"]
                rounds = ", ".join(f"{r:.2f}" for r in a["ratio_per_round"])
                print(
                    f"  alone, {a['rounds']} rounds: ggn_fast / sgd {a['ratio']:.2f} (per round {rounds})", flush=True
                )


if __name__ == "__main__":
    main()
