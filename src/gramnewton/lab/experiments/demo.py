"""The demo: GGN against SGD (momentum 0.9) and Adam on the embedded rotated-digit task.

Every optimizer starts from the same initialisation, sees the same batches and gets the same
budget of training seconds. GGN uses adaptive (gain-ratio) damping, so its ``alpha`` is the
initial value: with a fixed ``alpha`` the small ReLU ResNet's linearisation fails on some
batches and the loss spikes. :data:`DEMO_SETTINGS` holds the hyper-parameters chosen by
:func:`sweep` (``gramnewton demo --sweep``, grid :data:`SWEEP_GRID`): the value with the lowest
final train MSE for each optimizer.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import get_dataset
from ..models import get_model
from .optimizers import build_optimizer
from .training import Callback, EpochEvaluator, EpochRecord, fit, make_train_step

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


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "rotated-mnist"
    model: str = "resnet8_fixup"
    batch_size: int = 128
    seconds: float = 90.0
    max_epochs: int = 100
    seed: int = 0


def initial_model(config: DemoConfig) -> nn.Module:
    """The shared initialisation: the registered model built under ``seed``."""
    torch.manual_seed(config.seed)
    in_channels = get_dataset(config.dataset, split="test").input_shape[0]
    return get_model(config.model, in_channels=in_channels)


def run_demo(
    config: DemoConfig,
    settings: Mapping[str, Mapping[str, float]] = DEMO_SETTINGS,
    progress: Callable[[str], Callback] | None = None,
) -> dict[str, list[EpochRecord]]:
    """Train one copy of the initial model per optimizer in ``settings`` (label -> hyper-parameters
    over :data:`BASE_SPECS`) for ``config.seconds`` of training each; returns each log.

    ``progress(label)``, when given, makes a callback for that optimizer's run (a progress bar).
    """
    train_set = get_dataset(config.dataset, split="train", seed=config.seed)
    test_set = get_dataset(config.dataset, split="test", seed=config.seed)
    init = initial_model(config)
    logs = {}
    for name, hp in settings.items():
        model = copy.deepcopy(init)
        optimizer = build_optimizer({**BASE_SPECS[name], **hp}, model)
        evaluator = EpochEvaluator(model, train_set, test_set)
        model.train()
        state = fit(
            make_train_step(model, optimizer),
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
    """For each optimizer, the hyper-parameters with the lowest final train MSE (NaN loses)."""
    best: dict[str, tuple[float, dict[str, float]]] = {}
    for name, hp, loss in results:
        score = loss if loss == loss else float("inf")
        if name not in best or score < best[name][0]:
            best[name] = (score, hp)
    return {name: hp for name, (_, hp) in best.items()}
