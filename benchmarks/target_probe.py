"""Seconds to one target: a few configurations of ``time_to_target.py``'s tasks, every seed, in its protocol.

Not a test. ``time_to_target.py`` picks each method's configuration on seed 0 and reruns it on the
other seeds, with evaluations every 10 ms early on, so a pair whose times are 0.06-0.2 s is decided
by a handful of steps, the seed-0 draw and the machine's drift between runs. This probe asks one
question at a time: for the given ``(optimizer, config)`` pairs, how long each takes to reach
``--target`` times the initial training MSE on each seed, the configurations interleaved seed by
seed and round by round (so the machine's drift falls on all of them alike). The runs are the
benchmark's own (:func:`time_to_target.launch`: a forked child per run, the same model
initialisation, batch order, evaluation schedule, allocator and ``OMP_WAIT_POLICY``), each stopped
once it reaches the target. Prints the median seconds and the steps to the target per configuration
and appends a record to ``--out``::

    python benchmarks/target_probe.py --task sinc --target 0.1 --rounds 2 --configs \\
        '[["tlm", {"batch": 1000}], ["ggn", {"batch": 100, "lam": 1.0, "momentum": 0.0, "alpha": 0.1, "adaptive_damping": false}]]'
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

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
    p.add_argument("--memory-cap-gib", type=float, default=8.0)
    p.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE", "unset"], default="unset")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.configs = json.loads(args.configs)
    for optimizer, config in args.configs:
        if optimizer not in ttt.OPTIMIZERS or "batch" not in config:
            p.error(f"each entry must be [optimizer, config with a batch]; got {[optimizer, config]}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ttt.reexec_with(ttt.allocator_env("glibc", args.omp_wait_policy))
    ttt.preload()
    ttt.STOP_FACTOR = args.target  # read by the forked children's evaluator: stop at the target
    task = ttt.TASKS[args.task]
    spec_args = argparse.Namespace(budget_scale=1.0, memory_cap_gib=args.memory_cap_gib)
    start_load = os.getloadavg()
    runs: list[list[dict[str, Any]]] = [[] for _ in args.configs]
    for _ in range(args.rounds):
        for seed in args.seeds:
            for i, (optimizer, config) in enumerate(args.configs):
                run = ttt.launch(ttt.spec_for(task, optimizer, config, seed, spec_args))
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
    for (optimizer, config), results in zip(args.configs, runs):
        times = [r["seconds"] for r in results]
        median = statistics.median(times) if None not in times else None
        rows.append({"optimizer": optimizer, "config": config, "median_seconds": median, "runs": results})
        shown = " ".join(f"{r['seconds']:.3f}({r['steps']})" if r["seconds"] is not None else "-" for r in results)
        print(
            f"{ttt.LABELS[optimizer]:6s} {json.dumps(config)}: median {median if median is None else f'{median:.3f}'} s; per run s(steps): {shown}"
        )
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
            "omp_wait_policy": args.omp_wait_policy,
            "load_average": [start_load, os.getloadavg()],
            "configs": rows,
        },
    )


if __name__ == "__main__":
    main()
