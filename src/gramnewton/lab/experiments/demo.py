"""The demo: GGN against SGD (momentum 0.9) and Adam on the embedded rotated-digit task, or
(``task="classification"``) GGN with the cross-entropy loss against SGD, Adam and K-FAC (sampled
cross-entropy Fisher) on the embedded MNIST images.

Every optimizer starts from the same initialisation, sees the same batches and gets the same
budget of training seconds. In the regression demo GGN is ``GramGaussNewton(model)`` as a user
gets it: the shipped defaults, no hyper-parameter given (chosen by the measurements of
``docs/convergence.md``). SGD's and Adam's learning rates in :data:`DEMO_SETTINGS` are the best
of :data:`SWEEP_GRID` on this task (``gramnewton demo --sweep``): the lowest final train MSE.
Besides every epoch, the regression demo evaluates the train and test MSE at every ``mark``
seconds of training (:class:`TimeMarks`). The classification task has its own (:data:`TASKS`).
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ...solve import NonFiniteError, SingularGramError
from ..data import get_dataset, is_classification
from ..data.augment import translation
from ..models import get_model
from .optimizers import build_optimizer
from .training import (
    Callback,
    EpochEvaluator,
    EpochRecord,
    FitState,
    fit,
    make_train_step,
    mean_squared_error,
    task_loss,
)

# The optimizer factory's spec of each demo optimizer, before the swept hyper-parameters.
BASE_SPECS: dict[str, dict[str, Any]] = {
    "GGN": {"name": "ggn"},  # the constructor's defaults
    "SGD": {"name": "sgd"},  # momentum 0.9, the factory's default
    "Adam": {"name": "adam"},
}
SWEEP_GRID: dict[str, dict[str, list[float]]] = {
    "GGN": {},  # one point: the defaults
    "SGD": {"lr": [0.01, 0.03, 0.1, 0.3]},
    "Adam": {"lr": [3e-4, 1e-3, 3e-3, 1e-2]},
}
# Winners of `gramnewton demo --sweep --sweep-seconds 30` (2 threads, shared 2-core machine,
# 2026-11-28; runs/demo-sweep2/sweep.csv): lowest train MSE after 30 s of training.
DEMO_SETTINGS: dict[str, dict[str, float]] = {
    "GGN": {},
    "SGD": {"lr": 0.03},
    "Adam": {"lr": 3e-3},
}


# Classification: GGN's generalized Gauss-Newton step of the cross-entropy with the constructor's
# defaults (alpha=0.3, momentum=0.9, gain-ratio damping "auto", the "gradient" curvature; lam is
# swept), K-FAC with the sampled cross-entropy Fisher.
CLASSIFY_SPECS: dict[str, dict[str, Any]] = {
    "GGN": {"name": "ggn", "loss": "cross_entropy"},
    "SGD": {"name": "sgd"},
    "Adam": {"name": "adam"},
    "K-FAC": {"name": "kfac", "loss": "cross_entropy"},
}
CLASSIFY_GRID: dict[str, dict[str, list[Any]]] = {
    "GGN": {"lam": [8.0, 16.0, 32.0, 64.0]},
    "SGD": {"lr": [0.003, 0.01, 0.02, 0.03, 0.05, 0.1]},
    "Adam": {"lr": [3e-3, 5e-3, 1e-2]},
    "K-FAC": {"lr": [0.003, 0.01, 0.03, 0.1], "damping": [0.01, 0.1, 1.0]},
}
# Settings from the grids on standardised mnist (benchmarks/classification_time_to_accuracy.py,
# 2026-11-29, docs/classification.md): the highest final test accuracy, Adam after 90 s of
# training, SGD and K-FAC after 30 s. GGN: the constructor's defaults (lam=16). lam=8 ended 0.4%
# higher (3-seed medians 96.9% vs 96.5%) but blew up for three epochs on one seed of three (test
# accuracy at chance, running loss 93) where lam=16 stayed stable and reached 95% twice as soon.
CLASSIFY_SETTINGS: dict[str, dict[str, Any]] = {
    "GGN": {},
    "SGD": {"lr": 0.03},
    "Adam": {"lr": 0.01},
    "K-FAC": {"lr": 0.03, "damping": 0.1},
}


@dataclass(frozen=True)
class DemoTask:
    """What a demo task trains: the default data set, the optimizers' base specs, the settings
    used without a sweep, and the sweep grid."""

    dataset: str
    specs: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Mapping[str, float]]
    grid: Mapping[str, Mapping[str, list[float]]]


TASKS = {
    "regression": DemoTask("rotated-mnist", BASE_SPECS, DEMO_SETTINGS, SWEEP_GRID),
    "classification": DemoTask("mnist", CLASSIFY_SPECS, CLASSIFY_SETTINGS, CLASSIFY_GRID),
}


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "rotated-mnist"
    model: str = "resnet8_fixup"
    batch_size: int = 128
    seconds: float = 90.0
    max_epochs: int = 100
    seed: int = 0
    task: str = "regression"
    mark: float = 10.0
    evaluate_train: bool = True  # False: the epoch evaluations skip the train split (NaN there)
    label_smoothing: float = 0.0  # classification: every optimizer's targets (make_train_step)
    shift: int = 0  # random translations of the training images by up to this many pixels

    def __post_init__(self) -> None:
        """Refuse values no run can use, before any data loads (``seconds=-1`` failed at the table)."""
        positive = {"batch_size": self.batch_size, "seconds": self.seconds, "max_epochs": self.max_epochs}
        for name, value in (*positive.items(), ("mark", self.mark)):
            if not value > 0:
                raise ValueError(f"the demo's {name} must be > 0, got {value!r}")
        if self.task not in TASKS:
            raise ValueError(f"unknown demo task {self.task!r}; expected one of {', '.join(TASKS)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"the demo's label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.shift < 0:
            raise ValueError(f"the demo's shift must be >= 0, got {self.shift!r}")


class DivergedRunWarning(UserWarning):
    """A demo run stopped early: its optimizer refused a step with NaN or Inf outputs, or found no
    finite step (the run diverged); the other runs go on."""


class TimeMarks(Callback):
    """Evaluates the full train and test MSE at the first step past every ``every`` training
    seconds (so runs can be compared at fixed times); records go to :attr:`records`."""

    def __init__(self, model: nn.Module, train_set: Dataset, test_set: Dataset, every: float):
        self.model, self.train_set, self.test_set, self.every = model, train_set, test_set, every
        self.next = every
        self.records: list[EpochRecord] = []

    def on_step(self, state: FitState, loss: float) -> None:
        if state.seconds < self.next:
            return
        while self.next <= state.seconds:
            self.next += self.every
        train, test = mean_squared_error(self.model, self.train_set), mean_squared_error(self.model, self.test_set)
        self.records.append(EpochRecord(state.epoch, state.step, state.seconds, math.nan, train, test))


def at_mark(records: list[EpochRecord], seconds: float) -> EpochRecord | None:
    """The first evaluation at or after ``seconds`` of training. For a run that ended before: its
    NaN record if it diverged (:func:`run_demo`: it loses every later comparison), else None."""
    found = next((r for r in records if r.seconds >= seconds), None)
    if found is None and records and math.isnan(records[-1].test_loss):
        return records[-1]
    return found


def initial_model(config: DemoConfig) -> nn.Module:
    """The shared initialisation: the registered model built under ``seed`` (with one output per
    class for a classification data set)."""
    torch.manual_seed(config.seed)
    test_set = get_dataset(config.dataset, split="test")
    outputs = test_set.num_classes if is_classification(test_set) else 1
    return get_model(config.model, in_channels=test_set.input_shape[0], num_outputs=outputs)


def run_demo(
    config: DemoConfig,
    settings: Mapping[str, Mapping[str, float]] = DEMO_SETTINGS,
    progress: Callable[[str], Callback] | None = None,
) -> dict[str, list[EpochRecord]]:
    """Train one copy of the initial model per optimizer in ``settings`` (label -> hyper-parameters
    over the task's specs, :data:`TASKS`) for ``config.seconds`` of training each; returns each log
    (for regression, the epoch evaluations and those every ``config.mark`` seconds, in step order).

    ``progress(label)``, when given, makes a callback for that optimizer's run (a progress bar).

    A run that diverges (a GGN step refuses NaN or Inf outputs, or finds no finite step) ends
    there with a :class:`DivergedRunWarning`; its log ends with a record of NaN losses and
    accuracy at that step (so it loses every comparison, as a first-order run whose losses became
    NaN does), and the next run starts: one diverging point of a sweep does not end the sweep.
    """
    train_set = get_dataset(config.dataset, split="train", seed=config.seed)
    test_set = get_dataset(config.dataset, split="test", seed=config.seed)
    task = "classification" if is_classification(train_set) else "regression"
    if task != config.task:  # else GGN refuses its first step with a fix the demo gives no way to apply
        raise ValueError(f"{config.dataset} is a {task} data set: run it with --task {task}")
    augment = translation(train_set, config.shift)
    init = initial_model(config)
    specs = TASKS[config.task].specs
    logs = {}
    for name, hp in settings.items():
        model = copy.deepcopy(init)
        optimizer = build_optimizer({**specs[name], **hp}, model)
        evaluator = EpochEvaluator(model, train_set, test_set, train=config.evaluate_train)
        marks = [TimeMarks(model, train_set, test_set, config.mark)] if config.task == "regression" else []
        model.train()
        state = FitState()
        try:
            fit(
                make_train_step(model, optimizer, task_loss(train_set), config.label_smoothing),
                train_set,
                batch_size=config.batch_size,
                seed=config.seed,
                epochs=config.max_epochs,
                seconds=config.seconds,
                state=state,
                callbacks=[evaluator, *marks, *([progress(name)] if progress else [])],
                augment=augment,
            )
        except (NonFiniteError, SingularGramError) as error:
            warnings.warn(f"{name} diverged at step {state.step + 1}: {error}", DivergedRunWarning, stacklevel=2)
            nan = math.nan
            evaluator.records.append(
                EpochRecord(state.epoch + 1, state.step + 1, state.seconds, nan, nan, nan, nan, nan)
            )
        else:
            evaluator.finish(state)
        extra = [r for m in marks for r in m.records]
        logs[name] = sorted(evaluator.records + extra, key=lambda r: (r.step, r.epoch))
    return logs


def sweep_points(grid: Mapping[str, Mapping[str, list[float]]] = SWEEP_GRID) -> list[tuple[str, dict[str, float]]]:
    """Every (optimizer, hyper-parameters) point of ``grid``."""
    return [
        (name, dict(zip(axes, values))) for name, axes in grid.items() for values in itertools.product(*axes.values())
    ]


def best_settings(results: list[tuple[str, dict[str, float], float]]) -> dict[str, dict[str, Any]]:
    """For each optimizer, the hyper-parameters with the lowest score (the final training loss: MSE,
    or cross-entropy for classification; NaN loses; of equal scores the first)."""
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for name, hp, loss in results:
        score = loss if loss == loss else float("inf")
        if name not in best or score < best[name][0]:
            best[name] = (score, hp)
    return {name: hp for name, (_, hp) in best.items()}
