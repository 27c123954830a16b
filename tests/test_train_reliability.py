"""``gramnewton train``'s run folder under interruption: a resumed run is the uninterrupted one bit
for bit (parameters, optimizer state, RNG, metrics rows), however the run was cut, and the files a
reader or a kill meets mid-write (rows of "Training runs" in docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_lab_reliability import one_line_error

from gramnewton.lab.cli import main
from gramnewton.lab.experiments import runner
from gramnewton.lab.experiments.config import resolve
from gramnewton.lab.experiments.metrics import read_rows, write_rows
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.training import Callback

HYPER = {
    "ggn": {"alpha": 0.3},
    "sgd": {"lr": 0.05},
    "adam": {"lr": 1e-3},
    "kfac": {"lr": 0.02, "inverse_every": 2, "factor_every": 1},
}


def tiny(optimizer: str = "sgd", classification: bool = False) -> dict[str, Any]:
    """3 epochs of 3 steps of an MLP on 96 samples. Classification (digits, cross-entropy) with
    every lever that draws or keeps state: label smoothing, shifted images, GGN's momentum and
    gain-ratio rule with a retry, K-FAC's sampled-Fisher backward (the global RNG)."""
    hyper = dict(HYPER[optimizer])
    train: dict[str, Any] = {"batch_size": 32, "epochs": 3, "threads": 1}
    if classification:
        train |= {"label_smoothing": 0.1, "shift": 1}
        if optimizer in ("ggn", "kfac"):
            hyper["loss"] = "cross_entropy"
        if optimizer == "ggn":
            hyper |= {"momentum": 0.9, "adaptive_damping": {"name": "gain_ratio", "check_every": 2, "retries": 1}}
    return resolve(
        {
            "name": "tiny",
            "seed": 3,
            "model": {"name": "mlp", "kwargs": {"in_channels": 64, "hidden": [16]}},
            "data": {"name": "digits" if classification else "rotated-digits", "train_subset": 96, "test_subset": 32},
            "optimizer": {"name": optimizer, **hyper},
            "train": train,
        }
    )


def _rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the wall-clock seconds, NaN as None so that equal rows compare equal."""
    return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in rows]


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of nested checkpoint contents (tensors with ``torch.equal``, NaN equal to NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b or (a != a and b != b)


def _assert_resumed_equals_full(full: Path, resumed: Path) -> None:
    """Checkpoints equal bit for bit but for the seconds; metrics.csv rows equal, none doubled or lost."""
    a, b = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (full, resumed))
    for key in ("model", "optimizer", "rng", "epoch", "step", "batch_losses", "diagnostics", "early_stopping"):
        assert _same(a[key], b[key]), key
    assert _rows(a["rows"]) == _rows(b["rows"])
    assert _rows(read_rows(resumed / "metrics.csv")) == _rows(read_rows(full / "metrics.csv"))


class _CtrlC(Callback):
    """Ctrl-C as the train command raises it: between steps, after step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, state, loss):
        if state.step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimizer", list(HYPER))
def test_classification_resumed_mid_epoch_is_the_uninterrupted_run_bit_for_bit(tmp_path, optimizer):
    """Verified: parameters, optimizer state (GGN's damping rule and momentum, K-FAC's factors,
    Adam's moments), the RNG K-FAC samples from, data order and augmentation all resume."""
    config = tiny(optimizer, classification=True)
    run_experiment(config, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut", callbacks=[_CtrlC(at=5)])  # step 2 of epoch 2
    run_experiment(config, tmp_path / "cut", resume=True)
    _assert_resumed_equals_full(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize("checkpoint_seconds", [0, 3600])
def test_an_interrupt_inside_a_step_keeps_the_last_checkpoint(tmp_path, monkeypatch, checkpoint_seconds):
    """A second Ctrl-C (or Ctrl-C in Python, a notebook's interrupt) lands inside a step: was a
    checkpoint of the model after step 5 recorded as after step 4, so the resumed run took step 5
    twice (its rows from epoch 2 on differed from the uninterrupted run's). With files written
    every epoch the last is epoch 1's; with a long write interval there is none, and the resumed
    run starts over."""
    config = tiny("sgd")
    config["train"]["checkpoint_seconds"] = checkpoint_seconds
    run_experiment(config, tmp_path / "full")
    real = runner.make_train_step

    def interrupted_after_the_fifth_update(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def cut(x, y):
            loss = step(x, y)  # the parameters have moved ...
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt  # ... before fit counts the step
            return loss

        return cut

    monkeypatch.setattr(runner, "make_train_step", interrupted_after_the_fifth_update)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut")
    monkeypatch.undo()
    if checkpoint_seconds:
        assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    else:
        assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3  # epoch 1's
    run_experiment(config, tmp_path / "cut", resume=True)
    _assert_resumed_equals_full(tmp_path / "full", tmp_path / "cut")


def test_an_interrupt_during_the_epoch_end_evaluation_loses_no_row(tmp_path, monkeypatch):
    """Was: the checkpoint recorded epoch 2 as done without its metrics row; the resumed run went on
    with epoch 3, and metrics.csv had the epochs 0, 1, 3."""
    config = tiny("sgd")
    run_experiment(config, tmp_path / "full")
    real, calls = runner.EpochEvaluator.evaluate_now, []

    def interrupted_at_the_third(self):
        calls.append(1)
        if len(calls) == 3:  # epoch 0, epoch 1, then epoch 2's evaluation
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(runner.EpochEvaluator, "evaluate_now", interrupted_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "cut")
    monkeypatch.undo()
    run_experiment(config, tmp_path / "cut", resume=True)
    assert [r["epoch"] for r in read_rows(tmp_path / "cut" / "metrics.csv")] == [0, 1, 2, 3]
    _assert_resumed_equals_full(tmp_path / "full", tmp_path / "cut")


def test_a_run_of_short_epochs_writes_its_files_seldom_and_ends_with_the_same_files(tmp_path, monkeypatch):
    """Was: checkpoint.pt and metrics.csv (and best.pt at every new best) rewritten after every
    epoch, both files growing with the rows: a 30-s run on concrete (about 5,000 epochs) took
    3.6 minutes of wall clock. Now at most every ``train.checkpoint_seconds`` and at the end, the
    final files those of a run that wrote after every epoch."""
    every = tiny("sgd")
    every["data"]["validation_fraction"] = 0.25
    every["train"] |= {"epochs": 12, "keep_best": True, "checkpoint_seconds": 0}
    seldom = {**every, "train": {**every["train"], "checkpoint_seconds": 3600}}
    real, writes = runner.save_checkpoint, []

    def counted(out, model, optimizer, state):
        writes.append(state["epoch"])
        return real(out, model, optimizer, state)

    monkeypatch.setattr(runner, "save_checkpoint", counted)
    run_experiment(every, tmp_path / "every")
    assert writes == list(range(1, 13))
    writes.clear()
    run_experiment(seldom, tmp_path / "seldom")
    assert writes == [12]
    _assert_resumed_equals_full(tmp_path / "every", tmp_path / "seldom")
    best = [torch.load(tmp_path / run / "best.pt", weights_only=True) for run in ("every", "seldom")]
    assert _same(best[0]["model"], best[1]["model"]) and _rows([best[0]["row"]]) == _rows([best[1]["row"]])
    assert 0 < best[0]["row"]["epoch"]  # a best model kept during the run, not the initial one


class _Watcher:
    """A metrics value whose formatting, in the middle of the write, reads the file as a concurrent
    ``gramnewton plot`` would, then (``kill``) stops the write as a kill would."""

    def __init__(self, path: Path, kill: bool = False):
        self.path, self.kill, self.seen = path, kill, b""

    def __str__(self) -> str:
        self.seen = self.path.read_bytes()
        if self.kill:
            raise KeyboardInterrupt
        return "0.25"


def test_metrics_csv_is_never_half_written(tmp_path):
    """``gramnewton plot`` reads a running run's metrics.csv, which the run rewrites every epoch.
    Was: the file was emptied first, so a reader meanwhile met an empty file (``error: metrics.csv
    is empty``) and a write cut short left the header and the rows before the cut."""
    path = tmp_path / "metrics.csv"
    rows = [{"epoch": 0, "loss": 1.5}, {"epoch": 1, "loss": 0.5}]
    write_rows(path, rows[:1])
    before = path.read_bytes()
    reader = _Watcher(path)
    write_rows(path, [*rows, {"epoch": 2, "loss": reader}])
    assert reader.seen == before  # the old file, whole, until the new one replaces it
    assert [r["loss"] for r in read_rows(path)] == [1.5, 0.5, 0.25]
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_rows(path, [{"epoch": 0, "loss": 9.0}, {"epoch": 1, "loss": _Watcher(path, kill=True)}])
    assert path.read_bytes() == before


def test_a_section_given_as_a_value_is_named(tmp_path, capsys):
    """``optimizer = "ggn"`` (a shorthand a user may try): was ``error: config is missing
    optimizer.name``, a key the file did set."""
    path = tmp_path / "short.toml"
    path.write_text('optimizer = "ggn"\n[model]\nname = "mlp"\n[data]\nname = "digits"\n')
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 1
    assert "optimizer must be a table [optimizer], got 'ggn'" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
