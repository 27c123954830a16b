"""One experiment run from a resolved config: train, evaluate, log, checkpoint, resume.

A run folder holds ``config.toml`` (the resolved config), ``metrics.csv`` (one row per epoch)
and ``checkpoint.pt`` (rewritten atomically after every epoch and on interruption). A run
resumed from its checkpoint produces the same rows as an uninterrupted one, apart from the
wall-clock seconds: the data order depends only on ``(seed, epoch)``, a checkpoint taken
mid-epoch records the losses of the batches already taken (those batches are skipped), and the
model, optimizer and torch RNG states are restored.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .config import dumps, load_config
from .metrics import read_rows, write_rows
from .setup import CHECKPOINT, build_model, build_optimizer, load_data, warm_start
from .training import EpochRecord, make_train_step, mean_squared_error, train_epoch

CONFIG_FILE, METRICS_FILE = "config.toml", "metrics.csv"


def run_experiment(
    config: Mapping[str, Any], out: str | Path, *, resume: bool = False, on_batch: Callable[[float], None] | None = None
) -> list[dict[str, Any]]:
    """Train the run ``config`` into folder ``out``; return its metric rows (epoch 0 first).

    With ``resume``, continue from ``out/checkpoint.pt`` if there is one (its config must equal
    ``config`` except for ``train.epochs``, which may grow). A ``KeyboardInterrupt`` (raised by
    ``on_batch``, say, on Ctrl-C) saves a checkpoint after the last finished step and re-raises.

    Row keys: ``epoch``, ``step``, ``seconds`` (training only), ``running_loss`` (mean of the
    epoch's mini-batch MSEs before each update), ``train_loss`` and ``test_loss`` (full-pass
    MSE in evaluation mode, NaN when not evaluated), ``train_rmse`` and ``test_rmse`` (in the
    target's original unit).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config["train"]["threads"])
    checkpoint = _load_checkpoint(out, config) if resume else None
    (out / CONFIG_FILE).write_text(dumps(config))
    train_set, test_set = load_data(config, "train"), load_data(config, "test")
    model = build_model(config, train_set)
    if config["warm_start"]["run"] and checkpoint is None:
        warm_start(model, config["warm_start"]["run"])
    optimizer = build_optimizer(config, model)
    train, epochs = config["train"], config["train"]["epochs"]

    def evaluate(epoch: int) -> tuple[float, float]:
        if epoch % train["eval_every"] and epoch != epochs:
            return math.nan, math.nan
        return mean_squared_error(model, train_set), mean_squared_error(model, test_set)

    if checkpoint is None:
        state: dict[str, Any] = {
            "epoch": 0,
            "step": 0,
            "seconds": 0.0,
            "batch_losses": [],
            "rows": [_row(EpochRecord(0, 0, 0.0, math.nan, *evaluate(0)), train_set.scale)],
        }
    else:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        state = {k: checkpoint[k] for k in ("epoch", "step", "seconds", "batch_losses", "rows")}
    write_rows(out / METRICS_FILE, state["rows"])
    step = make_train_step(model, optimizer)
    model.train()
    for epoch in range(state["epoch"] + 1, epochs + 1):
        start, done_before = time.perf_counter(), len(state["batch_losses"])
        try:
            _, running = train_epoch(
                step,
                train_set,
                train["batch_size"],
                config["seed"],
                epoch,
                on_batch=on_batch,
                losses=state["batch_losses"],
            )
        except KeyboardInterrupt:
            state["step"] += len(state["batch_losses"]) - done_before
            state["seconds"] += time.perf_counter() - start
            save_checkpoint(out, model, optimizer, state)
            raise
        state["step"] += len(state["batch_losses"]) - done_before
        state["seconds"] += time.perf_counter() - start
        record = EpochRecord(epoch, state["step"], state["seconds"], running, *evaluate(epoch))
        state.update(epoch=epoch, batch_losses=[], rows=state["rows"] + [_row(record, train_set.scale)])
        write_rows(out / METRICS_FILE, state["rows"])
        save_checkpoint(out, model, optimizer, state)
    return state["rows"]


def _row(record: EpochRecord, scale: Any) -> dict[str, Any]:
    return {
        **asdict(record),
        "train_rmse": scale.rmse_in_unit(record.train_loss),
        "test_rmse": scale.rmse_in_unit(record.test_loss),
    }


def save_checkpoint(out: Path, model: nn.Module, optimizer: Optimizer, state: Mapping[str, Any]) -> Path:
    """Write ``out/checkpoint.pt`` atomically (temporary file, then ``os.replace``).

    Holds only tensors, numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)``
    reads it: ``model``, ``optimizer`` (state dicts), ``rng`` (torch CPU RNG state), ``epoch``
    (finished epochs), ``batch_losses`` (losses of the steps taken in the unfinished epoch),
    ``step``, ``seconds`` and ``rows`` (the metrics so far).
    """
    path = out / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            **{k: state[k] for k in ("epoch", "step", "seconds", "batch_losses", "rows")},
        },
        tmp,
    )
    os.replace(tmp, path)
    return path


def resumable(out: str | Path, config: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds a checkpoint of ``config`` (``train.epochs`` may differ)."""
    out = Path(out)
    if not (out / CHECKPOINT).is_file() or not (out / CONFIG_FILE).is_file():
        return False
    return _without_epochs(load_config(out / CONFIG_FILE)) == _without_epochs(config)


def _load_checkpoint(out: Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    if not (out / CHECKPOINT).is_file():
        return None
    if not resumable(out, config):
        raise ValueError(f"{out} holds a run of another config; use another --out or drop --resume")
    return torch.load(out / CHECKPOINT, weights_only=True)


def _without_epochs(config: Mapping[str, Any]) -> dict[str, Any]:
    return {**config, "train": {k: v for k, v in config["train"].items() if k != "epochs"}}


def is_complete(out: str | Path, config: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds this config's run with a metrics row for its last epoch."""
    out = Path(out)
    if not (out / CONFIG_FILE).is_file() or not (out / METRICS_FILE).is_file():
        return False
    if load_config(out / CONFIG_FILE) != dict(config):
        return False
    rows = read_rows(out / METRICS_FILE)
    return bool(rows) and int(rows[-1]["epoch"]) == config["train"]["epochs"]
