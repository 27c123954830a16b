"""The reporting of ``benchmarks/time_to_target.py`` (the tables of docs/benchmarks.md) and the
result files of ``benchmarks/results_log.py``, on small synthetic run records.

A record here has what a run's record has for the report: its ``curve`` of evaluations (seconds,
train and test MSE), ``initial_train``, ``failure``, the final losses, ``budget_s`` and ``config``.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TARGETS = (0.1, 0.01, 0.001)


@pytest.fixture
def ttt(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("time_to_target")


def run(
    times: tuple[float | None, ...] = (),
    final: float | None = None,
    failure: str | None = None,
    config: dict[str, Any] | None = None,
    evaluated: bool = True,
) -> dict[str, Any]:
    """A run whose train MSE (initial 1) is evaluated at 0.1, 0.01, 0.001 at ``times`` (None: not
    reached); ``evaluated=False``: a child that crashed or timed out before its first evaluation."""
    record: dict[str, Any] = {"config": config or {"batch": 1}, "budget_s": 10.0, "failure": failure, "curve": []}
    if not evaluated:
        return record
    curve = [{"seconds": 0.0, "steps": 0, "train_loss": 1.0, "test_loss": 1.0}]
    curve += [
        {"seconds": t, "steps": i + 1, "train_loss": f, "test_loss": 2 * f}
        for i, (t, f) in enumerate(zip(times, TARGETS, strict=False))
        if t is not None
    ]
    record.update(initial_train=1.0, curve=curve, params=61, peak_rss_mb=100.0, implementation="x")
    if failure != "oom":
        record["final_train"] = record["final_test"] = curve[-1]["train_loss"] if final is None else final
    return record


def task(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A task result whose every target took each optimizer's one configuration."""
    return {
        "description": "synthetic",
        "grid": {o: rs[:1] for o, rs in runs.items()},
        "best": {o: rs[0]["config"] for o, rs in runs.items()},
        "runs": runs,
        "target_runs": {o: {str(f): rs for f in TARGETS} for o, rs in runs.items()},
    }


def test_a_target_is_timed_at_the_first_evaluation_at_or_below_it(ttt: ModuleType) -> None:
    """Not interpolated, not at a later lower evaluation; a run whose evaluations stay above the
    target (by one ulp), or that has none, never reaches it."""
    record = run((0.5, 2.0))
    record["curve"].insert(2, {"seconds": 1.0, "steps": 2, "train_loss": 0.1, "test_loss": 0.3})
    assert [ttt.seconds_to(record, f) for f in TARGETS] == [0.5, 2.0, None]
    record["curve"][1]["train_loss"] = record["curve"][2]["train_loss"] = math.nextafter(0.1, 1.0)
    assert ttt.seconds_to(record, 0.1) == 2.0  # the first at or below it, 0.01 at 2 s
    assert ttt.seconds_to(run(evaluated=False), 0.1) is None


def test_a_seed_that_never_gets_there_makes_the_median_later_not_shorter(ttt: ModuleType) -> None:
    """Per target: the configuration with the lowest median over seeds, a seed that did not reach
    counting as infinitely late (with 10 seeds, 5 reaching: the median is not reached)."""
    fast = [run((0.1,)), run(()), run(())]  # 1 of 3 seeds at 0.1 s, not 0.1 s in the median
    steady = [run((0.3,)) for _ in range(3)]
    assert ttt.median_or_none([ttt.seconds_to(r, 0.1) for r in fast]) is None
    assert ttt.median_or_none([ttt.seconds_to(r, 0.1) for r in fast[:2] + steady[:1]]) == 0.3
    assert ttt.fastest_to([fast, steady], 0.1) is steady
    assert ttt.median_or_none([1.0] * 5 + [None] * 5) is None and ttt.median_or_none([1.0] * 6 + [None] * 4) == 1.0
    failed = [run((0.05,)), run((0.05,)), run((0.05,), failure="nan")]  # a failed run rules its configuration out
    assert ttt.fastest_to([failed, steady], 0.1) is steady


def test_final_losses_count_a_failed_seed_as_infinitely_high(ttt: ModuleType) -> None:
    """A seed that diverged (NaN) made the median NaN, 0.1 or 0.2 by the seeds' order
    (``statistics.median`` does not sort a NaN), and seeds out of memory were left out: one
    surviving seed of three was reported as the median. Now a failed run counts as infinitely
    high, whatever the order."""
    for order in ((0.1, math.nan, 0.2), (math.nan, 0.1, 0.2), (0.1, 0.2, math.nan)):
        runs = [run((1.0,), final=v, failure="nan" if math.isnan(v) else None) for v in order]
        row = ttt.summarise(task({"ggn": runs}))["ggn"]
        assert row["final_train"] == row["final_test"] == 0.2
    runs = [run((1.0,), final=0.05), run((1.0,), failure="oom"), run(failure="timeout", evaluated=False)]
    row = ttt.summarise(task({"ggn": runs}))["ggn"]
    assert row["final_train"] is None and row["final_test"] is None
    assert "| - | - |" in "\n".join(ttt.render_task("t", task({"ggn": runs})))


def test_best_test_counts_a_seed_without_an_evaluation(ttt: ModuleType) -> None:
    """The lowest test MSE at the evaluations and the seconds at its first; a seed that crashed
    before evaluating was left out (one seed of three made the median), now counts as never."""
    record = run((0.5, 2.0))
    record["curve"].append({"seconds": 3.0, "steps": 3, "train_loss": 0.001, "test_loss": 0.02})
    assert ttt.best_test(record) == (0.02, 2.0)  # 0.02 first at 2 s, again at 3 s
    crashed = run(failure="timeout", evaluated=False)
    assert ttt.median_best_test([record, crashed, crashed]) == {"best_test": None, "best_test_s": None}
    assert ttt.median_best_test([record, record, crashed]) == {"best_test": 0.02, "best_test_s": 2.0}


def test_the_summary_compares_ggn_with_the_fastest_other_method(ttt: ModuleType) -> None:
    """Each column's ratio is the column's fastest method over GGN, cut at the printed digits, and
    a method that did not reach reads ``>Nx`` with N = budget / GGN's time, cut."""
    results = {
        "t": task(
            {
                "ggn": [run((0.3, 1.0, 3.0))] * 3,
                "tlm": [run((0.6, 2.999))] * 3,
                "lbfgs": [run((0.45,))] * 3,
                "adam": [run((0.9,))] * 3,
                "sgd": [run((1.2, 9.0))] * 3,
            }
        )
    }
    assert ttt.summary_table(results)[2:] == [
        "| t | 0.1 | 0.3 | 2.00x | 3.00x (Adam) | 1.50x (L-BFGS) |",
        "| t | 0.01 | 1 | 2.99x | 9.00x (SGD) | 2.99x (TLM) |",
        "| t | 0.001 | 3 | >3.33x | >3.33x | >3.33x |",
    ]


def test_the_best_other_method_reads_oom_only_when_every_one_ran_out(ttt: ModuleType) -> None:
    """When no other method reached a target, "best of all others" took TLM's cell: ``OOM`` if
    TLM ran out of memory, although Adam ran its whole budget without reaching it (``>Nx``)."""
    runs = {
        "ggn": [run((1.0, 2.0, 3.0))] * 3,
        "tlm": [run(failure="oom")] * 3,
        "adam": [run(())] * 3,
    }
    rows = ttt.summary_table({"t": task(runs)})[2:]
    assert rows[0] == "| t | 0.1 | 1 | OOM | >10x | >10x |"
    del runs["adam"]
    assert ttt.summary_table({"t": task(runs)})[2] == "| t | 0.1 | 1 | OOM | - | OOM |"


def test_the_report_is_drawn_when_the_first_method_crashed(ttt: ModuleType) -> None:
    """A first seed of GGN killed before it wrote its record (timeout, a signal) has no parameter
    count: the task's section raised a TypeError, so the hour's results could not be reported,
    nor redrawn with --report-only."""
    results = {"t": task({"ggn": [run(failure="timeout", evaluated=False)], "adam": [run((1.0,))]})}
    text = ttt.render_markdown(results, {})
    assert "Parameters: 61;" in text and "| GGN | `" in text and "timeout" in text


def test_the_report_of_a_run_is_what_report_only_redraws_from_its_json(
    ttt: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON keeps 6 significant digits; the report written after a run was drawn from the
    unrounded times, so a ratio of 1.4999996 read "1.49x" there and "1.50x" from the JSON."""
    monkeypatch.setattr(ttt, "RESULTS", tmp_path / "results.json")
    monkeypatch.setattr(ttt, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(ttt, "FIGURES", tmp_path / "figures")
    monkeypatch.setattr(ttt, "reexec_with", lambda env: None)
    monkeypatch.setattr(ttt, "preload", lambda: None)
    monkeypatch.setattr(ttt, "plot_task", lambda name, task_result: None)
    result = task({"ggn": [run((0.1,))] * 3, "adam": [run((0.1 * 1.4999996,))] * 3})
    monkeypatch.setattr(ttt, "run_task", lambda *args: json.loads(json.dumps(result)))
    monkeypatch.setattr(sys, "argv", ["time_to_target.py"])
    ttt.main(["--tasks", "sinc", "--optimizers", "ggn", "adam"])
    after_run = ttt.DOC.read_text()
    ttt.main(["--report-only"])
    assert ttt.DOC.read_text() == after_run
    assert "| sinc | 0.1 | 0.1 | - | 1.50x (Adam) | 1.50x (Adam) |" in after_run


def test_the_results_file_holds_each_run_once_and_reads_back_whole(
    ttt: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target's fastest configuration is mostly the best one and seed 0's run of each is the
    grid's, so the file held most runs four or five times (7 MB after sinc and concrete-10k on ten
    seeds); each task's runs are now stored once and referred to by index, and read back as they
    were; a file written before the pool still reads."""
    monkeypatch.setattr(ttt, "RESULTS", tmp_path / "results.json")
    ggn, adam = [run((0.1 * s, 0.2 * s), config={"lr": s}) for s in (1, 2)], [run((0.3,)), run((0.4,))]
    data = {"meta": {"host": "x"}, "tasks": {"t": task({"ggn": ggn, "adam": adam})}}
    ttt.save_results(data)
    stored = json.loads(ttt.RESULTS.read_text())["tasks"]["t"]
    assert len(stored["pool"]) == 4 and stored["target_runs"]["ggn"]["0.1"] == stored["runs"]["ggn"] == [0, 2]
    assert ttt.load_results() == data
    ttt.RESULTS.write_text(json.dumps(data))  # the format before the pool
    assert ttt.load_results() == data


def test_a_failed_write_keeps_the_earlier_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``append_record`` rewrote the file in place: a write that failed after opening it (a full
    disk) left it empty, every earlier record lost. Now the new list replaces it only once written."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    results_log = importlib.import_module("results_log")
    path = tmp_path / "records.json"
    results_log.append_record(path, {"run": 1, "host": {}})

    def full_disk(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        self.open("w").close()  # as Path.write_text opens the file: truncated, then the write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        results_log.append_record(path, {"run": 2, "host": {}})
    monkeypatch.undo()
    assert results_log.read_records(path) == [{"run": 1, "host": {}}]
    results_log.append_record(path, {"run": 2, "host": {}})
    assert [r["run"] for r in results_log.read_records(path)] == [1, 2]
