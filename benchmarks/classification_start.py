"""Why GGN stalled on mnist: the start of training on raw vs standardised pixels.

Not a test. For resnet8_fixup on mnist (seed 0, batch 128), with the raw [0, 1] pixels, with
pixels only divided by the training split's standard deviation (``scaled``: the background stays
exactly 0) and with standardised ones (the data sets' default):

1. ``kink``: the fraction of the ReLU inputs that are exactly 0 at initialisation on one batch
   (autograd's derivative there is 0, one of the two one-sided ones);
2. ``linearisation``: after one GGN step (which moves the zero-initialised head alone), the
   second step's direction ``d`` against the model's real change along it: the relative error
   ``||f(w + t d) - f(w) - t J d|| / ||t J d||`` (``J d`` by ``torch.func.jvp``) and the loss
   change ``L(w + t d) - L(w)`` against the Gauss-Newton model ``t g^T J d + t^2/2 (J d)^T H (J d)``
   for a few ``t``. A differentiable model has an error ``O(t)``. The same after training (with
   the ``lam`` and ``alpha`` the run ended with);
3. ``runs``: ``--epochs`` epochs of each GGN setting in ``--settings`` (and Adam, lr 1e-2), the
   gain ratio, ``alpha`` and rejection of every step, and the test accuracy after every epoch.

Output: ``benchmarks/results/classification_start.json``; a summary is printed.

Usage::

    python benchmarks/classification_start.py --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from gramnewton import GramGaussNewton
from gramnewton.lab.data import get_dataset
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.training import (
    Callback,
    EpochEvaluator,
    FitState,
    batch_order,
    fit,
    make_train_step,
)
from gramnewton.lab.models import get_model

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"lam8": {"lam": 8.0}, "lam32": {"lam": 32.0}}
# GGN as these runs used it (the demo's classification setting then): gain ratio every step, no momentum
GGN = {"name": "ggn", "loss": "cross_entropy", "alpha": 0.3, "adaptive_damping": True, "momentum": 0.0}


def initial_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return get_model("resnet8_fixup", in_channels=1, num_outputs=10)


def kink_fractions(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Fraction of exact zeros in the input of every ReLU of one forward pass, in order."""
    fractions: list[float] = []
    relu = F.relu

    def counting(z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fractions.append(float((z == 0).double().mean()))
        return relu(z, *args, **kwargs)

    import gramnewton.lab.models.resnet as resnet

    resnet.F.relu = counting
    try:
        with torch.no_grad():
            model(x)
    finally:
        resnet.F.relu = relu
    return fractions


def linearisation(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lam: float = 8.0, alpha: float = 0.3
) -> dict[str, Any]:
    """The second GGN step's direction (``lam``, ``alpha``, no damping rule) against the model."""
    model = copy.deepcopy(model)
    opt = GramGaussNewton(model, loss="cross_entropy", lam=lam, alpha=alpha, adaptive_damping=False)
    x, y = batches[0]
    opt.step(lambda: (model(x), y))
    x, y = batches[1]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: (model(x), y))
    direction = {n: p.detach() - start[n] for n, p in model.named_parameters()}
    f0, jd = jvp(lambda w: functional_call(model, w, (x,)), (start,), (direction,))
    p = f0.softmax(1)
    g = p - F.one_hot(y, 10).to(p.dtype)
    linear = float((g * jd).sum())
    curvature = float((jd * (p * jd - p * (p * jd).sum(1, keepdim=True))).sum())
    loss0 = float(F.cross_entropy(f0, y, reduction="sum"))
    rows = []
    for t in (1e-3, 1e-2, 0.1, 1.0):
        with torch.no_grad():
            ft = functional_call(model, {n: start[n] + t * direction[n] for n in start}, (x,))
        rows.append(
            {
                "t": t,
                "relative_linearisation_error": float((ft - f0 - t * jd).norm() / (t * jd).norm()),
                "loss_change": float(F.cross_entropy(ft, y, reduction="sum")) - loss0,
                "model_loss_change": t * linear + 0.5 * t * t * curvature,
            }
        )
    return {"loss_before": loss0, "rows": rows}


class StepLog(Callback):
    """Gain ratio, alpha and rejection of every GGN step."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.steps = optimizer, []

    def on_step(self, state: FitState, loss: float) -> None:
        d = getattr(self.optimizer, "last_diagnostics", None)
        if d is not None:
            self.steps.append({"gain_ratio": d.gain_ratio, "alpha": d.alpha, "rejected": d.rejected})


def datasets(variant: str, seed: int) -> tuple[Any, Any]:
    """Train and test split of mnist as ``variant`` (``raw``, ``scaled``, ``standardised``) has them."""
    train_set, test_set = (
        get_dataset("mnist", split=split, seed=seed, standardise=variant == "standardised")
        for split in ("train", "test")
    )
    if variant == "scaled":
        std = train_set.inputs.double().std(unbiased=False)
        train_set.inputs, test_set.inputs = ((d.inputs.double() / std).float() for d in (train_set, test_set))
    return train_set, test_set


def train(init: nn.Module, spec: dict[str, Any], variant: str, epochs: int, seed: int) -> dict[str, Any]:
    train_set, test_set = datasets(variant, seed)
    model = copy.deepcopy(init)
    optimizer = build_optimizer(spec, model)
    evaluator, log = EpochEvaluator(model, train_set, test_set), StepLog(optimizer)
    fit(
        make_train_step(model, optimizer, "cross_entropy"),
        train_set,
        batch_size=128,
        seed=seed,
        epochs=epochs,
        callbacks=[evaluator, log],
    )
    after = [train_set[idx] for idx in batch_order(len(train_set), 128, seed, epochs + 1)[:2]]
    return {
        "spec": spec,
        "after_training": {
            "first_relu_bias": float(model.bias1.bias.detach()),
            "kink": kink_fractions(model, after[0][0]),
            # with the lam and alpha training ended with (Adam: the defaults above)
            "linearisation": linearisation(model, after, *_lam_alpha(optimizer)),
        },
        "test_accuracy": [r.test_accuracy for r in evaluator.records],
        "seconds": [r.seconds for r in evaluator.records],
        "rejected": sum(s["rejected"] for s in log.steps),
        "steps": log.steps,
    }


def _lam_alpha(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    group = optimizer.param_groups[0]
    return (group["lam"], group["alpha"]) if isinstance(optimizer, GramGaussNewton) else (8.0, 0.3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_before": os.getloadavg(),
        "threads": torch.get_num_threads(),
        "setting": vars(args),
    }
    init = initial_model(args.seed)
    out = ROOT / "benchmarks" / "results" / "classification_start.json"
    for key in ("raw", "scaled", "standardised"):
        train_set, _ = datasets(key, args.seed)
        order = batch_order(len(train_set), 128, args.seed, 1)
        batches = [train_set[idx] for idx in order[:2]]
        settings = SETTINGS if key != "scaled" else {"lam32": SETTINGS["lam32"]}
        ggn = {**GGN, "curvature": "gradient"}
        runs = {name: train(init, {**ggn, **hp}, key, args.epochs, args.seed) for name, hp in settings.items()}
        if key != "scaled":
            runs["adam"] = train(init, {"name": "adam", "lr": 1e-2}, key, args.epochs, args.seed)
        record[key] = {
            "kink": kink_fractions(init, batches[0][0]),
            "linearisation": linearisation(init, batches),
            "runs": runs,
        }
        print(f"{key}: zero ReLU inputs at init {[round(f, 3) for f in record[key]['kink']]}")
        for row in record[key]["linearisation"]["rows"]:
            print(f"  {key} second step, {row}")
        for name, run in runs.items():
            acc = " ".join(f"{a:.3f}" for a in run["test_accuracy"])
            late = run["after_training"]
            print(f"  {key} {name}: test accuracy per epoch {acc}; rejected {run['rejected']}", flush=True)
            print(f"    after training: bias1 {late['first_relu_bias']:.4g}, zero ReLU inputs {late['kink']}")
            print(f"    next steps: {late['linearisation']['rows'][:2]}")
        record["load_after"] = os.getloadavg()
        out.write_text(json.dumps(record, indent=1) + "\n")  # after every variant: a stopped run keeps them


if __name__ == "__main__":
    main()
