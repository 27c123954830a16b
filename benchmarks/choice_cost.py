"""One-time cost of the conv-path timing trials (``engines/choice.py``) against a GGN step.

Not a test. Steps the hooks engine (``compute`` and ``J^T v``, as in ``step_cost.py``'s
``ggn_fast``) on a fresh :data:`~gramnewton.engines.handlers.CONV_WEIGHT_PATHS` and records, per
step, its time and the seconds spent in timing trials (the first step's, and the re-check at each
layer shape's ``RECHECK_AFTER``-th use). ``torch.set_num_threads(--threads)`` (default 2); run with
``OMP_WAIT_POLICY=PASSIVE``; the load average is recorded. Results are appended to ``--out``::

    python benchmarks/choice_cost.py --models fixup32 fixup64 --steps 11
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import step_cost
import torch
from results_log import append_record

from gramnewton.engines import HooksEngine, handlers

ROOT = Path(__file__).resolve().parent.parent


def measure(model_name: str, batch: int, steps: int) -> dict:
    """Step times and trial seconds per step for a fresh choice (made in this process)."""
    choice = handlers.CONV_WEIGHT_PATHS
    choice.__init__()  # forget earlier choices: the first step times again
    model, x, y = step_cost.setup(model_name, batch)
    engine = HooksEngine(model)
    in_trials: list[float] = []
    choose = choice._choose

    def timed_choose(key: object, candidates: dict) -> str:
        trials, start = sum(choice.trials.values()), time.perf_counter()
        name = choose(key, candidates)
        if sum(choice.trials.values()) > trials:
            in_trials.append(time.perf_counter() - start)
        return name

    choice._choose = timed_choose
    step_s, trial_s = [], []
    load = os.getloadavg()
    try:
        for _ in range(steps):
            in_trials.clear()
            start = time.perf_counter()
            engine.compute(lambda: model(x).reshape(batch, -1) - y.reshape(batch, -1)).jt_times(torch.ones(batch))
            step_s.append(time.perf_counter() - start)
            trial_s.append(sum(in_trials))
    finally:
        del choice._choose  # the class's method again
    plain = statistics.median(s for s, t in zip(step_s, trial_s) if t == 0)
    return {
        "model": model_name,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(),
        "load_average": load,
        "step_s": step_s,
        "trial_s": trial_s,
        "median_step_without_trials_s": plain,
        "trials_total_s": sum(trial_s),
        "trials_over_step": sum(trial_s) / plain,
        "choices": {str(key[1:3]): name for key, name in choice.choices.items()},
        "best_s": {str(key[1:3]): best for key, best in choice.best.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["fixup32"], choices=list(step_cost.MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/choice_cost.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for model_name in args.models:
        record = measure(model_name, args.batch, args.steps)
        append_record(args.out, record)
        print(
            f"{model_name} b={args.batch} (load {record['load_average'][0]:.1f}): step {record['median_step_without_trials_s']:.3f} s, "
            f"trials {record['trials_total_s']:.3f} s in all ({record['trials_over_step']:.2f} steps) "
            f"[per step: {' '.join(f'{t:.3f}' for t in record['trial_s'])}]",
            flush=True,
        )


if __name__ == "__main__":
    main()
