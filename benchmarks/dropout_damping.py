"""The gain-ratio rule on a network with dropout: rejections, ``alpha`` and the test MSE.

Not a test. An MLP ``d-256-256-1`` (ReLU, ``Dropout(p)`` after each hidden layer) is trained on
the lab's ``diamonds`` set (43,152 training rows, 26 features) with ``GramGaussNewton(model)``,
the defaults (gain-ratio damping), batch 128, for ``--steps`` steps per seed and ``p``; printed
and appended to ``--out``: the rejected steps, the median ``alpha`` and gain ratio, and the
training and test MSE with dropout off. Since 2026-12-01 each re-evaluation replays the random
draws of the step's own forward (``engines.base.replayable_randomness``); run it at the commit
before (``git checkout 1dc3ac5~1``) for the fresh draws of earlier versions::

    python benchmarks/dropout_damping.py --p 0.1 0.3 --seeds 0 1 2 --steps 600
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch
from results_log import append_record
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.lab.data import get_dataset

ROOT = Path(__file__).resolve().parents[1]


def run(p: float, seed: int, steps: int, batch: int) -> dict:
    train, test = get_dataset("diamonds", split="train"), get_dataset("diamonds", split="test")
    x, y = train.inputs.float(), train.targets.float()
    x_test, y_test = test.inputs.float(), test.targets.float()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 256), nn.ReLU(), nn.Dropout(p),
        nn.Linear(256, 1),
    )  # fmt: skip
    opt = GramGaussNewton(model)
    order = torch.Generator().manual_seed(seed)
    rejected, alphas, ratios, start, taken = 0, [], [], time.perf_counter(), 0
    model.train()
    while taken < steps:
        perm = torch.randperm(x.shape[0], generator=order)
        for i in range(0, x.shape[0] - batch + 1, batch):
            rows = perm[i : i + batch]
            opt.step(lambda rows=rows: model(x[rows]).squeeze(1) - y[rows])
            d = opt.last_diagnostics
            rejected += d.rejected
            alphas.append(d.alpha)
            if d.gain_ratio is not None:
                ratios.append(d.gain_ratio)
            taken += 1
            if taken == steps:
                break
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_mse = float((model(x).squeeze(1) - y).pow(2).mean())
        test_mse = float((model(x_test).squeeze(1) - y_test).pow(2).mean())
    return dict(
        p=p,
        seed=seed,
        steps=steps,
        rejected=rejected,
        alpha_median=statistics.median(alphas),
        gain_ratio_median=statistics.median(ratios) if ratios else None,
        re_evaluated=len(ratios),
        train_mse=train_mse,
        test_mse=test_mse,
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, nargs="+", default=[0.1, 0.3], help="dropout probabilities")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dropout_damping.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = [run(p, seed, args.steps, args.batch) for p in args.p for seed in args.seeds]
    append_record(
        args.out,
        dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            threads=args.threads,
            load_average=[load, os.getloadavg()[0]],
            rows=rows,
        ),
    )
    print(f"threads {args.threads}, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for r in rows:
        print(
            f"p {r['p']} seed {r['seed']}: rejected {r['rejected']:3d} of {r['steps']}, alpha median "
            f"{r['alpha_median']:.3g}, gain ratio median {r['gain_ratio_median']:.3f} "
            f"({r['re_evaluated']} re-evaluated), train MSE {r['train_mse']:.4f}, test MSE {r['test_mse']:.4f}"
        )


if __name__ == "__main__":
    main()
