"""Each benchmark that calls the engine's internals runs end to end on a tiny configuration.

Not a measurement (the timings are thrown away): the scripts reach into the library (handlers'
signatures, pieces, the engine's timers) and nothing else runs them between sessions.
``benchmarks/kernels.py`` called the convolution handler with an argument removed a session
earlier, and ``benchmarks/engine_parts.py`` failed on a network whose Gram parts all come from
factors, both unnoticed until someone ran them. Each script writes its JSON record to a temporary
file only (an ``--out`` outside ``benchmarks/results`` regenerates no document).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

SCRIPTS = {
    "kernels": "kernels.py --rounds 1",
    "engine_parts": "engine_parts.py --model sinc --batch 8 --steps 3 --skip 1",
    "step_cost": "step_cost.py --models sinc --batch 8 --methods sgd ggn_fast --reps 1 --warmup 1 --no-memory "
    "--allocators system --alone 1",
    "user_models": "user_models.py --models raw_mlp gru_state --reps 1",
    "step_trace": "step_trace.py ggn:damping=gain_ratio,check_every=4,retries=1 --task digits --steps 3 --every 2",
    "demo_variants": "demo_variants.py GGN={} --seconds 1 --mark 0.25",
    "damping_floor": "damping_floor.py --task concrete --epochs 1 --floors 1000 --seeds 0",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_benchmark_script_runs(name: str, tmp_path: Path) -> None:
    script, *args = SCRIPTS[name].split()
    out = tmp_path / "record.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.read_text())
    assert records, f"{script} wrote no record"
    if name == "step_cost":  # --alone 1: one process per method, their ratio
        (run,) = records["sinc/b8"]
        assert len(run["alone"]["ratio_per_round"]) == 1 and run["alone"]["ratio"] > 0
    else:
        run = records[-1]
    if name == "demo_variants":  # the whole curve, denser than the marks, to read the run on another clock
        assert len(run["curve"]) > 2 and all(len(row) == 4 for row in run["curve"])
    # which machine it ran on (timings compare only between records of one CPU)
    assert run["host"]["cpu"] and run["host"]["cpus"] >= 1 and run["host"]["torch"] == torch.__version__


@pytest.mark.parametrize(
    "script, argv",
    [
        ("time_to_target", ["--tasks", "sinc", "--optimizers", "ggn", "tlm"]),
        ("target_probe", ["--task", "sinc", "--configs", '[["tlm", {"batch": 100}]]']),
    ],
)
def test_a_missing_tlm_baseline_is_refused_up_front(
    script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without torch-levenberg-marquardt (the ``bench`` extra, which ``make`` does not install)
    every TLM run failed on its import and was recorded as never reaching a target; now the
    command stops before any run with the install hint."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    ttt = importlib.import_module("time_to_target")
    monkeypatch.setattr(ttt, "tlm_available", lambda: True)
    assert module.parse_args(argv)  # accepted where the package is found
    monkeypatch.setattr(ttt, "tlm_available", lambda: False)
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    assert "pip install -e '.[bench]'" in capsys.readouterr().err


def test_the_step_floor_keeps_the_layers_the_engine_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``step_cost.py``'s floor charges ``J^T r`` to the convolutions the engine keeps as ``(x, g)``:
    on ResNet-32-Fixup at 32x32 the nine 64-channel stride-1 layers (docs/performance.md), at 64x64
    none; the handler decides, so a changed memory rule changes the floor with it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    step_cost = importlib.import_module("step_cost")
    model = step_cost.MODELS["fixup32"].build()
    kept = step_cost.kept_convolutions(model, torch.randn(2, 3, 32, 32))
    assert len(kept) == 9
    assert all(p.module.in_channels == p.module.out_channels == 64 and p.module.stride == (1, 1) for p in kept)
    assert step_cost.kept_convolutions(model, torch.randn(2, 3, 64, 64)) == []
    parts = step_cost.floor_parts(model, torch.randn(2, 3, 32, 32))
    assert set(parts) == {"gram_products", "kept_jt"}
    for part in parts.values():
        part()


def test_demo_variants_draws_the_records_of_its_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo_variants.py --figure`` without variants draws the records of ``--seed`` and
    ``--shift`` that have a curve, reads each at ``--level``, and refuses in one line when there is
    no such record."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    demo_variants = importlib.import_module("demo_variants")
    curve = [[5.0, 1.5, 0.2, 0.3], [10.0, 3.0, 0.1, 0.25]]
    records = [
        dict(label="GGN", seed=0, shift=0, seconds=10.0, curve=curve),
        dict(label="Adam", seed=0, shift=0, seconds=10.0, curve=[*curve, [15.0, 4.5, 0.05, 0.2]]),
        dict(label="GGN", seed=1, shift=0, seconds=10.0, curve=curve),
        dict(label="GGN", seed=0, shift=2, seconds=10.0, curve=curve),
        dict(label="GGN", dataset="rotated-digits", seed=0, shift=0, seconds=10.0, curve=curve),
        dict(label="old", seed=0, shift=0),  # before the curves were recorded
    ]
    out, figure = tmp_path / "runs.json", tmp_path / "paths.png"
    out.write_text(json.dumps(records))
    monkeypatch.setattr(sys, "argv", ["demo_variants.py", "--out", str(out), "--figure", str(figure)])
    demo_variants.main()
    printed = capsys.readouterr().out
    assert "(2 runs)" in printed and figure.stat().st_size > 0
    assert "train MSE 0.1000" in printed and "0.2500 at 10.0 s" in printed  # the lowest level both reached
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--level", "0.05"])
    demo_variants.main()
    assert "not in 10 s" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["demo_variants.py", "--out", str(out), "--figure", str(figure), "--seed", "3"])
    with pytest.raises(SystemExit):
        demo_variants.main()
    assert "no record with a curve on rotated-mnist, seed 3" in capsys.readouterr().err


def test_demo_variants_reads_a_curve_where_its_train_mse_first_reaches_a_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path's reading: the first crossing, interpolated in log train MSE; None if never reached."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    where = importlib.import_module("demo_variants").where_train_reaches
    curve = [[5.0, 1.0, 0.2, 0.3], [10.0, 2.0, 0.05, 0.2], [15.0, 3.0, 0.1, 0.9], [20.0, 4.0, 0.01, 0.5]]
    assert where(curve, 0.1) == pytest.approx((7.5, 0.25))  # halfway from 0.2 to 0.05 in log
    assert where(curve, 0.2) == (5.0, 0.3) and where(curve, 0.01) == pytest.approx((20.0, 0.5))
    assert where(curve, 0.005) is None


def test_time_to_target_never_rounds_a_ratio_across_the_issues_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """sinc's 1e-1 pair measured 1.494x and the report printed "1.5x": a ratio is now cut, never
    rounded up, so no ratio under the issue's 1.5x is shown at or above it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ttt = importlib.import_module("time_to_target")
    cell, text = ttt.ratio_cell, ttt.ratio_text
    assert cell(0.0448, 0.0669, 10.0, False) == "1.49x" and text(1.4999) == "1.49x" and text(1.5) == "1.50x"
    assert text(3 * 0.5) == "1.50x" and text(0.3 / 0.2) == "1.50x"  # 1.4999999999999998 is 1.5
    assert cell(0.0626, 0.1258, 10.0, False) == "2.00x" and cell(0.315, 9.98, 10.0, False) == "31x"
    assert text(158.7) == "158x"  # not "1.6e+02x"
    assert cell(0.17, None, 10.0, False) == ">58x" and cell(None, 0.2, 10.0, False) == "GGN never"
    assert cell(0.1, None, 10.0, True) == "OOM" and cell(None, None, 10.0, False) == "neither"


def test_a_warm_up_leaves_the_timed_run_as_a_cold_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``target_probe.py --warm-up`` times a run in a process that has taken steps of its own
    configuration on another seed's model first (:func:`time_to_target.warm_up`, then the child's
    own seeding, as in ``run_child``); the timed run must then take the very steps a fresh process
    takes, or warm and cold differ in more than the process's one-time costs: nothing the warm-up
    leaves behind (torch's settings, a cache keyed by the freed model's id) may reach it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    ttt = importlib.import_module("time_to_target")
    from gramnewton.lab.experiments.training import fit

    task = ttt.TASKS["sinc"]
    train, _ = task.data()
    config = {"batch": 500, "lam": 1.0, "momentum": 0.8, "alpha": 0.3, "adaptive_damping": False}

    def timed_run(warm: bool) -> torch.Tensor:
        if warm:
            state = ttt.warm_up(task, train, {"optimizer": "ggn", "config": config, "seed": 3, "warm_up_steps": 2})
            assert state.step == 2
        torch.manual_seed(3)
        model = task.model()
        step, _ = ttt.make_step("ggn", model, config)
        fit(step, train, batch_size=500, seed=3, epochs=1, callbacks=[ttt._StopAfter(3)])
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    cold = timed_run(warm=False)
    assert torch.equal(timed_run(warm=True), cold)


def test_race_steps_splits_a_race_into_its_first_step_and_the_later_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``race_steps.py`` reads a time_to_target result: per method and target the steps to it,
    the first step's seconds and each later step's, and that step over the baseline's; a seed
    that never reached the target is left out of the medians, not counted as zero."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    race_steps = importlib.import_module("race_steps")

    def run(seconds_per_step: float, first: float, steps: int, reach_at: int | None) -> dict:
        curve = [{"seconds": 0.0, "steps": 0, "train_loss": 1.0}]
        for s in range(1, steps + 1):
            loss = 0.05 if reach_at is not None and s >= reach_at else 0.5
            curve.append({"seconds": first + (s - 1) * seconds_per_step, "steps": s, "train_loss": loss})
        return {"config": {"batch": 8}, "initial_train": 1.0, "curve": curve}

    ggn = [run(0.002, 0.010, 6, 4), run(0.002, 0.012, 6, 6), run(0.002, 0.010, 6, None)]
    adam = [run(0.0005, 0.005, 40, 30)]
    document = {
        "meta": {"host": {"cpu": "a CPU"}, "git": "abc1234"},
        "tasks": {"toy": {"target_runs": {"ggn": {"0.1": ggn}, "adam": {"0.1": adam}}}},
    }
    path = tmp_path / "time_to_target.json"
    path.write_text(json.dumps(document))

    rows = race_steps.summary(document["tasks"]["toy"])
    assert rows["ggn"]["0.1"]["reached"] == 2 and rows["ggn"]["0.1"]["seeds"] == 3
    assert rows["ggn"]["0.1"]["steps"] == 5 and rows["ggn"]["0.1"]["first"] == pytest.approx(0.011)
    assert rows["ggn"]["0.1"]["per_step"] == pytest.approx(0.002)
    assert rows["adam"]["0.1"]["per_step"] == pytest.approx(0.0005)

    race_steps.main(["--task", "toy", str(path)])
    printed = capsys.readouterr().out
    assert "a CPU" in printed and "2 of 3" in printed
    ggn_line = next(line for line in printed.splitlines() if line.strip().startswith("ggn"))
    assert ggn_line.split()[8:10] == ["2.00", "4.00"]  # its later step in ms, and in Adam steps


@pytest.mark.slow
def test_validation_sweeps_runs_each_methods_grid_and_a_rerun_reads_the_finished_sweeps(tmp_path: Path) -> None:
    """One (task, seed) on grids given by the flags: two GGN axes (their product), one Adam axis,
    two validation folds, each choice's fold models averaged and the choice refit; the record names
    the grids and holds every point, the averages and the refits, what fold 0 alone would choose is printed, and a rerun trains nothing (``--resume``)."""
    record = tmp_path / "record.json"
    argv = [
        sys.executable,
        str(BENCHMARKS / "validation_sweeps.py"),
        "--tasks=diabetes",
        "--seeds=0",
        "--seconds=0.2",
        f"--out={tmp_path / 'sweeps'}",
        f"--record={record}",
        "--ggn-grid=optimizer.lam=[16, 1]",
        "--ggn-grid=optimizer.adaptive_damping.min_alpha=[1e-8, 1e5]",
        "--adam-grid=optimizer.lr=[1e-2]",
        "--folds=2",
        "--refit",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "chosen GGN / chosen Adam test" in done.stdout and "median over seeds" in done.stdout
    assert "diabetes seed 0 fold 0 alone: ggn 0" in done.stdout and "each chosen on fold 0 alone" in done.stdout
    (run,) = json.loads(record.read_text())
    assert run["grids"] == {
        "ggn": ["optimizer.lam=[16, 1]", "optimizer.adaptive_damping.min_alpha=[1e-8, 1e5]"],
        "adam": ["optimizer.lr=[1e-2]"],
    }
    assert len(run["sweeps"]["ggn"]) == 4 and len(run["sweeps"]["adam"]) == 1
    assert {(r["optimizer.lam"], r["optimizer.adaptive_damping.min_alpha"]) for r in run["sweeps"]["ggn"]} == {
        (16, 1e-8),
        (16, 1e5),
        (1, 1e-8),
        (1, 1e5),
    }
    assert all(sum(r["chosen"] for r in rows) == 1 for rows in run["sweeps"].values())
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweeps").rglob("checkpoint.pt")}
    assert "diabetes seed 0 refit on all training rows: ggn test" in done.stdout
    assert "diabetes seed 0 the 2 fold models averaged: ggn test" in done.stdout
    for method, rows in run["sweeps"].items():  # a mean prediction's MSE is at most its members' mean MSE
        chosen = next(r for r in rows if r["chosen"])
        assert 0 < run["ensemble"][method] <= chosen["test_loss"] * (1 + 1e-6)  # float32 predictions
    assert set(run["refit"]) == {"ggn", "adam"} and all(r["epochs"] >= 1 for r in run["refit"].values())
    assert len(checkpoints) == 12 and run["folds"] == 2  # (4 GGN points + 1 Adam point) x 2 folds, 2 refits
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints  # no point trained again
    assert json.loads(record.read_text())[1]["sweeps"] == run["sweeps"]
    # fold_ensembles.py reads the finished sweep: its members alone and their predictions averaged
    averaged = tmp_path / "averaged.json"
    sweep = tmp_path / "sweeps" / "diabetes-ggn-0"
    argv = [sys.executable, str(BENCHMARKS / "fold_ensembles.py"), str(sweep), f"--record={averaged}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (ensemble,) = json.loads(averaged.read_text())
    chosen = next(r for r in run["sweeps"]["ggn"] if r["chosen"])
    assert ensemble["point"] == chosen["point"] and ensemble["folds"] == 2
    assert set(ensemble["test"]) == {"folds' mean", "outputs"}  # no probabilities for a regression
    assert ensemble["test"]["folds' mean"]["loss"] == pytest.approx(chosen["test_loss"])
    assert ensemble["test"]["outputs"]["loss"] == pytest.approx(run["ensemble"]["ggn"])
