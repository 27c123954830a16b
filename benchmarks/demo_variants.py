"""The regression demo's runs, one optimizer at a time, with hyper-parameters of your choice.

Not a test. Each variant is ``LABEL=JSON``: ``LABEL`` one of the demo's optimizers (``GGN``,
``SGD``, ``Adam``; an optional ``/tag`` after it names the row) and ``JSON`` its hyper-parameters
over the demo's specs, e.g. ``GGN/floor3={"adaptive_damping": {"name": "gain_ratio",
"check_every": 4, "min_alpha": 3}}`` (a mapping for ``adaptive_damping`` is a damping rule
with its arguments) or ``Adam={"lr": 3e-3}``. Every variant trains a copy of the demo's initial
model for ``--seconds`` of wall-clock training, exactly as ``gramnewton demo`` does
(:func:`gramnewton.lab.experiments.demo.run_demo`, ``--shift`` random translations of the
training images), one after another; run it under the CPU lock on a shared machine. Prints the
train (test) MSE at every 10 s, the demo's marks (those within ``--seconds``, also past 90 s; until
2026-12-01 at 10, 30, 50, 70 and 90 s only) and the lowest test MSE; appends every variant's
marks and its whole curve (every epoch's and every ``--mark`` seconds' evaluation: seconds, epoch,
train and test MSE) to ``benchmarks/results/demo_variants.json`` (``--out`` elsewhere) with the
load average before and after. A denser ``--mark`` lets a run be read on another clock: a GGN
whose step cost ``r`` times what it does reaches at ``T`` seconds what the run reached at
``T / r`` (docs/convergence.md, thirty-sixth session).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_variants.py --seed 0 --shift 2 'GGN={}' 'Adam={"lr": 3e-3}' \\
        'GGN/floor3={"adaptive_damping": {"name": "gain_ratio", "check_every": 4, "min_alpha": 3}}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from results_log import append_record

from gramnewton.lab.experiments.demo import DemoConfig, at_mark, run_demo
from gramnewton.lab.experiments.training import lowest_test_loss

RESULTS = Path(__file__).resolve().parent / "results" / "demo_variants.json"
MARK_EVERY = 10  # the demo's marks, every 10 s: issue 15 compares every one of them
THREADS = 2


def mark_seconds(seconds: float) -> range:
    """The demo's marks within a run of ``seconds``: every ``MARK_EVERY`` s."""
    return range(MARK_EVERY, int(seconds) + 1, MARK_EVERY)


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"GGN/tag={...}"`` -> ``("GGN/tag", "GGN", {...})``."""
    label, sep, hyper = text.partition("=")
    if not sep:
        raise ValueError(f"variant {text!r} is not LABEL=JSON")
    return label, label.partition("/")[0], json.loads(hyper)


def run_variant(config: DemoConfig, label: str, optimizer: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """One demo run of ``optimizer`` with ``hyper``: the marks' train and test MSE, the lowest test MSE."""
    load_before = os.getloadavg()
    records = run_demo(config, settings={optimizer: hyper})[optimizer]
    marks = []
    for seconds in mark_seconds(config.seconds):
        record = at_mark(records, seconds) or records[-1]  # the run's last record when it ended early
        marks.append(dict(mark=seconds, seconds=record.seconds, train=record.train_loss, test=record.test_loss))
    best = lowest_test_loss(records)
    return dict(
        label=label,
        optimizer=optimizer,
        hyper=hyper,
        seed=config.seed,
        shift=config.shift,
        seconds=config.seconds,
        epochs=max(r.epoch for r in records),
        marks=marks,
        curve=[[r.seconds, r.epoch, r.train_loss, r.test_loss] for r in records],
        lowest_test=None if best is None else dict(test=best.test_loss, seconds=best.seconds),
        load_before=load_before,
        load_after=os.getloadavg(),
        command=" ".join(sys.argv),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="LABEL=JSON, e.g. 'Adam={\"lr\": 3e-3}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=int, default=0, help="random translations of the training images (pixels)")
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument(
        "--mark", type=float, default=DemoConfig.mark, help="also evaluate every MARK training seconds (the curve)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON the records are appended to")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    variants = [parse_variant(v) for v in args.variants]
    config = DemoConfig(seed=args.seed, shift=args.shift, seconds=args.seconds, mark=args.mark)
    marks = mark_seconds(args.seconds)
    print(f"seed {args.seed}, shift {args.shift}: train (test) MSE at " + ", ".join(f"{s} s" for s in marks))
    for label, optimizer, hyper in variants:
        result = run_variant(config, label, optimizer, hyper)
        append_record(args.out, result)
        cells = " ".join(f"{m['train']:.4f} ({m['test']:.4f})" for m in result["marks"])
        best = result["lowest_test"]
        print(
            f"{label:<14} {result['epochs']:>3} epochs  {cells}  lowest test {best['test']:.4f} at {best['seconds']:.1f} s"
            f"  load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
