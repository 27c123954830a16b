"""``gramnewton demo`` and ``gramnewton reproduce``: what the table reads, what the sweep picks on,
which folders they write into, and what a failing run leaves."""

from __future__ import annotations

import argparse
import copy
import math
import types

import pytest
import torch

from gramnewton import GramGaussNewton, NonFiniteError
from gramnewton.lab.cli import main
from gramnewton.lab.commands import demo as demo_command
from gramnewton.lab.commands import reproduce as reproduce_command
from gramnewton.lab.experiments import demo, training
from gramnewton.lab.experiments.config import dumps
from gramnewton.lab.experiments.demo import DemoConfig
from gramnewton.lab.experiments.metrics import read_rows, write_rows
from gramnewton.lab.experiments.training import EpochRecord


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


class Stop(Exception):
    """Raised by a spy once it has seen what it needs: the run goes no further."""


def test_the_demos_ggn_is_the_constructors_defaults(monkeypatch):
    """The regression demo's GGN is the object ``GramGaussNewton(model)`` a user gets: same class,
    ``defaults`` and every plain setting (the factory adds nothing)."""
    built = []

    def spy(spec, model):
        built.append((build(spec, model), GramGaussNewton(copy.deepcopy(model))))
        raise Stop

    build = demo.build_optimizer
    monkeypatch.setattr(demo, "build_optimizer", spy)
    with pytest.raises(Stop):
        demo.run_demo(DemoConfig("rotated-digits", seconds=1.0), {"GGN": demo.DEMO_SETTINGS["GGN"]})
    optimizer, user = built[0]
    assert type(optimizer) is GramGaussNewton and optimizer.defaults == user.defaults

    def settings(o):
        plain = (bool, int, float, str, type(None), torch.dtype)
        return {k: v for k, v in vars(o).items() if not k.startswith("_") and isinstance(v, plain)}

    assert settings(optimizer) == settings(user) and len(settings(user)) >= 8


class FakeClock:
    """``time`` for :func:`~gramnewton.lab.experiments.training.fit` alone: every step takes
    exactly ``step`` training seconds (fit reads the clock before and after each step)."""

    def __init__(self, step: float):
        self.step, self.calls = step, 0

    def perf_counter(self) -> float:
        self.calls += 1
        return (self.calls // 2) * self.step


def test_each_mark_reads_the_evaluation_at_the_first_step_past_it(monkeypatch, capsys):
    """The every-``mark`` table (docs/convergence.md: "the first evaluation past each mark"), with
    each step exactly 0.375 s: the mark at m reads the model after step ceil(m / 0.375), whose
    train and test MSE are those of a full evaluation of it; the run ends at the first step past
    the budget, so the last mark is read too."""
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=FakeClock(0.375).perf_counter))
    config = DemoConfig("rotated-digits", batch_size=32, seconds=2.0, max_epochs=5, mark=0.5)
    logs = demo.run_demo(config, {"Adam": {"lr": 1e-3}})
    records = logs["Adam"]
    assert records[-1].seconds == 2.25 and records[-1].step == 6
    marks = [0.5, 1.0, 1.5, 2.0]
    read = [demo.at_mark(records, m) for m in marks]
    assert [r.step for r in read] == [math.ceil(m / 0.375) for m in marks] == [2, 3, 4, 6]
    assert [r.seconds for r in read] == [0.75, 1.125, 1.5, 2.25]
    # every step past a mark was evaluated there (not the epoch's running loss): finite, distinct
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.test_loss) for r in read)
    demo_command.print_marks(logs, config)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Adam"))
    assert row.split()[1:] == [part for r in read for part in (f"{r.train_loss:.4f}", f"({r.test_loss:.4f})")]


def test_marks_past_a_divergence_read_nan_and_past_the_last_epoch_a_dash(capsys):
    """A run that diverged at 25 s (its log ends with run_demo's NaN record) showed ``-`` at 30 s,
    the sign of a run that ran out of epochs before the mark: a reader comparing the marks dropped
    the mark instead of counting it lost. Now it reads ``nan``; a run out of epochs still ``-``."""

    def record(seconds, loss):
        return EpochRecord(1, int(seconds), seconds, math.nan, loss, loss)

    logs = {
        "GGN": [record(0.0, 0.5), record(10.2, 0.2), record(20.1, 0.1), record(25.0, math.nan)],
        "SGD": [record(0.0, 0.5), record(10.1, 0.3), record(15.0, 0.25)],
        "Adam": [record(0.0, 0.5), record(10.1, 0.3), record(20.3, 0.2), record(30.2, 0.15)],
    }
    demo_command.print_marks(logs, DemoConfig(seconds=30.0, mark=10.0))
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["GGN"] == ["0.2000", "(0.2000)", "0.1000", "(0.1000)", "nan", "(nan)"]
    assert rows["SGD"] == ["0.3000", "(0.3000)", "-", "-"]
    assert rows["Adam"][-2:] == ["0.1500", "(0.1500)"]


def test_ctrl_c_during_the_demo_leaves_the_earlier_demo_as_it_was(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the optimizers train: one line, status 130, the earlier demo's files untouched
    (nothing is written before every run has finished)."""
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("metrics.csv", "curves.png"):
        (out / name).write_text(name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_command, "run_demo", interrupted)
    assert main(["demo", "--dataset", "rotated-digits", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert {p.name: p.read_text() for p in out.iterdir()} == {"metrics.csv": "metrics.csv", "curves.png": "curves.png"}


def test_a_folder_of_an_earlier_sweep_demo_is_replaced_not_refused(tmp_path):
    """``gramnewton demo --sweep`` writes sweep.csv beside metrics.csv and curves.png; the next
    demo in that folder (``make demo`` again, or the same command) was refused: "holds other files
    than a demo's (sweep.csv)". A folder with anything else is still refused."""
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("metrics.csv", "curves.png", "sweep.csv"):
        (out / name).write_text("x")
    demo_command.check_demo_folder(out)
    (out / "checkpoint.pt").write_text("x")
    with pytest.raises(ValueError, match=r"holds other files than a demo's \(checkpoint.pt\)"):
        demo_command.check_demo_folder(out)


def test_the_classification_sweep_picks_on_training_data_alone(tmp_path, monkeypatch):
    """The sweep's winner of each optimizer is the lowest final training loss, for classification
    too: it picked the highest final test accuracy, the number the demo's table then reports, so
    the test split chose the settings it judged (here SGD lr=0.1 over lr=0.003, whose training
    cross-entropy is 3x lower)."""
    train_loss = {0.003: 0.1, 0.1: 0.3}  # SGD: lr -> final train CE; test accuracy the other way
    test_accuracy = {0.003: 0.90, 0.1: 0.95}

    def fake_run_demo(config, settings, progress=None):
        ((name, hp),) = settings.items()
        lr = hp.get("lr", 0.003)
        final = EpochRecord(1, 10, 1.0, 0.2, train_loss.get(lr, 0.5), 0.4, 0.9, test_accuracy.get(lr, 0.5))
        return {name: [final]}

    monkeypatch.setattr(demo_command, "run_demo", fake_run_demo)
    args = argparse.Namespace(out=tmp_path, sweep_seconds=1.0)
    winners = demo_command.sweep(args, DemoConfig("digits", task="classification"))
    assert winners["SGD"] == {"lr": 0.003}
    rows = read_rows(tmp_path / "sweep.csv")
    assert "train_loss" in rows[0] and {r["train_loss"] for r in rows if r["optimizer"] == "SGD"} >= {0.1, 0.3}


@pytest.mark.parametrize(
    "args, named",
    [
        (["--dataset", "digits"], "digits is a classification data set: run it with --task classification"),
        (
            ["--task", "classification", "--dataset", "rotated-digits"],
            "rotated-digits is a regression data set: run it with --task regression",
        ),
    ],
)
def test_a_data_set_of_the_other_task_names_the_fix(tmp_path, capsys, args, named):
    """The regression demo on a classification data set (or the reverse) failed at GGN's first step
    with "set loss = 'cross_entropy' in the optimizer's settings", which the demo has no way to
    do; now one line names --task, before any training, nothing written."""
    out = tmp_path / "demo"
    assert main(["demo", *args, "--seconds", "0.1", "--out", str(out)]) == 1
    assert named in one_line_error(capsys)
    assert not out.exists()


def fake_trainer(calls, fail=None):
    """A stand-in for ``train_with_progress``: writes the run's config.toml and a metrics.csv whose
    last row is its last epoch (as a finished run's), then raises for the run ``fail`` (a run that
    diverged after writing its rows)."""

    def train(config, folder, *, resume, overwrite, desc=""):
        calls.append(folder.name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(dumps(config))
        rows = [
            {"epoch": e, "step": e, "seconds": float(e), "train_loss": 1 / (e + 1), "test_loss": 1 / (e + 1)}
            for e in range(config["train"]["epochs"] + 1)
        ]
        write_rows(folder / "metrics.csv", rows)
        if folder.name == fail:
            raise NonFiniteError("64 of 64 outputs are NaN or Inf; no parameter was changed")
        return rows

    return train


def test_a_failing_run_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    """One run of ``reproduce`` that fails (diverges) stopped the command: the runs after it never
    ran, no summary.csv, no figure. Now it is reported on its line, the runs warm-started from it
    are not run (they would start from a failed run's weights), every other run goes on, the
    figures not needing it are drawn, and the command ends with one error line naming it."""
    calls: list[str] = []
    monkeypatch.setattr(reproduce_command, "train_with_progress", fake_trainer(calls, fail="rsna_ggn_fixup"))
    out = tmp_path / "rep"
    assert main(["reproduce", "fig1", "fig2", "fig3", "--test-budget", "--out", str(out)]) == 1
    error = one_line_error(capsys)
    assert (
        "1 of 7 runs did not finish (rsna_ggn_fixup; see above); rsna_ggn_fixup failed: 64 of 64" in error
        and "64 of 64 outputs are NaN" in error
    )
    assert "rsna_ggn_fixup" in calls and calls[-1] != "rsna_ggn_fixup" and len(calls) == 7
    summary = read_rows(out / "summary.csv")
    assert len(summary) == 6 and "rsna_ggn_fixup" not in {r["run"] for r in summary}
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["reproduce_fig3_afad-standin-rotated-digits.png"]
    # a failed warm-start source: its dependants are not run, and named
    calls.clear()
    monkeypatch.setattr(reproduce_command, "train_with_progress", fake_trainer(calls, fail="afad_ggn_fixup"))
    out = tmp_path / "rep2"
    assert main(["reproduce", "fig1", "--test-budget", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "rsna_ggn_fixup" not in calls and "rsna_sgd_fixup" not in calls and "rsna_sgd_bn" in calls
    assert "not run: it warm-starts from afad_ggn_fixup, which failed" in printed
    assert not (out / "rsna_ggn_fixup").exists()


def test_reproduce_does_not_replace_another_configs_run_without_overwrite(tmp_path, capsys, monkeypatch):
    """``reproduce --out runs`` where ``gramnewton train afad_ggn_fixup`` left its run (the paper's
    config, its checkpoint): it was replaced without a word ("the run folders under --out are
    reproduce's own"). Now that run is refused, its files unchanged, and the others go on;
    ``--overwrite`` replaces it."""
    out = tmp_path / "runs"
    mine = out / "afad_ggn_fixup"
    mine.mkdir(parents=True)
    config = reproduce_command.plan(["fig3"], reproduce_command.BUDGETS["test"], {}, out)[0].config
    (mine / "config.toml").write_text(dumps({**config, "seed": config["seed"] + 1}))
    (mine / "metrics.csv").write_text("epoch,train_loss\n0,1.0\n")
    torch.save({"model": {}}, mine / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    calls: list[str] = []
    real = reproduce_command.train_with_progress

    def train(config, folder, **kwargs):  # the real trainer for that folder only: its refusal
        return real(config, folder, **kwargs) if folder == mine else fake_trainer(calls)(config, folder, **kwargs)

    monkeypatch.setattr(reproduce_command, "train_with_progress", train)
    assert main(["reproduce", "fig3", "--test-budget", "--out", str(out)]) == 1
    assert "holds a run of another config: pick another --out, or --overwrite" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert calls == ["afad_sgd_fixup", "afad_sgd_bn"]
    monkeypatch.setattr(reproduce_command, "train_with_progress", fake_trainer(calls))
    assert main(["reproduce", "fig3", "--test-budget", "--out", str(out), "--overwrite"]) == 0
    assert calls[-1] == "afad_ggn_fixup" and "reproduce_fig3" in capsys.readouterr().out
