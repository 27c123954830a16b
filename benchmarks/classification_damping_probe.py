"""The gain-ratio damping in GGN's first steps on mnist: rejections and ``alpha``.

Not a test. resnet8_fixup with the seed-0 initialisation of the classification benchmark,
``GramGaussNewton(model, loss="cross_entropy", lam=LAM)`` (``--alpha``: the starting ``alpha``;
the other settings the constructor's defaults), ``--steps`` steps on random batches of 128
(``torch.Generator`` seed 0), 1 thread.
Prints ``alpha`` after every 4th step, the number of steps whose gain ratio was not measured
(``adaptive_damping="auto"`` skips it only once ``alpha`` sits at its floor) and the number of
rejected steps.

Usage::

    python benchmarks/classification_damping_probe.py --lam 16 --steps 48
"""

from __future__ import annotations

import argparse

import torch

from gramnewton import GramGaussNewton
from gramnewton.lab.data import get_dataset
from gramnewton.lab.experiments.demo import DemoConfig, initial_model
from gramnewton.lab.experiments.training import batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, default=16.0)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--alpha", type=float, default=None, help="starting alpha (default: the constructor's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = get_dataset("mnist", split="train", seed=0)
    model = initial_model(DemoConfig("mnist", task="classification"))
    alpha = {} if args.alpha is None else {"alpha": args.alpha}
    opt = GramGaussNewton(model, loss="cross_entropy", lam=args.lam, **alpha)
    generator = torch.Generator().manual_seed(0)
    alphas, unmeasured, rejected = [], 0, 0
    for _ in range(args.steps):
        x, y = next(iter(batches(train, [torch.randperm(len(train), generator=generator)[:128]])))
        opt.step(lambda: (model(x), y))
        alphas.append(opt.param_groups[0]["alpha"])
        unmeasured += opt.last_diagnostics.gain_ratio is None
        rejected += bool(opt.last_diagnostics.rejected)
    print("alpha after every 4th step:", ", ".join(f"{a:.2g}" for a in alphas[::4]))
    print(f"steps {args.steps}, gain ratio not measured {unmeasured}, rejected {rejected}")


if __name__ == "__main__":
    main()
