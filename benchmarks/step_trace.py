"""One GGN variant traced step by step: every step's diagnostics, the test metric every few steps.

Not a test. The variant is a ``ggn:...`` spec of ``benchmarks/convergence_race.py`` (its task,
initialisation, batches, ``--label-smoothing`` and ``--shift`` as there), trained alone for
``--steps`` steps (2 threads; run with ``OMP_WAIT_POLICY=PASSIVE``). After each step it records
``opt.last_diagnostics`` (:class:`~gramnewton.diagnostics.StepDiagnostics`: the batch loss
before and after, the predicted decrease, gain ratio, ``alpha``, the solve's jitter, ``||phi||``,
rejection, retries), whether the damping rule trusts the linearisation after it, and the step's
process CPU time; every ``--every`` steps the test metric (classification: cross-entropy and
accuracy; regression: the train and test MSE). Made to find where a run goes wrong (the
thirty-third session's mnist collapse, docs/classification.md): the race's marks say when, this
says which step and why.

A run's steps are one draw: the engine picks some per-layer paths by a timing trial, so two runs
of one spec may round differently and part after a few hundred steps; compare variants over seeds.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_trace.py "ggn:damping=gain_ratio,check_every=4,retries=1" \\
        --task mnist --steps 300 --seed 1

Results are appended to ``benchmarks/results/step_trace.json`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from convergence_race import TASKS, THREADS, build, task_setup
from results_log import append_record

from gramnewton import GramGaussNewton
from gramnewton.lab.experiments.training import (
    augment_generator,
    batch_order,
    evaluate,
    make_train_step,
    mean_squared_error,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "step_trace.json"


def trace(
    spec: str, task: str, steps: int, every: int, batch: int, seed: int, label_smoothing: float, shift: int
) -> dict[str, Any]:
    """Train ``spec`` alone for ``steps`` steps; the per-step rows (see the module docstring)."""
    train, test, loss_name, augment, model = task_setup(task, seed, shift)
    opt = build(spec, model, loss_name)
    if not isinstance(opt, GramGaussNewton):
        raise SystemExit(f"step_trace.py traces one GramGaussNewton, got {spec!r}")
    model.train()
    train_step = make_train_step(model, opt, loss_name, label_smoothing)
    rows: list[dict[str, Any]] = []
    queue: list = []
    epoch = in_epoch = 0
    for t in range(steps):
        if not queue:
            epoch, in_epoch = epoch + 1, 0
            queue = batch_order(len(train), batch, seed, epoch)
        x, y = train[queue.pop(0)]
        if augment is not None:  # the race's shifts: the generator of (seed, epoch, batch)
            x = augment(x, augment_generator(seed, epoch, in_epoch))
        in_epoch += 1
        start = time.process_time()
        loss = float(train_step(x, y))
        row = dict(step=t, epoch=epoch, cpu_seconds=time.process_time() - start, loss=loss)
        row.update(asdict(opt.last_diagnostics), trusted=getattr(opt.damping, "trusted", None))
        if (t + 1) % every == 0 or not math.isfinite(loss):
            if loss_name == "mse":
                row.update(train_mse=mean_squared_error(model, train), test_mse=mean_squared_error(model, test))
            else:
                row["test"], row["test_accuracy"] = evaluate(model, test, loss_name)
        rows.append(row)
        if not math.isfinite(loss):
            break
    return dict(
        command=" ".join(sys.argv),
        spec=spec,
        task=task,
        batch=batch,
        seed=seed,
        label_smoothing=label_smoothing,
        shift=shift,
        threads=THREADS,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        rows=rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--task", default="mnist", choices=sorted(TASKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10, help="evaluate the test metric every this many steps")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--shift", type=int, default=0, help="random translations of the training images (pixels)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    record = trace(
        args.spec, args.task, args.steps, args.every, args.batch, args.seed, args.label_smoothing, args.shift
    )
    append_record(args.out, record)
    rows = record["rows"]
    evaluated = [r for r in rows if "test_accuracy" in r or "test_mse" in r]
    metric = "test_accuracy" if evaluated and "test_accuracy" in evaluated[0] else "test_mse"
    print(
        f"{args.spec}, {args.task}, seed {args.seed}: {len(rows)} steps, {sum(r['cpu_seconds'] for r in rows):.1f} CPU s"
    )
    print(
        f"measured {sum(r['gain_ratio'] is not None for r in rows)}, rejected {sum(r['rejected'] for r in rows)}, "
        f"retries {sum(r['retries'] for r in rows)}, solves with jitter {sum(r['jitter'] > 0 for r in rows)}"
    )
    if evaluated:
        tail = [r[metric] for r in evaluated[-10:]]
        worst = (min if metric == "test_accuracy" else max)(r[metric] for r in evaluated[len(evaluated) // 3 :])
        print(
            f"{metric}: last {evaluated[-1][metric]:.4f}, mean of the last {len(tail)} {sum(tail) / len(tail):.4f}, "
            f"worst after the first third {worst:.4f}"
        )


if __name__ == "__main__":
    main()
