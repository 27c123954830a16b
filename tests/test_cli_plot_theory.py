"""``gramnewton plot`` and ``gramnewton theory``: broken metrics files, runs sharing a name, the
written path, and an occupied ``--out`` (rows of "Data, runs and the command line" in docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_lab_reliability import TINY, one_line_error, snapshot
from test_theory_reliability import fail_at

from gramnewton.lab.cli import main
from gramnewton.lab.commands import plot as plot_command
from gramnewton.lab.experiments.reproduce import load_curves
from gramnewton.lab.experiments.runner import run_labels

# The smallest theory study: one width, one seed, two steps (about a second).
QUADRATIC = ["theory", "quadratic", "--n", "4", "--d", "3", "--widths", "4", "--seeds", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished ``gramnewton train`` run folder (config.toml, metrics.csv, checkpoint.pt); copy it to change it."""
    folder = tmp_path_factory.mktemp("plot")
    config = folder / "tiny.toml"
    config.write_text(TINY)
    assert main(["train", str(config), "--out", str(folder / "run"), "--set", "train.epochs=2"]) == 0
    return folder / "run"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n") if b"\r\n" in data else data.split(b"\n")


def _replace_field(data: bytes, line: int, column: int, value: bytes) -> bytes:
    """``data`` with field ``column`` of (1-based) ``line`` replaced by ``value``."""
    sep = b"\r\n" if b"\r\n" in data else b"\n"
    lines = _lines(data)
    fields = lines[line - 1].split(b",")
    fields[column] = value
    lines[line - 1] = b",".join(fields)
    return sep.join(lines)


def _drop_column(data: bytes, column: int) -> bytes:
    sep = b"\r\n" if b"\r\n" in data else b"\n"
    return sep.join(b",".join(f for i, f in enumerate(line.split(b",")) if i != column) for line in _lines(data))


def _append_field(data: bytes, line: int) -> bytes:
    sep = b"\r\n" if b"\r\n" in data else b"\n"
    lines = _lines(data)
    lines[line - 1] += b",7"
    return sep.join(lines)


SECONDS = 2  # the column of seconds in metrics.csv: epoch, step, seconds, ...


@pytest.mark.parametrize(
    "damage, named",
    [
        # were `wrote e.png`, exit 0, empty axes
        (lambda data: b"", "metrics.csv is empty"),
        (lambda data: _lines(data)[0] + b"\r\n", "metrics.csv has a header but no rows"),
        # were exit 0 and a category axis
        (lambda data: _replace_field(data, 3, SECONDS, b"abc"), "metrics.csv, line 3: seconds is 'abc', not a number"),
        (lambda data: _replace_field(data, 3, SECONDS, b""), "metrics.csv, line 3: seconds is empty, not a number"),
        # was `error: KeyError: 'seconds'`
        (lambda data: _drop_column(data, SECONDS), "metrics.csv, line 1: no seconds column in the header"),
        # were `error: TypeError: float() argument must be ... not 'NoneType'`
        (lambda data: _append_field(data, 3), "metrics.csv, line 3: 15 fields where the header has 14"),
        (lambda data: data + b"garbage\r\n", "metrics.csv, line 5: 1 field where the header has 14"),
        # was `error: 'utf-8' codec can't decode byte 0xff ...`, the file unnamed
        (lambda data: _replace_field(data, 3, SECONDS, b"\xff"), "metrics.csv, line 3: byte 0xff is not UTF-8 text"),
    ],
    ids=["empty", "header-only", "bad-number", "empty-field", "missing-column", "extra-field", "garbage", "non-utf8"],
)
def test_a_broken_metrics_csv_is_one_line_naming_the_file_and_line(tmp_path, capsys, finished_run, damage, named):
    run = copy_run(finished_run, tmp_path / "run")
    metrics = run / "metrics.csv"
    metrics.write_bytes(damage(metrics.read_bytes()))
    png = tmp_path / "e.png"
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(png)]) == 1
    error = one_line_error(capsys)
    assert named in error and str(metrics) in error
    assert not png.exists()  # no figure from a file that could not be read


def test_a_clean_metrics_csv_with_nan_diagnostics_still_plots(tmp_path, capsys, finished_run):
    """The strict reading refuses only what a run never writes: NaN (an SGD run's GGN diagnostics) is fine."""
    png = tmp_path / "ok.png"
    assert main(["plot", str(finished_run), "--diagnostics", "--out", str(png)]) == 0
    assert png.stat().st_size > 5_000


def drawn_curves(monkeypatch) -> dict:
    """The curves ``gramnewton plot`` draws (``{label: rows}``), recorded as it passes them on."""
    drawn = {}
    real = plot_command.plot_curves

    def record(curves, *args, **kwargs):
        drawn.update(curves)
        return real(curves, *args, **kwargs)

    monkeypatch.setattr(plot_command, "plot_curves", record)
    return drawn


def test_runs_sharing_a_name_get_a_line_each(tmp_path, capsys, finished_run, monkeypatch):
    """Two run folders of the config ``name = "tiny"`` left one line: the curves were keyed by the
    name, the later run replacing the earlier."""
    first, second = copy_run(finished_run, tmp_path / "a"), copy_run(finished_run, tmp_path / "b")
    drawn = drawn_curves(monkeypatch)
    assert main(["plot", str(first), str(second), "--out", str(tmp_path / "two.png")]) == 0
    assert sorted(drawn) == [f"tiny ({first})", f"tiny ({second})"]
    # a run with a name of its own keeps the bare name; the same folder twice is numbered
    assert run_labels([first, first, tmp_path / "plain"]) == [
        f"tiny ({first})",
        f"tiny ({first}) #2",
        "plain",
    ]


def test_reproduce_curves_of_runs_sharing_a_name_are_all_kept(tmp_path, finished_run):
    """``gramnewton reproduce`` keyed its figures' curves by config name too: of two runs named
    ``tiny`` the later replaced the earlier (it now labels runs as ``gramnewton plot`` does)."""
    first, second = copy_run(finished_run, tmp_path / "a"), copy_run(finished_run, tmp_path / "b")
    curves = load_curves([first, second])
    assert list(curves) == [f"tiny ({first})", f"tiny ({second})"]
    losses = [[row["train_loss"] for row in rows] for rows in curves.values()]
    assert losses[0] == losses[1] and len(losses[0]) > 1


def test_plot_prints_the_file_it_writes(tmp_path, capsys, finished_run):
    """``--out r/notes`` wrote ``r/notes.png`` but printed ``wrote r/notes``."""
    run = copy_run(finished_run, tmp_path / "run")
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(run / "notes")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'notes.png'}"
    assert (run / "notes.png").is_file() and not (run / "notes").exists()
    before = snapshot(run)
    # a folder, or a suffix matplotlib cannot write (the run's own metrics.csv), is refused up front
    assert main(["plot", str(run), "--out", str(run)]) == 1
    assert "is a folder: name the PNG to write" in one_line_error(capsys)
    assert main(["plot", str(run), "--out", str(run / "metrics.csv")]) == 1
    assert "matplotlib writes no .csv files" in one_line_error(capsys)
    assert snapshot(run) == before


def test_plot_draws_the_accuracy_of_a_classification_run(tmp_path, capsys, monkeypatch):
    """Was: ``error: argument --metric: invalid choice: 'test_accuracy'``: a classification run's
    accuracy columns could not be plotted."""
    config = tmp_path / "digits.toml"
    config.write_text(TINY.replace('"rotated-digits"', '"digits"'))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    drawn = drawn_curves(monkeypatch)
    png = tmp_path / "accuracy.png"
    assert main(["plot", str(tmp_path / "run"), "--metric", "test_accuracy", "--log", "--out", str(png)]) == 0
    accuracies = [row["test_accuracy"] for row in drawn["tiny"]]
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies) and png.is_file()


@pytest.mark.parametrize("metric", ["val_loss", "test_accuracy"])
def test_a_metric_no_run_has_is_one_line(tmp_path, capsys, finished_run, metric):
    """Was: ``wrote e.png``, exit 0, an empty panel (a regression run without a validation split
    has no val_loss and no accuracy)."""
    png = tmp_path / "e.png"
    capsys.readouterr()
    assert main(["plot", str(finished_run), "--metric", "train_loss", "--metric", metric, "--out", str(png)]) == 1
    assert f"no run given has a {metric} column" in one_line_error(capsys)
    assert not png.exists()


def test_theory_refuses_an_occupied_out_unless_overwrite(tmp_path, capsys, finished_run):
    """``theory quadratic --out th`` replaced an earlier quadratic.json/.png, and wrote into a
    training run folder, without a word; like ``train --out`` it now needs ``--overwrite``."""
    th = tmp_path / "th"
    assert main([*QUADRATIC, "--out", str(th)]) == 0
    before = snapshot(th)
    capsys.readouterr()
    assert main([*QUADRATIC, "--seed", "1", "--out", str(th)]) == 1
    assert f"{th} already holds quadratic.json and quadratic.png" in one_line_error(capsys)
    assert snapshot(th) == before
    # another study's files beside it are no conflict
    minibatch = ["theory", "minibatch", "--n", "4", "--d", "3", "--batch-size", "2", "--widths", "4", "--epochs", "2"]
    assert main([*minibatch, "--out", str(th)]) == 0
    run = copy_run(finished_run, tmp_path / "run")
    kept = snapshot(run)
    capsys.readouterr()
    assert main([*QUADRATIC, "--out", str(run)]) == 1
    assert f"{run} holds a training run (config.toml, metrics.csv, checkpoint.pt)" in one_line_error(capsys)
    assert snapshot(run) == kept
    assert main([*QUADRATIC, "--out", str(run / "config.toml")]) == 1
    assert "is a file, not a folder" in one_line_error(capsys)
    assert snapshot(run) == kept
    # --overwrite replaces the earlier study, and writes beside a run without touching its files
    assert main([*QUADRATIC, "--seed", "1", "--out", str(th), "--overwrite"]) == 0
    assert (th / "quadratic.json").read_bytes() != before["quadratic.json"]
    assert main([*QUADRATIC, "--out", str(run), "--overwrite"]) == 0
    assert {name: data for name, data in snapshot(run).items() if name in kept} == kept


def test_an_incomplete_theory_study_beside_a_run_resumes_without_overwrite(tmp_path, monkeypatch, finished_run):
    """A study written beside a training run with ``--overwrite`` and cut short resumes when rerun
    without it (the study's own file is what is there to resume), the run's files untouched;
    its rerun with ``--overwrite`` resumes too instead of redoing the finished jobs."""
    run = copy_run(finished_run, tmp_path / "run")
    kept = snapshot(run)
    two = [*QUADRATIC, "--widths", "4,5", "--seeds", "2"]
    with monkeypatch.context() as patch:
        fail_at(patch, "quadratic_run", 2, KeyboardInterrupt())
        assert main([*two, "--out", str(run), "--overwrite"]) == 130
    with monkeypatch.context() as patch:
        calls = fail_at(patch, "quadratic_run", 2, KeyboardInterrupt())
        assert main([*two, "--out", str(run)]) == 130
    assert len(calls) == 2  # job 2 then job 3 (interrupted)
    with monkeypatch.context() as patch:
        calls = fail_at(patch, "quadratic_run", 0, RuntimeError("never"))
        assert main([*two, "--out", str(run), "--overwrite"]) == 0
    assert len(calls) == 2
    assert {name: data for name, data in snapshot(run).items() if name in kept} == kept
    assert json.loads((run / "quadratic.json").read_text())["complete"] is True
