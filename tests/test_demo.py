"""The demo end to end on the small embedded task, and its sweep helpers."""

from __future__ import annotations

import csv
import math

from gramnewton.lab.cli import main
from gramnewton.lab.experiments.demo import SWEEP_GRID, best_settings, sweep_points


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
    assert "train MSE" in printed and "GGN" in printed


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
