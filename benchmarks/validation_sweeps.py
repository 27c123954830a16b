"""GGN and Adam, each tuned on a validation split with ``gramnewton sweep``, at equal training time.

Not a test. The protocol a user follows on a small data set: hold a fifth of the training set
out, train every grid point of each method for the same training seconds, keep each point's model
of least validation loss (``train.keep_best``), choose each method's point of least validation
loss, and only then read the test set. Grids:

- GGN on the tabular sets: the damping floor of the constructor's rule
  (``GainRatioDamping(check_every=4, min_alpha=A)``, ``A`` = 1e-8, the default, then 10 ... 1e6);
  on rotated-digits and rotated-mnist (the demo's 4,000 images) its ``lam`` (16, the default,
  then 1, 2, 4, 8), since a floor freezes a
  zero-initialised Fixup network (docs/convergence.md, fifty-fourth session) and weight decay
  only raised the test MSE (fifty-fifth session, whose records have that grid), under
  ``train.deterministic`` (the convolutions' timed path choice otherwise moves a point's result
  between runs: fifty-sixth session);
- Adam: its learning rate, 3e-4, 1e-3, 3e-3, 1e-2.

The configs are the packaged ``concrete_ggn_mlp`` / ``concrete_adam_mlp`` (a 256-256 tanh MLP,
batch 128, no weight decay, ``train.threads = 2``), with ``--set`` for diabetes and for
rotated-digits and rotated-mnist (ResNet-8-Fixup). Each (task, method, seed) is one sweep in
``<out>/<task>-<method>-<seed>``, run with ``--resume``: a rerun reads finished sweeps and trains
nothing. ``--ggn-grid`` / ``--adam-grid`` (each repeatable: one axis per flag, their Cartesian
product swept) replace a method's grid, e.g. two axes for GGN; ``--folds K`` cross-validates
each point on K validation folds (``gramnewton sweep --folds``), and the K kept models of each
method's choice are then also averaged (their mean prediction's test MSE, a cross-validation
committee); ``--refit`` then trains each
method's choice on the whole training set for its best epochs (``gramnewton sweep --refit``) and
compares the refits' test MSEs as well. Printed per (task, seed): each
method's chosen point, its validation MSE and the test MSE of that kept model, and GGN's first
point (the defaults in the default grids: the floor 1e-8, or ``lam = 16``); a record per run, with
the grids swept, is appended to ``--record``::

    python benchmarks/validation_sweeps.py --tasks concrete diabetes --seeds 0 1 2
    python benchmarks/validation_sweeps.py --tasks rotated-digits --seeds 0 1 2
    python benchmarks/validation_sweeps.py --tasks rotated-mnist --folds 5 --out sweeps-rm \
        --ggn-grid 'optimizer.lam=[16, 4, 1]' --adam-grid 'optimizer.lr=[1e-3, 3e-3, 1e-2]'
    python benchmarks/validation_sweeps.py --tasks concrete --out sweeps-lam \
        --ggn-grid 'optimizer.lam=[16, 4, 1]' --ggn-grid 'optimizer.adaptive_damping.min_alpha=[1e-8, 100, 1000]'
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.runner import METRICS_FILE
from gramnewton.lab.experiments.sweep import REFIT_FOLDER, SUMMARY_FILE, chosen_runs, fold_ensemble_test

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_log import append_record  # noqa: E402

RECORD = Path(__file__).resolve().parent / "results" / "validation_sweeps.json"
FLOORS = "optimizer.adaptive_damping.min_alpha=[1e-8, 10, 100, 1000, 1e4, 1e5, 1e6]"
LAMS = "optimizer.lam=[16, 1, 2, 4, 8]"
RATES = "optimizer.lr=[3e-4, 1e-3, 3e-3, 1e-2]"
RESNET = ["model.name=resnet8_fixup", "model.kwargs={}"]
# task -> (the overrides of both packaged configs, GGN's grid, GGN's own overrides)
TASKS: dict[str, tuple[list[str], str, list[str]]] = {
    "concrete": ([], FLOORS, []),
    "diabetes": (["data.name=diabetes"], FLOORS, []),
    "rotated-digits": (["data.name=rotated-digits", *RESNET], LAMS, ["train.deterministic=true"]),
    "rotated-mnist": (["data.name=rotated-mnist", *RESNET], LAMS, ["train.deterministic=true"]),
}
METHODS = {"ggn": "concrete_ggn_mlp", "adam": "concrete_adam_mlp"}


def grids(task: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """Each method's grid axes (``KEY=[V1, ...]``) on ``task``: the flags' where given."""
    return {"ggn": args.ggn_grid or [TASKS[task][1]], "adam": args.adam_grid or [RATES]}


def sweep_folder(task: str, method: str, seed: int, args: argparse.Namespace) -> Path:
    """The folder of one (task, method, seed) sweep."""
    return args.out / f"{task}-{method}-{seed}"


def sweep(task: str, method: str, seed: int, axes: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or, when finished, read) one sweep over ``axes``; its ``sweep.csv`` rows."""
    sets, _, ggn_sets = TASKS[task]
    out = sweep_folder(task, method, seed, args)
    overrides = [*sets, *(ggn_sets if method == "ggn" else []), f"seed={seed}", f"train.seconds={args.seconds:.1f}"]
    command = [sys.executable, "-m", "gramnewton", "sweep", METHODS[method], "--out", str(out), "--resume"]
    command += [*(f"--grid={axis}" for axis in axes), *(f"--set={s}" for s in overrides), f"--folds={args.folds}"]
    command += ["--refit"] if args.refit else []
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return read_rows(out / SUMMARY_FILE)


def first_fold_choice(folder: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row (its numbers the folds' means) of the sweep in ``folder`` that fold 0 alone, the
    plain split, would choose: least lowest validation loss of ``<point>/fold-0``."""

    def fold_zero(row: dict[str, Any]) -> float:
        losses = [r["val_loss"] for r in read_rows(folder / row["point"] / "fold-0" / METRICS_FILE)]
        return min((v for v in losses if math.isfinite(v)), default=math.inf)

    return min(rows, key=fold_zero)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["concrete", "diabetes"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=30.0, help="training seconds per grid point")
    p.add_argument("--out", type=Path, default=Path("sweeps"), help="folder of the sweeps")
    p.add_argument("--record", type=Path, default=RECORD)
    p.add_argument("--folds", type=int, default=1, help="validation folds per point (gramnewton sweep --folds)")
    p.add_argument("--refit", action="store_true", help="refit each choice on all training rows (sweep --refit)")
    axis = dict(action="append", metavar="KEY=[V1, ...]")
    p.add_argument("--ggn-grid", **axis, help="an axis of GGN's grid instead of the task's (repeat for more axes)")
    p.add_argument("--adam-grid", **axis, help="an axis of Adam's grid instead of its learning rates (repeat for more)")
    args = p.parse_args(argv)
    for task in args.tasks:
        # GGN / Adam test: chosen on the folds' mean; on fold 0 alone; the folds' models averaged; refit
        ratios, single, ensembles, refits = [], [], [], []
        axes = grids(task, args)
        for seed in args.seeds:
            rows = {method: sweep(task, method, seed, axes[method], args) for method in METHODS}
            chosen = {method: next(r for r in rows[method] if r["chosen"]) for method in METHODS}
            first = rows["ggn"][0]
            ratios.append(chosen["ggn"]["test_loss"] / chosen["adam"]["test_loss"])
            for method in METHODS:
                c = chosen[method]
                print(
                    f"{task} seed {seed} {method:4} chosen {c['point']:28} val {c['val_loss']:.4f} "
                    f"test {c['test_loss']:.4f}, kept at {c['best_seconds']:.2f} s (at {args.seconds:g} s "
                    f"{c['last_test_loss']:.4f})"
                )
            print(
                f"{task} seed {seed} ggn  first {first['point']:29} val {first['val_loss']:.4f} "
                f"test {first['test_loss']:.4f}; chosen GGN / chosen Adam test {ratios[-1]:.2f}",
                flush=True,
            )
            if args.folds > 1:  # what the plain split would have chosen, judged by the folds' mean test
                alone = {m: first_fold_choice(sweep_folder(task, m, seed, args), rows[m]) for m in METHODS}
                single.append(alone["ggn"]["test_loss"] / alone["adam"]["test_loss"])
                print(
                    f"{task} seed {seed} fold 0 alone: "
                    + ", ".join(
                        f"{method} {c['point']} (folds' mean test {c['test_loss']:.4f})" for method, c in alone.items()
                    )
                    + f"; GGN / Adam test {single[-1]:.2f}",
                    flush=True,
                )
            ensemble = {}
            if args.folds > 1:  # the chosen point's fold models, their predictions averaged
                for method in METHODS:
                    ensemble[method] = fold_ensemble_test(chosen_runs(sweep_folder(task, method, seed, args)))[0]
                ensembles.append(ensemble["ggn"] / ensemble["adam"])
                print(
                    f"{task} seed {seed} the {args.folds} fold models averaged: "
                    + ", ".join(f"{m} test {v:.4f}" for m, v in ensemble.items())
                    + f"; GGN / Adam test {ensembles[-1]:.2f}",
                    flush=True,
                )
            refit = {}
            if args.refit:  # each choice trained on every training row: its test MSE at its last epoch
                for method in METHODS:
                    last = read_rows(sweep_folder(task, method, seed, args) / REFIT_FOLDER / METRICS_FILE)[-1]
                    refit[method] = {
                        "epochs": last["epoch"],
                        "seconds": last["seconds"],
                        "test_loss": last["test_loss"],
                    }
                refits.append(refit["ggn"]["test_loss"] / refit["adam"]["test_loss"])
                print(
                    f"{task} seed {seed} refit on all training rows: "
                    + ", ".join(f"{m} test {r['test_loss']:.4f} ({r['epochs']:g} epochs)" for m, r in refit.items())
                    + f"; GGN / Adam test {refits[-1]:.2f}",
                    flush=True,
                )
            append_record(
                args.record,
                {
                    "date": datetime.datetime.now(datetime.UTC).isoformat(),
                    "command": " ".join(["benchmarks/validation_sweeps.py", *(argv or sys.argv[1:])]),
                    "task": task,
                    "seed": seed,
                    "seconds": args.seconds,
                    "grids": axes,
                    "folds": args.folds,
                    "sweeps": rows,
                    "ensemble": ensemble,
                    "refit": refit,
                },
            )
        print(f"{task}: chosen GGN / chosen Adam test MSE, median over seeds {statistics.median(ratios):.2f}")
        if single:
            print(f"{task}: the same, each chosen on fold 0 alone, median {statistics.median(single):.2f}")
        if ensembles:
            print(f"{task}: the same, each choice's fold models averaged, median {statistics.median(ensembles):.2f}")
        if refits:
            print(f"{task}: the same, each choice refit on all training rows, median {statistics.median(refits):.2f}")


if __name__ == "__main__":
    main()
