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
