"""A damping floor chosen on a validation split, on the small regression sets.

Not a test. The shipped defaults interpolate a set of a few hundred rows; a floor under the damping
rule (``GainRatioDamping(check_every=4, min_alpha=A)``) is a ridge on every step's kernel
regression, and its best size is the task's (docs/convergence.md, fifty-fourth session). This
script checks the recipe a user would follow (as ``gramnewton train`` can, with
``data.validation_fraction = 0.2`` and an ``[optimizer.adaptive_damping]`` table with ``min_alpha``):
per seed, the lab's seeded validation split holds out a fifth of the training rows; ``GramGaussNewton(model)`` and the
same with each floor of ``--floors`` train ``--epochs`` epochs of batch ``--batch`` on the rest
(the task's model of ``convergence_race.py``; the lab's one training loop, so the same
initialisation and batches for every variant); then the training, validation and test MSE. The
floor of least validation MSE is the pick, printed beside the test set's best and the defaults.
Epochs, not seconds: a floor changes what a step does, hardly what it costs.
``torch.set_num_threads(--threads)`` (default 2); a record per run appended to ``--out``::

    python benchmarks/damping_floor.py --task concrete --epochs 300
    python benchmarks/damping_floor.py --task diabetes --epochs 600   # a third of concrete's rows: as many steps
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gramnewton.lab.data import get_dataset
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.setup import subset, validation_split
from gramnewton.lab.experiments.training import fit, make_train_step, mean_squared_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence_race import TASKS  # noqa: E402
from results_log import append_record  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "damping_floor.json"
DEFAULT_FLOORS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
VALIDATION_FRACTION = 0.2


def variant(floor: float | None) -> dict[str, Any]:
    """The optimizer spec: the constructor's defaults, or their rule with a floor ``floor``."""
    if floor is None:
        return {"name": "ggn"}
    return {"name": "ggn", "adaptive_damping": {"name": "gain_ratio", "check_every": 4, "min_alpha": floor}}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every variant on one seed's split; the record of the seed."""
    dataset, make = TASKS[args.task]
    train, test = get_dataset(dataset, split="train"), get_dataset(dataset, split="test")
    fit_index, validation_index = validation_split(len(train), VALIDATION_FRACTION, seed)
    fit_rows, validation = subset(train, fit_index), subset(train, validation_index)
    splits: dict[str, Dataset] = {"train": fit_rows, "validation": validation, "test": test}
    variants = []
    for floor in (None, *args.floors):
        torch.manual_seed(seed)
        model = make(fit_rows[0][0].shape[0])
        step = make_train_step(model, build_optimizer(variant(floor), model))
        fit(step, fit_rows, batch_size=args.batch, seed=seed, epochs=args.epochs)
        variants.append({"floor": floor, **{name: mean_squared_error(model, data) for name, data in splits.items()}})
    pick = min(variants, key=lambda v: v["validation"])
    best = min(variants, key=lambda v: v["test"])
    return {"seed": seed, "variants": variants, "pick": pick["floor"], "test_best": best["floor"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["concrete", "diabetes"], required=True)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--floors", type=float, nargs="+", default=list(DEFAULT_FLOORS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        record = run_seed(args, seed)
        for v in record["variants"]:
            name = "defaults" if v["floor"] is None else f"floor {v['floor']:g}"
            print(
                f"{args.task} seed {seed} {name:12} train {v['train']:.4f} validation {v['validation']:.4f} "
                f"test {v['test']:.4f}"
            )
        by_floor = {v["floor"]: v for v in record["variants"]}
        print(
            f"  validation picks {record['pick']} (test {by_floor[record['pick']]['test']:.4f}); the test set's best "
            f"{record['test_best']} ({by_floor[record['test_best']]['test']:.4f}); "
            f"the defaults' test {by_floor[None]['test']:.4f}",
            flush=True,
        )
        append_record(
            args.out,
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "command": " ".join(["benchmarks/damping_floor.py", *(argv if argv is not None else sys.argv[1:])]),
                "task": args.task,
                "epochs": args.epochs,
                "batch": args.batch,
                "threads": args.threads,
                **record,
            },
        )


if __name__ == "__main__":
    main()
