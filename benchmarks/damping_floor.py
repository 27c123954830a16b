"""A damping floor chosen on a validation split, on the small regression sets.

Not a test. The shipped defaults interpolate a set of a few hundred rows; a floor under the damping
rule (``GainRatioDamping(check_every=4, min_alpha=A)``) is a ridge on every step's kernel
regression, and its best size is the task's (docs/convergence.md, fifty-fourth session). This
script checks the recipe a user would follow: per seed, the training rows are split 80/20
(seeded); ``GramGaussNewton(model)`` and the same with each floor of ``--floors`` train ``--steps``
steps of batch ``--batch`` on the 80% (the task's model of ``convergence_race.py``, the same
initialisation and batches for every variant); then the training, validation and test MSE. The
floor of least validation MSE is the pick, printed beside the test set's best and the defaults.
Step counts, not seconds: a floor changes what a step does, hardly what it costs.
``torch.set_num_threads(--threads)`` (default 2); a record per run appended to ``--out``::

    python benchmarks/damping_floor.py --task concrete --steps 2000
    python benchmarks/damping_floor.py --task diabetes --steps 2000
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.lab.data import get_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence_race import TASKS  # noqa: E402
from results_log import append_record  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "damping_floor.json"
DEFAULT_FLOORS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6)
VALIDATION_FRACTION = 0.2


def tensors(dataset: str, split: str) -> tuple[Tensor, Tensor]:
    """Inputs ``(n, d)`` and targets ``(n,)`` of one split."""
    data = get_dataset(dataset, split=split)
    rows = [data[i] for i in range(len(data))]
    return torch.stack([x for x, _ in rows]), torch.stack([torch.as_tensor(y) for _, y in rows]).float()


def mse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).reshape(len(x), -1) - y.reshape(len(x), -1)).pow(2).mean())


def fit_one(
    make: Callable[[int], nn.Module], floor: float | None, seed: int, x: Tensor, y: Tensor, steps: int, batch: int
) -> nn.Module:
    """The task's model trained ``steps`` GGN steps on ``(x, y)``: the defaults, or a floor of
    ``floor`` under their rule."""
    torch.manual_seed(seed)
    model = make(x.shape[1])
    damping = (
        {} if floor is None else {"adaptive_damping": {"name": "gain_ratio", "check_every": 4, "min_alpha": floor}}
    )
    opt = GramGaussNewton(model, **damping)
    draws = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=draws)
        xb, yb = x[idx], y[idx]
        opt.step(lambda: model(xb).reshape(len(xb), -1) - yb.reshape(len(xb), -1))
    return model


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every variant on one seed's split; the record of the seed."""
    dataset, make = TASKS[args.task]
    x, y = tensors(dataset, "train")
    x_test, y_test = tensors(dataset, "test")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(100 + seed))
    n_val = int(len(x) * VALIDATION_FRACTION)
    val, fit_rows = perm[:n_val], perm[n_val:]
    variants = []
    for floor in (None, *args.floors):
        model = fit_one(make, floor, seed, x[fit_rows], y[fit_rows], args.steps, args.batch)
        variants.append(
            {
                "floor": floor,
                "train": mse(model, x[fit_rows], y[fit_rows]),
                "validation": mse(model, x[val], y[val]),
                "test": mse(model, x_test, y_test),
            }
        )
    pick = min(variants, key=lambda v: v["validation"])
    best = min(variants, key=lambda v: v["test"])
    return {"seed": seed, "variants": variants, "pick": pick["floor"], "test_best": best["floor"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["concrete", "diabetes"], required=True)
    p.add_argument("--steps", type=int, default=2000)
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
                f"{args.task} seed {seed} {name:12} train {v['train']:.4f} validation {v['validation']:.4f} test {v['test']:.4f}"
            )
        by_floor = {v["floor"]: v for v in record["variants"]}
        print(
            f"  validation picks {record['pick']} (test {by_floor[record['pick']]['test']:.4f}); the test set's best "
            f"{record['test_best']} ({by_floor[record['test_best']]['test']:.4f}); the defaults' test {by_floor[None]['test']:.4f}",
            flush=True,
        )
        append_record(
            args.out,
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "command": " ".join(["benchmarks/damping_floor.py", *(argv if argv is not None else sys.argv[1:])]),
                "task": args.task,
                "steps": args.steps,
                "batch": args.batch,
                "threads": args.threads,
                **record,
            },
        )


if __name__ == "__main__":
    main()
