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
``T / r`` (docs/convergence.md, thirty-sixth session). ``--figure PNG`` draws every record of
``--out`` on ``--dataset``, ``--seed`` and ``--shift`` that has a curve: its train MSE against time, its test MSE
against time, and its test MSE against its train MSE (the path, which a cheaper step does not
change: it only moves along it faster; docs/convergence.md, thirty-seventh session), and prints
each one's test MSE where it first reached the train MSE ``--level`` (by default the lowest that
every drawn run reached). Without variants it only draws.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_variants.py --seed 0 --shift 2 'GGN={}' 'Adam={"lr": 3e-3}' \\
        'GGN/floor3={"adaptive_damping": {"name": "gain_ratio", "check_every": 4, "min_alpha": 3}}'
    python benchmarks/demo_variants.py --seed 0 --out runs.json --figure paths.png --level 0.01
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from results_log import append_record, read_records

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
        dataset=config.dataset,
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


def where_train_reaches(curve: list[list[float]], train: float) -> tuple[float, float] | None:
    """``(seconds, test MSE)`` where ``curve`` (rows ``[seconds, epoch, train, test]``) first
    reaches the train MSE ``train``, interpolated linearly in log train MSE between the rows around
    it; None if it never does."""
    for before, after in itertools.pairwise(curve):
        if after[2] <= train < before[2]:
            share = math.log(before[2] / train) / math.log(before[2] / after[2])
            return before[0] + share * (after[0] - before[0]), before[3] + share * (after[3] - before[3])
    return (curve[0][0], curve[0][3]) if curve and curve[0][2] <= train else None


def draw_paths(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """One line per record (its ``curve``): train MSE against seconds, test MSE against seconds,
    test MSE against train MSE (log axes). A record's later rows have the lower train MSE, so the
    third panel reads from right to left in time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("seconds", 0, "train", 2), ("seconds", 0, "test", 3), ("train", 2, "test", 3))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0))
    for ax, (x_name, x, y_name, y) in zip(axes, panels):
        for record in records:
            ax.plot([row[x] for row in record["curve"]], [row[y] for row in record["curve"]], label=record["label"])
        ax.set_xlabel("training time (s)" if x_name == "seconds" else "train MSE")
        ax.set_ylabel(f"{y_name} MSE")
        ax.set_yscale("log")
        if x_name == "train":
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="LABEL=JSON, e.g. 'Adam={\"lr\": 3e-3}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default=DemoConfig.dataset, help="a regression data set (the demo's by default)")
    parser.add_argument("--shift", type=int, default=0, help="random translations of the training images (pixels)")
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument(
        "--mark", type=float, default=DemoConfig.mark, help="also evaluate every MARK training seconds (the curve)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON the records are appended to")
    parser.add_argument(
        "--figure", type=Path, help="draw the curves of --out's records of --dataset, --seed and --shift here (PNG)"
    )
    parser.add_argument(
        "--level", type=float, help="with --figure: read each run at this train MSE (default: the lowest all reached)"
    )
    args = parser.parse_args()
    if not args.variants and not args.figure:
        parser.error("give a variant to run, or --figure to draw")
    torch.set_num_threads(THREADS)
    variants = [parse_variant(v) for v in args.variants]
    config = DemoConfig(dataset=args.dataset, seed=args.seed, shift=args.shift, seconds=args.seconds, mark=args.mark)
    marks = mark_seconds(args.seconds)
    if variants:
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
    if args.figure:
        records = read_records(args.out)
        wanted = (args.dataset, args.seed, args.shift)
        # records from before 2026-12-02 name no data set: the demo's
        drawn = [
            r
            for r in records
            if r.get("curve") and (r.get("dataset", DemoConfig.dataset), r["seed"], r["shift"]) == wanted
        ]
        if not drawn:
            parser.error(
                f"{args.out} has no record with a curve on {args.dataset}, seed {args.seed}, shift {args.shift}"
            )
        draw_paths(drawn, args.figure, f"{args.dataset}, seed {args.seed}, shift {args.shift}")
        print(f"wrote {args.figure} ({len(drawn)} runs)")
        # by default the lowest train MSE every run reached
        level = args.level if args.level is not None else max(min(row[2] for row in r["curve"]) for r in drawn)
        print(f"test MSE where each run first reached train MSE {level:.4f}:")
        for record in drawn:
            reached = where_train_reaches(record["curve"], level)
            reading = f"{reached[1]:.4f} at {reached[0]:.1f} s" if reached else f"not in {record['seconds']:.0f} s"
            print(f"  {record['label']:<14} {reading}")


if __name__ == "__main__":
    main()
