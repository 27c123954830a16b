"""Seconds to one target: a few configurations of ``time_to_target.py``'s tasks, every seed, in its protocol.

Not a test. ``time_to_target.py`` picks each method's configuration on seed 0 and reruns it on the
other seeds, with evaluations every 10 ms early on, so a pair whose times are 0.06-0.2 s is decided
by a handful of steps, the seed-0 draw and the machine's drift between runs. This probe asks one
question at a time: for the given ``(optimizer, config)`` pairs, how long each takes to reach
``--target`` times the initial training MSE on each seed, the configurations interleaved seed by
seed and round by round (so the machine's drift falls on all of them alike). The runs are the
benchmark's own (:func:`time_to_target.launch`: a forked child per run, the same model
initialisation, batch order, evaluation schedule, allocator and ``OMP_WAIT_POLICY``), each stopped
once it reaches the target. ``--threads`` runs every configuration at each of the given thread
counts (``torch.set_num_threads`` in the child; default the benchmark's 2), interleaved with the
others. ``--warm-up STEPS`` has each child first take that many untimed steps of the same
configuration on another seed's model, so the timed run starts in a process that has run the step
(a user's second fit in one process) rather than a fresh one. Prints the median seconds and the
steps to the target per configuration and appends a record to ``--out``. ``--count-steps`` counts the steps only, in this process: no fork, no
timing, the full training MSE evaluated after every step (on sinc about 0.2 s a run against a timed
run's 1-2 s, for scanning many configurations' step counts before timing the few that matter)::

    python benchmarks/target_probe.py --task sinc --target 0.1 --rounds 2 --configs \\
        '[["tlm", {"batch": 1000}], ["ggn", {"batch": 100, "lam": 1.0, "momentum": 0.0, "alpha": 0.1, "adaptive_damping": false}]]'
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gramnewton import NonFiniteError, SingularGramError
from gramnewton.lab.experiments.training import Callback, FitState, fit, mean_squared_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_target as ttt  # noqa: E402
from results_log import append_record  # noqa: E402

OUT = ttt.ROOT / "benchmarks" / "results" / "target_probe.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=list(ttt.TASKS))
    p.add_argument("--target", type=float, default=0.1, help="fraction of the initial training MSE")
    p.add_argument(
        "--configs",
        required=True,
        help='JSON list of [optimizer, config] pairs, e.g. [["adam", {"batch": 128, "lr": 0.01}]]',
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=1, help="times each (configuration, seed) runs")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[ttt.THREADS], help="torch threads; each configuration runs at each"
    )
    p.add_argument(
        "--count-steps",
        type=int,
        metavar="MAX_STEPS",
        help="count the steps to the target in this process (no timing), giving up after MAX_STEPS",
    )
    p.add_argument(
        "--warm-up",
        type=int,
        default=0,
        metavar="STEPS",
        help="each timed child first takes STEPS untimed steps of the same configuration on another seed's "
        "model (the process's one-time costs paid, as in a user's second fit in one process)",
    )
    p.add_argument("--memory-cap-gib", type=float, default=8.0)
    p.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "unset"], default="unset")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.configs = json.loads(args.configs)
    for optimizer, config in args.configs:
        if optimizer not in ttt.OPTIMIZERS or "batch" not in config:
            p.error(f"each entry must be [optimizer, config with a batch]; got {[optimizer, config]}")
        if optimizer == "tlm" and not ttt.tlm_available():  # its runs would all fail on the import
            p.error(ttt.TLM_MISSING)
    if args.warm_up < 0 or (args.warm_up and args.count_steps):
        p.error("--warm-up takes a number of steps >= 0, and times runs: not with --count-steps")
    if min(args.threads) < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    return args


class _StopAtTarget(Callback):
    """Stops :func:`fit` once the full training MSE is at most ``threshold`` (:attr:`reached`: the
    step), or after ``max_steps``."""

    def __init__(self, model: torch.nn.Module, train: Dataset, threshold: float, max_steps: int):
        self.model, self.train, self.threshold, self.max_steps = model, train, threshold, max_steps
        self.reached: int | None = None

    def on_step(self, state: FitState, loss: float) -> bool:
        if mean_squared_error(self.model, self.train) <= self.threshold:
            self.reached = state.step
        return self.reached is not None or state.step >= self.max_steps


def count_steps(
    task: ttt.Task, train: Dataset, optimizer: str, config: dict[str, Any], seed: int, args: argparse.Namespace
) -> int | None:
    """Steps of ``(optimizer, config)`` on ``seed`` to ``args.target`` x the initial training MSE,
    with the benchmark's initialisation and batch order; ``None`` when not within
    ``args.count_steps`` steps or when the run fails."""
    torch.manual_seed(seed)
    model = task.model()
    step, _ = ttt.make_step(optimizer, model, config)
    stop = _StopAtTarget(model, train, args.target * mean_squared_error(model, train), args.count_steps)
    batch = ttt.batch_size(config, train)
    try:
        # every epoch has a step: the callback stops the run first
        fit(step, train, batch_size=batch, seed=seed, epochs=args.count_steps, state=FitState(), callbacks=[stop])
    except (RuntimeError, MemoryError, SingularGramError, NonFiniteError):  # e.g. NaN residuals: diverged
        return None
    return stop.reached


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ttt.reexec_with(ttt.allocator_env("glibc", args.omp_wait_policy))
    ttt.preload()
    ttt.STOP_FACTOR = args.target  # read by the forked children's evaluator: stop at the target
    task = ttt.TASKS[args.task]
    spec_args = argparse.Namespace(budget_scale=1.0, memory_cap_gib=args.memory_cap_gib)
    start_load = os.getloadavg()
    train = task.data()[0] if args.count_steps else None
    probes = [(optimizer, config, threads) for optimizer, config in args.configs for threads in args.threads]
    runs: list[list[dict[str, Any]]] = [[] for _ in probes]
    for _ in range(args.rounds):
        for seed in args.seeds:
            for i, (optimizer, config, threads) in enumerate(probes):
                if args.count_steps:
                    torch.set_num_threads(threads)
                    steps = count_steps(task, train, optimizer, config, seed, args)
                    runs[i].append({"seed": seed, "seconds": None, "steps": steps})
                    continue
                spec = {**ttt.spec_for(task, optimizer, config, seed, spec_args), "threads": threads}
                run = ttt.launch(spec | ({"warm_up_steps": args.warm_up} if args.warm_up else {}))
                row = ttt.reached_at(run, args.target) or {}
                runs[i].append(
                    {
                        "seed": seed,
                        "seconds": row.get("seconds"),
                        "steps": row.get("steps"),
                        "failure": run.get("failure"),
                    }
                )
    rows = []
    for (optimizer, config, threads), results in zip(probes, runs):
        # older records have no "threads": they ran at ttt.THREADS (2)
        row: dict[str, Any] = {"optimizer": optimizer, "config": config, "threads": threads, "runs": results}
        label = f"{ttt.LABELS[optimizer]:6s} {json.dumps(config)}, {threads} thread(s)"
        if args.count_steps:
            # a run that did not reach the target counts as more steps than any that did
            median = statistics.median(math.inf if r["steps"] is None else r["steps"] for r in results)
            row["median_steps"] = None if median == math.inf else median
            shown = " ".join("-" if r["steps"] is None else str(r["steps"]) for r in results)
            print(f"{label}: median {row['median_steps']} steps; per run: {shown}")
        else:
            times = [r["seconds"] for r in results]
            row["median_seconds"] = median = statistics.median(times) if None not in times else None
            shown = " ".join(f"{r['seconds']:.3f}({r['steps']})" if r["seconds"] is not None else "-" for r in results)
            print(f"{label}: median {median if median is None else f'{median:.3f}'} s; per run s(steps): {shown}")
        rows.append(row)
    append_record(
        args.out,
        {
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "benchmarks/target_probe.py", *sys.argv[1:]]),
            "git": ttt.git_state(),
            "task": args.task,
            "target": args.target,
            "seeds": args.seeds,
            "rounds": args.rounds,
            "count_steps": args.count_steps,
            "warm_up_steps": args.warm_up,
            "omp_wait_policy": args.omp_wait_policy,
            "load_average": [start_load, os.getloadavg()],
            "configs": rows,
        },
    )


if __name__ == "__main__":
    main()
