"""What a classifier's fold ensemble should average: its members' logits or their probabilities.

Not a test. Reads finished ``gramnewton sweep --folds K`` folders (``train.keep_best`` on) and,
for each sweep's chosen point, evaluates its K kept models on the test split three ways: the
folds' mean (each model alone, the ``sweep.csv`` row), their outputs averaged
(``FoldEnsemble(average="outputs")``: logits) and their softmax probabilities averaged
(``average="probabilities"``; a classifier's only, a regression's predictions are averaged
as they are). Prints each one's test loss (and accuracy for a classifier) and
appends a record per sweep to ``--record``. Evaluation only: nothing is trained here, so the
two averages are compared on the same models. The sweeps of the fifty-ninth session
(docs/convergence.md), each with ``S`` in 0 1 2::

    gramnewton sweep digits_ggn_fixup --folds 5 --out sweeps/digits-ggn-S --grid 'optimizer.lam=[16, 8]' \\
        --set seed=S --set data.validation_fraction=0.2 --set train.keep_best=true \\
        --set train.epochs=100000 --set train.seconds=10
    gramnewton sweep mnist_adam_fixup --folds 5 --out sweeps/digits-adam-S --grid 'optimizer.lr=[1e-3, 1e-2]' \\
        --set data.name=digits --set train.label_smoothing=0 --set train.shift=0 \\
        --set seed=S --set data.validation_fraction=0.2 --set train.keep_best=true \\
        --set train.epochs=100000 --set train.seconds=10
    python benchmarks/fold_ensembles.py sweeps/digits-*
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.predictions import ENSEMBLE_AVERAGES
from gramnewton.lab.experiments.sweep import SUMMARY_FILE, chosen_runs, fold_ensemble_test

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_log import append_record  # noqa: E402

RECORD = Path(__file__).resolve().parent / "results" / "fold_ensembles.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", type=Path, nargs="+", help="finished gramnewton sweep --folds folders")
    p.add_argument("--record", type=Path, default=RECORD)
    args = p.parse_args(argv)
    torch.set_num_threads(2)  # the machine's two cores; evaluation only, no timing
    for sweep in args.sweeps:
        chosen = next(row for row in read_rows(sweep / SUMMARY_FILE) if row["chosen"])
        runs = chosen_runs(sweep)
        results = {"folds' mean": (chosen["test_loss"], chosen.get("test_accuracy", float("nan")))}
        averages = ENSEMBLE_AVERAGES if "test_accuracy" in chosen else ("outputs",)  # a regression: predictions
        results |= {average: fold_ensemble_test(runs, average) for average in averages}
        for name, (loss, accuracy) in results.items():
            print(
                f"{sweep} {chosen['point']} {len(runs)} folds, {name:12}: test loss {loss:.4f}, accuracy {accuracy:.4f}"
            )
        append_record(
            args.record,
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "command": " ".join(["benchmarks/fold_ensembles.py", *(argv or sys.argv[1:])]),
                "sweep": str(sweep),
                "point": chosen["point"],
                "folds": len(runs),
                "test": {name: {"loss": loss, "accuracy": accuracy} for name, (loss, accuracy) in results.items()},
            },
        )


if __name__ == "__main__":
    main()
