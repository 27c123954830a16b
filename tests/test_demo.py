"""The demo end to end on the small embedded task, and its sweep helpers."""

from __future__ import annotations

import csv
import itertools
import math

import pytest

from gramnewton import GramGaussNewton, NonFiniteError
from gramnewton.lab.cli import main
from gramnewton.lab.experiments import demo
from gramnewton.lab.experiments.demo import SWEEP_GRID, DemoConfig, DivergedRunWarning, best_settings, sweep_points
from gramnewton.lab.experiments.training import EpochRecord, lowest_test_loss


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--dataset",
                "rotated-digits",
                "--seconds",
                "1",
                "--max-epochs",
                "1",
                "--batch-size",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["optimizer"] for r in rows} == {"GGN", "SGD", "Adam"}
    assert all(r["epoch"] in ("0", "1") for r in rows)
    assert (out / "curves.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "train MSE" in printed and "GGN" in printed and "lowest test MSE (at s)" in printed


def test_lowest_test_loss_takes_the_first_minimum_and_ignores_nan():
    def record(seconds, test):
        return EpochRecord(0, 0, seconds, math.nan, 0.5, test)

    records = [record(1.0, 0.3), record(2.0, 0.1), record(3.0, math.nan), record(4.0, 0.1), record(5.0, 0.2)]
    assert lowest_test_loss(records).seconds == 2.0
    assert lowest_test_loss([record(1.0, math.nan)]) is None


def test_sweep_grid_and_winner_selection():
    points = sweep_points()
    assert len(points) == sum(math.prod(len(v) for v in axes.values()) for axes in SWEEP_GRID.values())
    assert ("GGN", {}) in points and ("Adam", {"lr": 3e-3}) in points
    results = [
        ("SGD", {"lr": 0.1}, float("nan")),
        ("SGD", {"lr": 0.01}, 0.3),
        ("SGD", {"lr": 0.03}, 0.2),
        ("GGN", {"alpha": 0.1}, 0.05),
    ]
    assert best_settings(results) == {"SGD": {"lr": 0.03}, "GGN": {"alpha": 0.1}}


def test_a_diverged_run_ends_with_nan_and_the_next_run_goes_on(monkeypatch):
    """GGN refuses its second step as a diverged model would (NaN outputs): its log ends with a
    NaN record at step 2, a warning names it, and Adam still runs; the sweep's rule drops it."""
    make_step = demo.make_train_step

    def diverging_second_step(model, optimizer, *args):
        step = make_step(model, optimizer, *args)
        if not isinstance(optimizer, GramGaussNewton):
            return step
        calls = itertools.count()

        def failing(*batch):
            if next(calls) == 1:
                raise NonFiniteError("64 of 64 outputs are NaN or Inf; no parameter was changed")
            return step(*batch)

        return failing

    monkeypatch.setattr(demo, "make_train_step", diverging_second_step)
    config = DemoConfig("rotated-digits", batch_size=64, seconds=1.0, max_epochs=1)
    with pytest.warns(DivergedRunWarning, match="GGN diverged at step 2: 64 of 64 outputs"):
        logs = demo.run_demo(config, {"GGN": {}, "Adam": {"lr": 1e-3}})
    last = logs["GGN"][-1]
    assert last.step == 2 and math.isnan(last.test_loss) and math.isnan(last.train_loss)
    assert all(math.isfinite(r.test_loss) for r in logs["GGN"][:-1]) and math.isfinite(logs["Adam"][-1].test_loss)
    results = [(n, {}, records[-1].train_loss) for n, records in logs.items()] + [("GGN", {"lam": 1.0}, 0.5)]
    assert best_settings(results)["GGN"] == {"lam": 1.0}


def test_classification_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--task", "classification", "--dataset", "digits", "--seconds", "1", "--max-epochs", "1"]
    assert main([*args, "--batch-size", "64", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["optimizer"] for r in rows} == {"GGN", "SGD", "Adam", "K-FAC"}
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    printed = capsys.readouterr().out
    assert "s to 97%" in printed and "K-FAC" in printed


def test_demo_takes_the_levers(tmp_path, capsys, monkeypatch):
    """``--label-smoothing`` and ``--shift`` reach the demo's config (off by default)."""
    from gramnewton.lab.commands import demo as demo_command

    seen = []
    monkeypatch.setattr(demo_command, "run_demo", lambda config, settings, progress=None: seen.append(config) or {})
    monkeypatch.setattr(demo_command, "plot_curves", lambda *args, **kwargs: None)
    monkeypatch.setattr(demo_command, "write_rows", lambda *args, **kwargs: None)
    base = ["demo", "--task", "classification", "--dataset", "digits", "--out", str(tmp_path / "d")]
    assert main(base) == 0
    assert main([*base, "--label-smoothing", "0.1", "--shift", "2"]) == 0
    assert main(["demo", "--dataset", "rotated-digits", "--out", str(tmp_path / "r")]) == 0
    assert [(c.label_smoothing, c.shift) for c in seen] == [(0.0, 0), (0.1, 2), (0.0, 0)]
    assert "label smoothing 0.1" in capsys.readouterr().out


def test_label_smoothing_with_the_regression_demo_is_one_line_error(tmp_path, capsys):
    args = ["demo", "--dataset", "rotated-digits", "--seconds", "1", "--max-epochs", "1"]
    assert main([*args, "--label-smoothing", "0.1", "--out", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label" in err[0] and err[0].startswith("error")
