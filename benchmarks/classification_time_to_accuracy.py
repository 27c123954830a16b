"""Time to test accuracy on a classification data set: GGN (cross-entropy) vs SGD, Adam, K-FAC.

Not a test. Two phases, every run through the demo's training loop
(:func:`gramnewton.lab.experiments.demo.run_demo`: same initialisation and batches per seed,
a budget of training seconds, evaluation after every epoch, evaluation time not counted):

1. grid: every point of :data:`~gramnewton.lab.experiments.demo.CLASSIFY_GRID`, or of ``--grid``
   (JSON: optimizer -> axes, or a list of such grids for a set that is not one product), of the
   ``--optimizers`` named, on seed 0 for ``--grid-seconds``; the winner of each optimizer is the point with the highest final test
   accuracy (ties: the sooner one to the highest accuracy target reached; a point that diverges
   is recorded with the message, ``"diverged"``, and loses, and the grid goes on). ``--settings-from
   RESULT.json`` skips it and takes the winners of an earlier run (e.g. mnist from digits);
2. the winners (of the ``--optimizers`` named) on ``--seeds`` (default 0 1 2) for ``--seconds``
   each, the optimizers of a seed one after the other in this process. ``--grid-only`` stops
   after the grid.

Generalisation levers (the same for every optimizer of a run): ``--label-smoothing EPS`` and
``--shift S`` (random translations of the training images by up to ``S`` pixels); a point of a grid
or a winner may also carry ``"label_smoothing"``, ``"shift"`` and ``"batch_size"`` among its
hyper-parameters, which then override the flags for that optimizer (so one grid can compare the
levers and batch sizes).

Only the test split is evaluated after every epoch (``DemoConfig.evaluate_train=False``: the
train split would cost four times as much evaluation time, outside the training seconds).

Output: ``--out`` (default ``benchmarks/results/classification_<dataset>.json``: every curve, the
load average before and after every run) and ``docs/figures/classification_<dataset>.png`` (test
accuracy against training seconds and epochs); the summary table is printed as markdown.
``--combine A.json B.json ...`` merges the seeds of separate runs (e.g. one seed per command, to
keep each under the shared machine's 10-minute limit) into ``--out`` and redraws the figure (``--figure``); a
grid run with ``--grid-seconds`` equal to ``--seconds`` supplies its winners' seed-0 runs; it also
prints every grid point of the merged runs.

Usage::

    python benchmarks/classification_time_to_accuracy.py --dataset digits --grid-seconds 20 --seconds 30
    python benchmarks/classification_time_to_accuracy.py --dataset mnist --seconds 90 \
        --settings-from benchmarks/results/classification_digits.json
    python benchmarks/classification_time_to_accuracy.py --dataset mnist --grid-only --grid-seconds 30 \
        --optimizers SGD --grid '{"SGD": {"lr": [0.003, 0.01]}}' --out /tmp/sgd.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gramnewton.lab.experiments.demo import CLASSIFY_GRID, DemoConfig, DivergedRunWarning, run_demo, sweep_points
from gramnewton.lab.experiments.training import EpochRecord, seconds_to_accuracy

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (0.90, 0.95, 0.97, 0.98)
# settings of the data and the targets, not of the optimizer: DemoConfig fields a point may set
LEVERS = ("label_smoothing", "shift")
# DemoConfig fields a point may set: the levers and the batch size (recorded with the levers when
# a point sets it, so its runs are rows of their own in a combined record)
POINT_FIELDS = (*LEVERS, "batch_size")


def summary(records: list[EpochRecord]) -> dict[str, Any]:
    last = records[-1]
    return {
        "final_test_accuracy": last.test_accuracy,  # NaN for a run that diverged
        "best_test_accuracy": max(
            (r.test_accuracy for r in records if r.test_accuracy == r.test_accuracy), default=0.0
        ),
        "final_test_loss": last.test_loss,
        "epochs": last.epoch,
        "seconds": last.seconds,
        "seconds_to": {f"{t:.2f}": seconds_to_accuracy(records, t) for t in TARGETS},
    }


def seconds_to(entry: dict[str, Any], target: float) -> float | None:
    """Training seconds of ``entry``'s first evaluation at or above ``target``, read from its curve
    (so a result recorded with fewer :data:`TARGETS` still answers for every target)."""
    return next((r["seconds"] for r in entry["curve"] if r["test_accuracy"] >= target), None)


def run(config: DemoConfig, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Train each optimizer of ``settings`` under ``config`` (its :data:`POINT_FIELDS` keys set the
    config's fields for that optimizer); curves, summaries and the load (of the whole, and of each
    optimizer's run)."""
    load_before = os.getloadavg()
    result: dict[str, Any] = {}
    for name, hp in settings.items():
        levers = {k: v for k, v in hp.items() if k in POINT_FIELDS}
        before = os.getloadavg()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DivergedRunWarning)
            (records,) = run_demo(
                dataclasses.replace(config, **levers), {name: {k: v for k, v in hp.items() if k not in POINT_FIELDS}}
            ).values()
        diverged = [str(w.message) for w in caught if issubclass(w.category, DivergedRunWarning)]
        if diverged:
            print(f"{name} {hp}: {diverged[0]}", flush=True)
        result[name] = {
            "hyper_parameters": hp,
            "diverged": diverged[0] if diverged else None,
            "levers": {k: getattr(config, k) for k in LEVERS} | levers,
            "curve": [dataclasses.asdict(r) for r in records],
            **summary(records),
            "load": {"before": before, "after": os.getloadavg()},
        }
    return result | {"_load": {"before": load_before, "after": os.getloadavg()}}


def winner_key(result: dict[str, Any]) -> tuple:
    """Final test accuracy (a diverged run's NaN: last), then the highest target reached, then
    the sooner to it."""
    reached = [t for t in TARGETS if seconds_to(result, t) is not None]
    top = max(reached, default=0.0)
    final = result["final_test_accuracy"]
    return (final if final == final else -math.inf, top, -(seconds_to(result, top) if reached else 0.0))


def label(name: str, entry: dict[str, Any]) -> str:
    """``name`` with the levers ``entry`` ran with (those not at 0) in brackets: in a combined
    record the runs of one optimizer with other levers are other rows and lines."""
    levers = {k: v for k, v in entry.get("levers", {}).items() if v}
    return f"{name} ({', '.join(f'{k}={v}' for k, v in levers.items())})" if levers else name


def best_points(
    points: list[dict[str, Any]], key: Callable[[dict[str, Any]], str] = lambda p: p["optimizer"]
) -> dict[str, dict[str, Any]]:
    """The winning hyper-parameters among grid ``points`` (:func:`winner_key`) of each optimizer
    (or of each ``key``)."""
    best: dict[str, dict[str, Any]] = {}
    for entry in points:
        name = key(entry)
        if name not in best or winner_key(entry) > winner_key(best[name]):
            best[name] = entry
    return {name: entry["hyper_parameters"] for name, entry in best.items()}


def demo_config(args: argparse.Namespace, seconds: float, seed: int) -> DemoConfig:
    return DemoConfig(
        args.dataset,
        args.model,
        args.batch_size,
        seconds,
        1000,
        seed,
        task="classification",
        evaluate_train=False,
        label_smoothing=args.label_smoothing,
        shift=args.shift,
    )


def grid_points(spec: dict[str, Any] | list[dict[str, Any]], optimizers: list[str]) -> list[tuple[str, dict]]:
    """The points of a grid (optimizer -> axes) or of a list of grids, for ``optimizers`` only."""
    grids = spec if isinstance(spec, list) else [spec]
    return [(n, hp) for g in grids for n, hp in sweep_points(g) if n in optimizers]


def grid(args: argparse.Namespace, points: list[dict[str, Any]], save: Callable[[], None]) -> dict[str, dict[str, Any]]:
    """Run the grid, appending each point to ``points`` and calling ``save`` after it; the winners."""
    for name, hp in grid_points(args.grid, args.optimizers):
        result = run(demo_config(args, args.grid_seconds, 0), {name: hp})
        entry = {"optimizer": name, **result[name]}
        points.append(entry)
        save()
        print(f"grid {name} {hp}: final test accuracy {entry['final_test_accuracy']:.4f}", flush=True)
    return best_points(points)


def describe(entry: dict[str, Any]) -> str:
    """A run's hyper-parameters and the levers it ran with (those not at 0; runs recorded before
    the levers existed had none)."""
    levers = {k: v for k, v in entry.get("levers", {}).items() if v and k not in entry["hyper_parameters"]}
    return ", ".join(f"{k}={v}" for k, v in (entry["hyper_parameters"] | levers).items())


def header(columns: list[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def table(seeds: dict[int, dict[str, Any]]) -> str:
    """Markdown summary over the seeds each optimizer ran (medians; the count of seeds)."""
    names = list(dict.fromkeys(n for r in seeds.values() for n in r if not n.startswith("_")))
    lines = header(
        [
            "optimizer",
            "hyper-parameters",
            "seeds",
            "final test acc. (median, min-max)",
            "final test CE (median)",
            "epochs",
        ]
        + [f"s to {t:.0%} (median; seeds reached)" for t in TARGETS]
    )
    for name in names:
        runs = [seeds[s][name] for s in seeds if name in seeds[s]]
        accs = [a for r in runs if (a := r["final_test_accuracy"]) == a] or [math.nan]  # diverged: NaN
        cells = []
        for t in TARGETS:
            hits = [seconds_to(r, t) for r in runs]
            got = [h for h in hits if h is not None]
            cells.append(f"{statistics.median(got):.1f} ({len(got)}/{len(hits)})" if got else f"- (0/{len(hits)})")
        hp = describe(runs[0])
        loss = statistics.median([x for r in runs if (x := r["final_test_loss"]) == x] or [math.nan])
        epochs = "/".join(str(r["epochs"]) for r in runs)
        diverged = sum(bool(r.get("diverged")) for r in runs)
        lines.append(
            f"| {name} | {hp} | {len(runs)}{f' ({diverged} diverged)' if diverged else ''} | "
            f"{statistics.median(accs):.2%} ({min(accs):.2%}-{max(accs):.2%}) | "
            f"{loss:.3f} | {epochs} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def grid_table(records: list[dict[str, Any]]) -> str:
    """Markdown: every grid point of ``records`` (seed 0) with its budget and outcome."""
    lines = header(
        ["optimizer", "hyper-parameters", "s of training", "final test acc.", "final test CE", "epochs"]
        + [f"s to {t:.0%}" for t in TARGETS]
    )
    for record in records:
        for p in record["grid"]:
            hp = describe(p)
            hits = [seconds_to(p, t) for t in TARGETS]
            lines.append(
                f"| {p['optimizer']} | {hp} | {record['setting']['grid_seconds']:g} | "
                f"{'diverged' if p.get('diverged') else format(p['final_test_accuracy'], '.1%')} | "
                f"{p['final_test_loss']:.3f} | {p['epochs']} | "
                + " | ".join("-" if h is None else f"{h:.1f}" for h in hits)
                + " |"
            )
    return "\n".join(lines)


def figure(seeds: dict[int, dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against training seconds (all of it, and zoomed on 85-100%, where the targets
    are) and against epochs; one line per optimizer and seed, one colour per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    panels = (
        ("seconds", "training seconds", 0.0),
        ("seconds", "training seconds (zoom)", 0.85),
        ("epoch", "epoch", 0.0),
    )
    colors: dict[str, Any] = {}
    for seed, result in seeds.items():
        for name, entry in result.items():
            if name.startswith("_"):
                continue
            curve = entry["curve"]
            for ax, (x, _, _) in zip(axes, panels):
                (line,) = ax.plot(
                    [r[x] for r in curve],
                    [r["test_accuracy"] for r in curve],
                    marker=".",
                    color=colors.get(name),
                    label=name if seed == min(seeds) else None,
                    alpha=0.8,
                )
                colors.setdefault(name, line.get_color())
    for ax, (_, label, low) in zip(axes, panels):
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(low, 1.0)
        for t in TARGETS:
            ax.axhline(t, color="gray", lw=0.5, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def measure(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The grid (unless ``--settings-from``) and the winners' seeds; the result record, also
    written to ``out`` after every grid point and seed (a run stopped early keeps what it did)."""
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "finished": None,
        "setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "grid": [],
        "winners": {},
        "seeds": {},
    }

    def save() -> None:
        out.write_text(json.dumps(record, indent=1) + "\n")

    if args.settings_from is None:
        record["winners"] = grid(args, record["grid"], save)
    else:
        record["winners"] = json.loads(args.settings_from.read_text())["winners"]
    print("winners:", record["winners"], flush=True)
    chosen = {n: hp for n, hp in record["winners"].items() if n in args.optimizers}
    seeds = {}
    for seed in [] if args.grid_only else args.seeds:
        seeds[seed] = record["seeds"][str(seed)] = run(demo_config(args, args.seconds, seed), chosen)
        save()
        print(f"seed {seed} done, load {seeds[seed]['_load']}", flush=True)
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save()
    return record, seeds


def combine(records: list[dict[str, Any]], sources: list[str], seconds: float) -> dict[str, Any]:
    """One record from several runs: their grids and seeds (merged per optimizer and levers,
    :func:`label`); the winners are the best points of all grids together, per optimizer and
    levers, overridden by the settings of runs without a grid.

    A grid ran on seed 0 with the seeds phase's setting, one optimizer per :func:`run`, so each
    winner's point of a grid run for ``seconds`` is that optimizer's seed-0 run; it fills seed 0
    where no record has one.
    """
    seeds: dict[str, Any] = {}
    points = [point for r in records for point in r["grid"]]
    # the grids compete together (a grid stopped early has no winners yet)
    winners = best_points(points, key=lambda p: label(p["optimizer"], p))
    for record in records:
        for seed, result in record["seeds"].items():
            runs = {n if n.startswith("_") else label(n, e): e for n, e in result.items()}
            seeds.setdefault(seed, {}).update(runs)
            if not record["grid"]:  # settings taken from elsewhere (--settings-from)
                winners.update({n: e["hyper_parameters"] for n, e in runs.items() if not n.startswith("_")})
    budget = [point for r in records if r["setting"]["grid_seconds"] == seconds for point in r["grid"]]
    from_grid = {
        label(p["optimizer"], p): {k: v for k, v in p.items() if k not in ("optimizer", "load")}
        for p in budget
        if p["hyper_parameters"] == winners.get(label(p["optimizer"], p))
    }
    for name, entry in from_grid.items():
        seed0 = seeds.setdefault("0", {})
        if name not in seed0:
            seed0[name] = {**entry, "from_grid": True}
    return {
        "combined_from": sources,
        "runs": [{k: r[k] for k in ("started", "finished", "setting", "threads")} for r in records],
        "grid": points,
        "winners": winners,
        "seeds": dict(sorted(seeds.items())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="resnet8_fixup")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--grid-seconds", type=float, default=40.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="every optimizer's, unless a point sets it")
    parser.add_argument("--shift", type=int, default=0, help="random translations of up to this many pixels")
    parser.add_argument("--settings-from", type=Path, default=None, help="winners of this result JSON; no grid")
    parser.add_argument("--optimizers", nargs="+", default=list(CLASSIFY_GRID), help="grid and train only these")
    parser.add_argument("--grid", type=json.loads, default=CLASSIFY_GRID, help="JSON grid (default: CLASSIFY_GRID)")
    parser.add_argument("--grid-only", action="store_true", help="run the grid and record its winners, no seeds")
    parser.add_argument(
        "--out", type=Path, default=None, help="result JSON (default: results/classification_<dataset>.json)"
    )
    parser.add_argument(
        "--figure", type=Path, default=None, help="figure PNG (default: docs/figures/classification_<dataset>.png)"
    )
    parser.add_argument("--combine", type=Path, nargs="+", default=None, help="merge these result JSONs' seeds")
    parser.add_argument("--grid-figure", type=Path, default=None, help="with --combine: every grid point's curve")
    parser.add_argument(
        "--labels", nargs="+", default=None, help="with --combine: the table and figure show only these"
    )
    args = parser.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"classification_{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.combine:
        records = [json.loads(p.read_text()) for p in args.combine]
        record = combine(records, [str(p) for p in args.combine], args.seconds)
        print(grid_table(records))
        if args.grid_figure:
            curves = {f"{p['optimizer']}: {describe(p)}": p for p in record["grid"]}
            figure({0: curves}, args.grid_figure, f"{args.model} on {args.dataset}: grid points, seed 0")
        seeds = {int(s): r for s, r in record["seeds"].items()}
        if args.labels:
            seeds = {s: {n: e for n, e in r.items() if n in args.labels} for s, r in seeds.items()}
        out.write_text(json.dumps(record, indent=1) + "\n")
    else:
        record, seeds = measure(args, out)
    if not seeds:
        return
    figure(
        seeds,
        args.figure or ROOT / "docs" / "figures" / f"classification_{args.dataset}.png",
        f"{args.model} on {args.dataset} (standardised): test accuracy, {args.seconds:g} s per run, seeds {sorted(seeds)}",
    )
    print(table(seeds))


if __name__ == "__main__":
    main()
