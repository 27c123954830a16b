"""Data-parallel GGN on this machine: 2 processes x 1 thread (gloo, 127.0.0.1) against 1 process x 2 threads.

Not a test. Per model and union batch ``B`` (``B/2`` samples per rank):

- ``step``: median step time over interleaved rounds of, in 2 spawned processes with 1 thread
  each, GGN ``distributed="exact"``, GGN ``distributed="local"`` and an SGD step under
  ``DistributedDataParallel`` (DDP's gradient all-reduce: the communication baseline); and, in this
  process with 2 threads, the single-process GGN step on the union batch and an SGD step.
  Bytes per step and rank are *counted*: GGN's from ``GramGaussNewton.communicator.sent_bytes``
  (the tensors handed to each collective, under ring / pairwise algorithms), DDP's from a comm
  hook that sees every gradient bucket; the bytes that crossed the loopback interface
  (``/proc/net/dev``, both ranks, TCP framing included; other jobs' loopback traffic too) are
  recorded as a cross-check.
- ``convergence``: train MSE per epoch of exact, local and single-process GGN on the same data,
  batches and initial weights, through the training CLI itself: ``torchrun --standalone
  --nproc_per_node=2 -m gramnewton train`` (1 thread per rank) against ``python -m gramnewton
  train`` (2 threads); figure ``docs/figures/distributed_convergence.png``.
- ``reorder``: how far two single-process float32 runs drift apart when one of them sees every
  batch in the order the exact mode stacks it (rank 0's share first): round-off alone, the size
  of the gap any data-parallel run must have.
- ``scaling``: the scaling model of docs/distributed.md evaluated at 8, 64 and 512 GPUs for the
  parameter counts of the models above (assumptions in :data:`ASSUMPTIONS`).

``torch.set_num_threads`` is set explicitly (1 per rank, 2 single-process); the load average is
recorded next to every measurement; every measured process is spawned with ``OMP_WAIT_POLICY=PASSIVE``
(idle OpenMP threads spinning on a shared 2-core machine distort 2-thread timings). JSON in ``benchmarks/results/distributed.json`` (merged).

Usage::

    python benchmarks/distributed.py step --models two_layer fixup8 fixup32 --batch 128
    python benchmarks/distributed.py convergence --epochs 10
    python benchmarks/distributed.py reorder --task fixup8 --steps 24
    python benchmarks/distributed.py scaling
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.training import make_train_step
from gramnewton.lab.models import TwoLayerNet, get_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "distributed.json"
WORLD = 2
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "two_layer": (lambda: TwoLayerNet(10, width=4096), (10,)),
    "fixup8": (lambda: get_model("resnet8_fixup", in_channels=3), (3, 32, 32)),
    "fixup32": (lambda: get_model("resnet32_fixup", in_channels=3), (3, 32, 32)),
}


def loopback_bytes() -> int:
    """Bytes received on the loopback interface so far (every process on the machine)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[0])
    return 0


def setup(name: str, batch: int) -> tuple[nn.Module, Tensor, Tensor]:
    """The model (weights perturbed off Fixup's zeros) and a union batch, the same on every rank."""
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, torch.randn(batch, *shape), torch.randn(batch, 1)


def _bound_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """One training step on the fixed batch ``(x, y)``, as the lab's training loop takes it."""
    step = make_train_step(model, optimizer)
    return lambda: step(x, y)


# plain SGD (no momentum) as the data-parallel first-order reference
SGD = {"name": "sgd", "lr": 1e-3, "momentum": 0.0}


def _rank_worker(rank: int, store: str, name: str, batch: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=10)
    )
    steps, counters = {}, {}
    for mode in ("exact", "local"):
        model, x, y = setup(name, batch)
        shard = slice(rank * batch // WORLD, (rank + 1) * batch // WORLD)
        opt = build_optimizer(
            {"name": "ggn", "momentum": 0.0, "lam": 1.0, "alpha": 1.0, "adaptive_damping": False, "distributed": mode},
            model,
        )
        steps[f"ggn_{mode}"] = _bound_step(model, opt, x[shard], y[shard])
        counters[f"ggn_{mode}"] = opt.communicator.sent_bytes
    model, x, y = setup(name, batch)
    ddp = DistributedDataParallel(model)
    ddp_bytes: dict[str, int] = {"all_reduce": 0}

    def counting_hook(state, bucket):  # noqa: ANN001 - DDP rejects string annotations (postponed evaluation)
        buffer = bucket.buffer()
        ddp_bytes["all_reduce"] += int(2 * (WORLD - 1) / WORLD * buffer.numel() * buffer.element_size())
        return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0] / WORLD)

    ddp.register_comm_hook(None, counting_hook)
    steps["ddp_sgd"] = _bound_step(
        ddp,
        build_optimizer(SGD, ddp),
        x[rank * batch // WORLD : (rank + 1) * batch // WORLD],
        y[:1].expand(batch // WORLD, 1),
    )
    counters["ddp_sgd"] = ddp_bytes
    times: dict[str, list[float]] = {m: [] for m in steps}
    sent: dict[str, list[int]] = {m: [] for m in steps}
    wire: dict[str, list[int]] = {m: [] for m in steps}
    for rnd in range(rounds + 1):  # round 0 warms up
        for method, step in steps.items():
            dist.barrier()
            before_sent, before_wire = sum(counters[method].values()), loopback_bytes()
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            dist.barrier()
            if rnd:
                times[method].append(elapsed)
                sent[method].append(sum(counters[method].values()) - before_sent)
                wire[method].append(loopback_bytes() - before_wire)
    if rank == 0:
        detail = {m: dict(c) for m, c in counters.items()}
        Path(out).write_text(
            json.dumps({"times_s": times, "sent_bytes": sent, "loopback_bytes": wire, "by_collective": detail})
        )
    dist.destroy_process_group()


def _single_process(rank: int, name: str, batch: int, rounds: int, out: str) -> None:
    """1 process x 2 threads, spawned like the ranks (so ``OMP_WAIT_POLICY`` applies to it too)."""
    torch.set_num_threads(2)
    model, x, y = setup(name, batch)
    ggn = build_optimizer(
        {"name": "ggn", "momentum": 0.0, "lam": 1.0, "alpha": 1.0, "adaptive_damping": False, "distributed": None},
        model,
    )
    steps = {"ggn_single": _bound_step(model, ggn, x, y)}
    model, x, y = setup(name, batch)
    steps["sgd_single"] = _bound_step(model, build_optimizer(SGD, model), x, y)
    times: dict[str, list[float]] = {m: [] for m in steps}
    for rnd in range(rounds + 1):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            if rnd:
                times[method].append(time.perf_counter() - start)
    Path(out).write_text(json.dumps(times))


def bench_step(name: str, batch: int, rounds: int) -> dict:
    """Both layouts, one after the other (the single process first), with the load around each."""
    model = MODELS[name][0]()
    m = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_single_process, args=(name, batch, rounds, os.path.join(tmp, "single.json")), nprocs=1)
        single = json.loads(Path(tmp, "single.json").read_text())
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank_worker, args=(os.path.join(tmp, "store"), name, batch, rounds, out), nprocs=WORLD)
        ranks = json.loads(Path(out).read_text())
    result = {
        "model": name,
        "params": m,
        "batch_union": batch,
        "batch_per_rank": batch // WORLD,
        "world": WORLD,
        "threads": {"per_rank": 1, "single_process": 2},
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "methods": {},
        "by_collective_total": ranks["by_collective"],
    }
    for method, ts in {**single, **ranks["times_s"]}.items():
        entry = {"median_s": statistics.median(ts), "times_s": ts}
        if method in ranks["sent_bytes"]:
            entry["sent_bytes_per_rank"] = statistics.median(ranks["sent_bytes"][method])
            entry["loopback_bytes_both_ranks"] = statistics.median(ranks["loopback_bytes"][method])
        result["methods"][method] = entry
    return result


# The wide two-layer net of Eq. 12 (d = 10, M = 4096) on the 10 diabetes features; ResNet-8 Fixup
# on the 8x8 rotated digits. Batch 64 (32 per rank), float32 models, fixed alpha.
TASKS = {
    "two_layer": {
        "name": "diabetes-two-layer",
        "model": {"name": "two_layer"},
        "data": {"name": "diabetes"},
        "optimizer": {"name": "ggn", "momentum": 0.0, "lam": 1.0, "alpha": 1.0, "adaptive_damping": False},
        "train": {"batch_size": 64, "weight_decay": 0.0},
    },
    "fixup8": {
        "name": "digits-resnet8-fixup",
        "model": {"name": "resnet8_fixup"},
        "data": {"name": "rotated-digits", "train_subset": 512, "test_subset": 256},
        "optimizer": {"name": "ggn", "momentum": 0.0, "lam": 1.0, "alpha": 1.0, "adaptive_damping": False},
        "train": {"batch_size": 64, "weight_decay": 0.0},
    },
}
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    f"--nproc_per_node={WORLD}",
    "-m",
    "gramnewton",
]
LAYOUTS = {  # name -> (launcher, threads per process, config overrides)
    "single": ([sys.executable, "-m", "gramnewton"], 2, []),
    "exact": (TORCHRUN, 1, ["optimizer.distributed=exact"]),
    "local": (TORCHRUN, 1, ["optimizer.distributed=local"]),
}


def convergence(epochs: int, folder: Path) -> dict:
    """Train every task in every layout through the CLI; the metrics rows of each run."""
    from gramnewton.lab.experiments.config import dumps, resolve
    from gramnewton.lab.experiments.metrics import read_rows

    results = {}
    for task, raw in TASKS.items():
        config = resolve(raw, [f"train.epochs={epochs}"])
        path = folder / f"{task}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(config))
        for layout, (launcher, threads, overrides) in LAYOUTS.items():
            out = folder / task / layout
            sets = [a for o in [f"train.threads={threads}", *overrides] for a in ("--set", o)]
            load = os.getloadavg()
            subprocess.run(
                [*launcher, "train", str(path), "--out", str(out), "--overwrite", *sets],
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
            rows = read_rows(out / "metrics.csv")
            results[f"{task}/{layout}"] = {
                "load_average_before": load,
                "load_average_after": os.getloadavg(),
                "rows": rows,
            }
            print(task, layout, [round(r["train_loss"], 4) for r in rows], file=sys.stderr)
    return results


def convergence_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6))
    for ax, task in zip(axes, TASKS):
        for layout, style in zip(LAYOUTS, ("-", "--", ":")):
            rows = results[f"{task}/{layout}"]["rows"]
            label = {"single": "1 process x 2 threads", "exact": "exact, 2 x 1", "local": "local, 2 x 1"}[layout]
            ax.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], style, marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train MSE")
        ax.set_title(TASKS[task]["name"])
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def reorder(task: str, steps: int) -> dict:
    """Relative parameter gap and both losses per step: batch order ``idx`` against
    ``[idx[0::2], idx[1::2]]``, same weights, one thread, float32."""
    from gramnewton.lab.experiments.config import resolve
    from gramnewton.lab.experiments.setup import build_model, load_data
    from gramnewton.lab.experiments.training import batch_order

    torch.set_num_threads(1)
    config = resolve(TASKS[task])
    data = load_data(config, "train")
    models = [build_model(config, data) for _ in range(2)]
    alpha = config["optimizer"]["alpha"]
    ggn = {"name": "ggn", "momentum": 0.0, "lam": 1.0, "alpha": alpha, "adaptive_damping": False, "distributed": None}
    train_steps = [make_train_step(m, build_optimizer(ggn, m)) for m in models]
    order = [idx for epoch in range(1, 100) for idx in batch_order(len(data), config["train"]["batch_size"], 0, epoch)]
    rows = []
    for idx in order[:steps]:
        stacked = torch.cat([idx[0::WORLD], idx[1::WORLD]])
        losses = [float(step(*data[i])) for step, i in zip(train_steps, (idx, stacked))]
        a, b = (torch.nn.utils.parameters_to_vector(m.parameters()).detach() for m in models)
        rows.append({"loss": losses[0], "loss_reordered": losses[1], "relative_gap": float((a - b).norm() / a.norm())})
        print(len(rows), rows[-1], file=sys.stderr)
    return {"task": task, "alpha": alpha, "load_average": os.getloadavg(), "steps": rows}


# Assumptions of the scaling model (docs/distributed.md): NCCL bus bandwidth per GPU, latency per
# collective, the GEMM and Cholesky rates of one GPU, 4-byte entries, k = 1 output.
ASSUMPTIONS = {
    "bandwidth_Bps": {8: 200e9, 64: 50e9, 512: 50e9},  # NVLink/NVSwitch in one node; InfiniBand 400 Gb/s per GPU beyond
    "latency_s": {8: 10e-6, 64: 30e-6, 512: 50e-6},
    "gemm_flops": 50e12,  # TF32 GEMM, sustained
    "cholesky_flops": 10e12,  # a (B, B) factorisation on one GPU
    "entry_bytes": 4,
    "batch_per_gpu": 128,
}


def scaling(params: dict[str, int]) -> dict:
    """Per step and GPU: bytes and seconds of communication and of the extra compute of the exact
    mode, against local mode (= DDP's all-reduce), from the formulas of gramnewton.distributed."""
    a, b, s = ASSUMPTIONS, ASSUMPTIONS["batch_per_gpu"], ASSUMPTIONS["entry_bytes"]
    table = {}
    for name, m in params.items():
        for p in (8, 64, 512):
            q, n = (p - 1) / p, p * b
            exact_entries = q * (b * m + 2 * n * n + n + m)
            local_entries = 2 * q * m
            bw, lat = a["bandwidth_Bps"][p], a["latency_s"][p]
            exact_comm = s * exact_entries / bw + 4 * lat  # status, residuals, all-to-all, Gram (+ direction)
            local_comm = s * local_entries / bw + 2 * lat
            gram = 2 * n * n * m / p / a["gemm_flops"]  # the partial Gram J[:, S_r] J[:, S_r]^T
            local_gram = 2 * b * b * m / a["gemm_flops"]
            solve = (n**3 / 3) / a["cholesky_flops"]  # replicated on every GPU
            local_solve = (b**3 / 3) / a["cholesky_flops"]
            table[f"{name}/P{p}"] = {
                "params": m,
                "union_batch": n,
                "exact_bytes": s * exact_entries,
                "local_bytes": s * local_entries,
                "gram_matrix_bytes": s * n * n,
                "exact_comm_s": exact_comm,
                "local_comm_s": local_comm,
                "exact_gram_s": gram,
                "local_gram_s": local_gram,
                "exact_solve_s": solve,
                "local_solve_s": local_solve,
                "exact_extra_s": exact_comm + gram + solve - (local_comm + local_gram + local_solve),
            }
    return {"assumptions": {k: v for k, v in a.items()}, "table": table}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    s.add_argument("--batch", type=int, default=128, help="union batch (half per rank)")
    s.add_argument("--rounds", type=int, default=5)
    c = sub.add_parser("convergence")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--runs", type=Path, default=ROOT / "runs" / "distributed")
    sub.add_parser("scaling")
    r = sub.add_parser("reorder")
    r.add_argument("--task", default="fixup8", choices=list(TASKS))
    r.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.what == "step":
        for name in args.models:
            run = bench_step(name, args.batch, args.rounds)
            results.setdefault("step", {})[f"{name}/b{args.batch}"] = run
            args.out.write_text(json.dumps(results, indent=1))
            print(
                json.dumps({m: round(e["median_s"], 4) for m, e in run["methods"].items()}),
                run["load_average_before"],
                file=sys.stderr,
            )
    if args.what == "convergence":
        results["convergence"] = convergence(args.epochs, args.runs)
        convergence_figure(results["convergence"], ROOT / "docs" / "figures" / "distributed_convergence.png")
    if args.what == "reorder":
        results.setdefault("reorder", {})[args.task] = reorder(args.task, args.steps)
    if args.what == "scaling":
        params = {name: sum(p.numel() for p in build().parameters()) for name, (build, _) in MODELS.items()}
        results["scaling"] = scaling(params)
        for key, row in results["scaling"]["table"].items():
            print(key, {k: f"{v:.3g}" for k, v in row.items()}, file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
