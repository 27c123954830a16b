"""The demo: GGN against SGD (momentum 0.9) and Adam on the embedded rotated-digit task, or
(``task="classification"``) GGN with the cross-entropy loss against SGD, Adam and K-FAC (sampled
cross-entropy Fisher) on the embedded MNIST images.

Every optimizer starts from the same initialisation, sees the same batches and gets the same
budget of training seconds. GGN uses adaptive (gain-ratio) damping, so its ``alpha`` is the
initial value: with a fixed ``alpha`` the small ReLU ResNet's linearisation fails on some
batches and the loss spikes. :data:`DEMO_SETTINGS` holds the hyper-parameters chosen by
:func:`sweep` (``gramnewton demo --sweep``, grid :data:`SWEEP_GRID`): the value with the lowest
final train MSE for each optimizer. The classification task has its own (:data:`TASKS`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import get_dataset, is_classification
from ..models import get_model
from .optimizers import build_optimizer
from .training import Callback, EpochEvaluator, EpochRecord, fit, make_train_step, task_loss

# The optimizer factory's spec of each demo optimizer, before the swept hyper-parameters.
BASE_SPECS: dict[str, dict[str, Any]] = {
    "GGN": {"name": "ggn", "adaptive_damping": True},
    "SGD": {"name": "sgd"},  # momentum 0.9, the factory's default
    "Adam": {"name": "adam"},
}
SWEEP_GRID: dict[str, dict[str, list[float]]] = {
    "GGN": {"lam": [1.0, 2.0, 4.0, 8.0], "alpha": [0.3, 3.0]},
    "SGD": {"lr": [0.01, 0.03, 0.1, 0.3]},
    "Adam": {"lr": [3e-4, 1e-3, 3e-3, 1e-2]},
}
# Winners of `gramnewton demo --sweep --sweep-seconds 30` (2 threads, shared 2-core machine,
# 2026-11-28; runs/demo-sweep2/sweep.csv): lowest train MSE after 30 s of training.
DEMO_SETTINGS: dict[str, dict[str, float]] = {
    "GGN": {"lam": 8.0, "alpha": 0.3},
    "SGD": {"lr": 0.03},
    "Adam": {"lr": 3e-3},
}


# Classification: GGN's generalized Gauss-Newton step of the cross-entropy with adaptive damping
# (the curvature estimate is swept), K-FAC with the sampled cross-entropy Fisher.
CLASSIFY_SPECS: dict[str, dict[str, Any]] = {
    "GGN": {"name": "ggn", "loss": "cross_entropy", "alpha": 0.3, "adaptive_damping": True},
    "SGD": {"name": "sgd"},
    "Adam": {"name": "adam"},
    "K-FAC": {"name": "kfac", "loss": "cross_entropy"},
}
CLASSIFY_GRID: dict[str, dict[str, list[Any]]] = {
    "GGN": {"curvature": ["gradient", "top_c"], "lam": [8.0, 32.0]},
    "SGD": {"lr": [0.03, 0.1, 0.3]},
    "Adam": {"lr": [1e-3, 3e-3, 1e-2]},
    "K-FAC": {"lr": [0.01, 0.03, 0.1]},
}
# Winners of the grid on digits (benchmarks/classification_time_to_accuracy.py, 20 s per point,
# docs/classification.md): highest final test accuracy; the mnist runs use them too.
CLASSIFY_SETTINGS: dict[str, dict[str, Any]] = {
    "GGN": {"curvature": "gradient", "lam": 8.0},
    "SGD": {"lr": 0.1},
    "Adam": {"lr": 0.01},
    "K-FAC": {"lr": 0.1},
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
    over the task's specs, :data:`TASKS`) for ``config.seconds`` of training each; returns each log.

    ``progress(label)``, when given, makes a callback for that optimizer's run (a progress bar).
    """
    train_set = get_dataset(config.dataset, split="train", seed=config.seed)
    test_set = get_dataset(config.dataset, split="test", seed=config.seed)
    init = initial_model(config)
    specs = TASKS[config.task].specs
    logs = {}
    for name, hp in settings.items():
        model = copy.deepcopy(init)
        optimizer = build_optimizer({**specs[name], **hp}, model)
        evaluator = EpochEvaluator(model, train_set, test_set)
        model.train()
        state = fit(
            make_train_step(model, optimizer, task_loss(train_set)),
            train_set,
            batch_size=config.batch_size,
            seed=config.seed,
            epochs=config.max_epochs,
            seconds=config.seconds,
            callbacks=[evaluator, *([progress(name)] if progress else [])],
        )
        evaluator.finish(state)
        logs[name] = evaluator.records
    return logs


def sweep_points(grid: Mapping[str, Mapping[str, list[float]]] = SWEEP_GRID) -> list[tuple[str, dict[str, float]]]:
    """Every (optimizer, hyper-parameters) point of ``grid``."""
    return [
        (name, dict(zip(axes, values))) for name, axes in grid.items() for values in itertools.product(*axes.values())
    ]


def best_settings(results: list[tuple[str, dict[str, float], float]]) -> dict[str, dict[str, Any]]:
    """For each optimizer, the hyper-parameters with the lowest score (final train MSE, or minus
    the final test accuracy for classification; NaN loses)."""
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for name, hp, loss in results:
        score = loss if loss == loss else float("inf")
        if name not in best or score < best[name][0]:
            best[name] = (score, hp)
    return {name: hp for name, (_, hp) in best.items()}
