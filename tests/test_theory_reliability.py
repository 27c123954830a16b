"""The theory studies against brute force and bad input: the NTK limit ``K`` of every activation
against the width-``M`` Gram matrix (a Monte Carlo mean, tolerance from its standard error),
Theorem 1's quadratic rate, singular ``K`` or ``G_0``, and ``gramnewton theory`` inputs that
ended a study without its results (rows of "The theory studies" in docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from dense import assert_same_run, seeded
from test_lab_reliability import one_line_error, snapshot

from gramnewton.lab.cli import main
from gramnewton.lab.commands import theory as theory_command
from gramnewton.lab.theory import (
    TwoLayerEngine,
    best_sgd_rate,
    ntk_limit,
    run_full_batch,
    seeded_two_layer,
    sphere_data,
)
from gramnewton.lab.theory.activation import activation_derivative
from gramnewton.lab.theory.ntk import least_eigenvalue, positive_lambda_0

QUADRATIC = ["theory", "quadratic", "--n", "8", "--d", "3", "--widths", "4,5", "--seeds", "1"]
MINIBATCH = ["theory", "minibatch", "--n", "16", "--d", "3", "--batch-size", "4", "--epochs", "4"]


@pytest.mark.parametrize("act", ["softplus", "tanh", "gelu", "relu"])
def test_ntk_limit_is_the_mean_of_the_finite_width_gram(act):
    """``G_0`` of the width-``M`` network (closed-form engine, checked against jacrev elsewhere) is a
    mean over ``M`` i.i.d. neurons of ``sigma'(w.x_i) sigma'(w.x_j) x_i.x_j``, whose expectation is
    ``K``: every entry within 5 standard errors. ReLU's ``K`` was off by up to 1.4e-2 (quadrature
    of a step function; ``lambda_0`` 10% low at n = 64, d = 10), 10 standard errors here."""
    width, n, d = 2**18, 6, 4
    x, y = sphere_data(n, d, seed=1)
    model = seeded_two_layer(d, width, act, seed=0)
    gram = TwoLayerEngine(model, x).compute(lambda: model(x).squeeze(1) - y).gram
    slopes = activation_derivative(model.act, x @ model.hidden.weight.detach().T)  # (n, M) samples
    inner = x @ x.T
    second = (slopes.square() @ slopes.square().T) / width
    std = (second - (slopes @ slopes.T / width).square()).clamp_min(0).sqrt()
    standard_error = inner.abs() * std / math.sqrt(width)
    kernel = ntk_limit(x, model.act)
    assert ((gram - kernel).abs() <= 5 * standard_error + 1e-14).all(), ((gram - kernel) / standard_error).abs().max()
    # the limit is what lambda_0 is read from: the two spectra agree to the same accuracy
    bound = float(torch.linalg.matrix_norm(5 * standard_error, 2))
    assert abs(least_eigenvalue(gram) - least_eigenvalue(kernel)) <= bound


@pytest.mark.parametrize("act", ["softplus", "tanh", "gelu", "relu"])
@pytest.mark.parametrize("width", [1, 3])
def test_closed_form_engine_is_jacrev_at_the_smallest_widths(act, width):
    """``G``, ``J^T v`` and ``J v`` of the closed form equal the dense ``jacrev`` Jacobian's (float64)."""
    model = seeded_two_layer(5, width, act, seed=2)
    x, y = sphere_data(7, 5, seed=2)
    system = TwoLayerEngine(model, x).compute(lambda: model(x).squeeze(1) - y)
    weight = model.hidden.weight.detach()
    jac = torch.func.jacrev(lambda w: torch.func.functional_call(model, {"hidden.weight": w}, (x,)).squeeze(1))(weight)
    jac = jac.reshape(7, -1)
    v, u = torch.randn(7, dtype=torch.float64), torch.randn_like(weight)
    assert torch.allclose(system.gram, jac @ jac.T, rtol=0, atol=1e-14)
    assert torch.allclose(system.jt_times(v)[0], (jac.T @ v).reshape(weight.shape), rtol=0, atol=1e-14)
    assert torch.allclose(system.j_times([u]), jac @ u.flatten(), rtol=0, atol=1e-14)


def test_relu_limit_is_the_arccos_kernel():
    """``K = x_i.x_j (pi - arccos(x_i.x_j)) / (2 pi)``, the ``H^infty`` of Du et al., to round-off."""
    x, _ = sphere_data(64, 10, seed=0)
    rho = (x @ x.T).clamp(-1, 1)
    expected = rho * (math.pi - torch.arccos(rho)) / (2 * math.pi)
    kernel = ntk_limit(x, torch.nn.ReLU())
    assert torch.allclose(kernel, expected, rtol=0, atol=1e-15)
    assert least_eigenvalue(kernel) == pytest.approx(least_eigenvalue(expected), rel=1e-12)


def test_ntk_limit_refuses_inputs_off_the_sphere_and_keeps_float32_ones():
    """A norm of ``1 + 1e-6`` was taken for 1 (``allclose``'s default ``rtol``); float32 unit
    vectors (norms 1 +- 1 float32 eps) are on the sphere at their precision."""
    x, _ = sphere_data(5, 4, seed=0)
    with pytest.raises(ValueError, match="unit sphere.*off 1 by 1e-06"):
        ntk_limit(x * (1 + 1e-6), torch.nn.Softplus())
    x32 = torch.randn(20, 30, generator=seeded(0))
    x32 = x32 / x32.norm(dim=1, keepdim=True)
    assert ntk_limit(x32, torch.nn.Softplus()).shape == (20, 20)


def test_theorem_1_quadratic_rate_at_width_4096():
    """Full-batch GGN on ``n = 16`` points: round-off (1e-11) within 4 steps, and every step's
    ``C_t = sqrt(M) ||e_(t+1)|| / ||e_t||^2`` below 2 (measured at most 0.12 here, 1.5 at M = 1024);
    a linearly converging step (wrong Gram matrix) has C in the hundreds."""
    x, y = sphere_data(16, 5, seed=0)
    width = 4096
    for seed in (0, 1):
        model = seeded_two_layer(5, width, "softplus", seed)
        norms = [float(r.norm()) for r in run_full_batch(model, x, y, 6, stop_below=1e-11).residuals]
        assert norms[-1] <= 1e-11 and len(norms) <= 5, norms
        for before, after in zip(norms, norms[1:]):
            if after > 1e-11:  # below, the ratio is one of round-off (as in the study)
                assert math.sqrt(width) * after / before**2 < 2, norms


def test_singular_kernel_is_refused_before_the_study(tmp_path, capsys):
    """``--d 1``: every input is +1 or -1, ``K`` is singular. The quadratic study reported
    ``lambda_0 = -2.7e-16`` and constants ``C_t`` of 20-30; the minibatch one ended in
    ``_LinAlgError: ... singular``. Both now refuse, naming two equal inputs, before any file."""
    out = tmp_path / "th"
    assert main([*QUADRATIC, "--d", "1", "--out", str(out)]) == 1
    error = one_line_error(capsys)
    assert "K is singular (inputs 0 and 3 are equal)" in error and "need lambda_0 > 0" in error
    assert main([*MINIBATCH, "--d", "1", "--widths", "4", "--out", str(out)]) == 1
    assert "K is singular" in one_line_error(capsys)
    assert not out.exists()
    # distinct but too close: 64 points on a circle give a singular softplus K in float64
    x, _ = sphere_data(64, 2, seed=0)
    with pytest.raises(ValueError, match=r"K is singular \(the inputs are too close\)"):
        positive_lambda_0(ntk_limit(x, torch.nn.Softplus()), x)


def test_minibatch_refuses_widths_whose_gram_is_singular(tmp_path, capsys):
    """``M d < n``: ``G_0`` has rank ``<= M d``, every SGD rate has radius 1. With ``--seed 1`` the
    study ended in ``min() arg is an empty sequence`` after the first width; with ``--seed 0``
    it printed an SGD learning rate picked by round-off."""
    out = tmp_path / "mb"
    assert main([*MINIBATCH, "--widths", "4,1", "--seed", "1", "--out", str(out)]) == 1
    error = one_line_error(capsys)
    assert "--widths 1: width M = 2 has M d = 6 trained weights for n = 16 samples" in error
    assert "use log2 widths >= 3" in error
    assert not out.exists()
    j = torch.randn(8, 3, generator=seeded(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="cyclic SGD contracts at no learning rate"):
        best_sgd_rate(j @ j.T, 4, grid=50)


def test_quadratic_with_one_step_writes_its_results(tmp_path, capsys):
    """``--steps 1`` ended in ``error: math domain error`` (the log of a zero drift) once every
    width had run, nothing written; the slope of what one step cannot measure is NaN."""
    out = tmp_path / "q"
    assert main([*QUADRATIC, "--steps", "1", "--out", str(out)]) == 0
    payload = json.loads((out / "quadratic.json").read_text())
    assert payload["slopes"]["drift"] is None and payload["slopes"]["C_1"] is None
    assert math.isfinite(payload["slopes"]["C_0"]) and math.isfinite(payload["slopes"]["kernel_error"])
    assert (out / "quadratic.png").stat().st_size > 0


def test_out_under_a_file_is_refused_before_the_study(tmp_path, capsys, monkeypatch):
    """``--out afile/sub`` failed with ``Not a directory`` only when writing the results, after
    the whole study (2 minutes by default)."""
    (tmp_path / "afile").write_text("kept")

    def no_study(*args, **kwargs):
        raise AssertionError("the study ran")

    monkeypatch.setattr(theory_command, "quadratic_run", no_study)
    assert main([*QUADRATIC, "--out", str(tmp_path / "afile" / "sub")]) == 1
    assert "Not a directory" in one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "kept"


def test_debug_after_the_study_name_shows_the_traceback(tmp_path):
    """Every error says "rerun with --debug"; after ``theory quadratic`` it was refused as an
    unrecognized argument (exit 2) instead of raising."""
    with pytest.raises(ValueError, match="K is singular"):
        main([*QUADRATIC, "--d", "1", "--out", str(tmp_path / "q"), "--debug"])


# ------------------------------------------------------------------ a failure mid-study, and the resume
# Four jobs (widths 16, 32 x seeds 0, 1) of a few steps: a second in all.
FOUR_JOBS = [*QUADRATIC, "--seeds", "2", "--steps", "3"]
THREE_WIDTHS = [*MINIBATCH, "--n", "8", "--widths", "3,4,5"]


def fail_at(monkeypatch, name: str, k: int, error: BaseException) -> list[tuple]:
    """``theory_command.<name>`` (the per-job function the command calls) raising ``error`` at its
    ``k``-th call (never for ``k = 0``); returns the list of the calls' arguments."""
    real = getattr(theory_command, name)
    calls = []

    def job(*args, **kwargs):
        calls.append(args)
        if len(calls) == k:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(theory_command, name, job)
    return calls


def error_line(capsys) -> str:
    """The one ``error:`` line, last on stderr (the progress bar's lines are above it)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: "), captured.err
    assert sum(line.startswith("error: ") for line in lines) == 1, captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[-1]


def numbers(path) -> dict:
    """A study's JSON without the --out it names (two folders are compared)."""
    payload = json.loads(path.read_text())
    del payload["config"]["out"]
    return payload


def assert_same_study(actual, expected) -> None:
    """Two studies' JSON (or parts of it) agree: every key, string, integer and null equal, and the
    floats, in order, by :func:`assert_same_run` (bit for bit on the CPU; off it to 1e-9 relative,
    cuBLAS may add in another order in the second run)."""

    def split(obj, floats: list[float]):
        if isinstance(obj, dict):
            return {k: split(v, floats) for k, v in obj.items()}
        if isinstance(obj, list):
            return [split(v, floats) for v in obj]
        if isinstance(obj, float):
            floats.append(obj)
            return float  # the float's place
        return obj

    got, want = [], []
    assert split(actual, got) == split(expected, want)
    assert_same_run(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), "the studies")


def test_a_failing_job_keeps_the_finished_runs_and_the_rerun_resumes_bit_for_bit(tmp_path, capsys, monkeypatch):
    """Job 3 of 4 raising (a singular system, a NaN, out of memory at one width) ended the study
    with its message and nothing written: the two finished runs were lost. Now the error names
    the job and its cause, ``quadratic.json`` holds the finished runs marked incomplete after each
    job (written atomically), and the same command again runs only jobs 3 and 4: the study
    written equals the uninterrupted one's, every number bit for bit."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*FOUR_JOBS, "--out", str(whole)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as patch:
        fail_at(patch, "quadratic_run", 3, RuntimeError("simulated: linalg.solve: the matrix is singular"))
        assert main([*FOUR_JOBS, "--out", str(cut)]) == 1
    error = error_line(capsys)
    assert (
        f"theory quadratic: job 3 of 4 (width M = 32, seed 0) failed; jobs 1-2 are kept in {cut / 'quadratic.json'}, "
        "marked incomplete: rerun the same command to resume from job 3; the cause: "
    ) in error
    assert error.endswith(
        "RuntimeError: simulated: linalg.solve: the matrix is singular (rerun with --debug for the traceback)"
    )
    partial = json.loads((cut / "quadratic.json").read_text())
    assert partial["complete"] is False and partial["jobs_done"] == [[16, 0], [16, 1]]
    assert_same_study(partial["study"]["runs"], json.loads((whole / "quadratic.json").read_text())["study"]["runs"][:2])
    assert sorted(p.name for p in cut.iterdir()) == ["quadratic.json"]  # no temporary file, no figure
    with monkeypatch.context() as patch:
        calls = fail_at(patch, "quadratic_run", 0, RuntimeError("never"))
        assert main([*FOUR_JOBS, "--out", str(cut)]) == 0
    assert [(args[3], args[5]) for args in calls] == [(32, 0), (32, 1)]  # only the jobs not done
    assert f"resuming {cut / 'quadratic.json'}: 2 of 4 runs done" in capsys.readouterr().out
    assert_same_study(numbers(cut / "quadratic.json"), numbers(whole / "quadratic.json"))
    assert numbers(whole / "quadratic.json")["complete"] is True
    assert (cut / "quadratic.png").stat().st_size > 0
    # a finished study is refused as before
    assert main([*FOUR_JOBS, "--out", str(cut)]) == 1
    assert "already holds quadratic.json and quadratic.png" in one_line_error(capsys)


def test_minibatch_resumed_after_a_failing_width_is_the_uninterrupted_study(tmp_path, capsys, monkeypatch):
    """The same for ``theory minibatch`` (one job per width), with a NaN contraction in the
    first width's run (``tail_contraction`` of too few epochs above round-off), which the
    JSON writes as ``null``: read back as ``None`` it ended the resumed study in a TypeError."""
    real = theory_command.minibatch_run

    def first_nan(x, y, width, *args):
        run = real(x, y, width, *args)
        return dataclasses.replace(run, ggn_contraction=math.nan) if width == 8 else run

    monkeypatch.setattr(theory_command, "minibatch_run", first_nan)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*THREE_WIDTHS, "--out", str(whole)]) == 0
    with monkeypatch.context() as patch:
        fail_at(patch, "minibatch_run", 2, torch.OutOfMemoryError("simulated: CUDA out of memory"))
        assert main([*THREE_WIDTHS, "--out", str(cut)]) == 1
    error = error_line(capsys)
    assert "theory minibatch: job 2 of 3 (width M = 16, seed 0) failed; job 1 is kept in" in error
    assert "OutOfMemoryError: simulated: CUDA out of memory" in error
    assert json.loads((cut / "minibatch.json").read_text())["jobs_done"] == [[8, 0]]
    with monkeypatch.context() as patch:
        calls = fail_at(patch, "minibatch_run", 0, RuntimeError("never"))
        assert main([*THREE_WIDTHS, "--out", str(cut)]) == 0
    assert [args[2] for args in calls] == [16, 32]
    assert_same_study(numbers(cut / "minibatch.json"), numbers(whole / "minibatch.json"))
    assert numbers(cut / "minibatch.json")["study"]["runs"][0]["ggn_contraction"] is None


def test_ctrl_c_keeps_the_finished_runs_and_other_options_are_refused(tmp_path, capsys, monkeypatch):
    """Ctrl-C at job 2 stops the study (status 130) with job 1 on disk (was: nothing). A rerun
    with other options is refused, naming them, the folder unchanged; ``--overwrite`` starts
    afresh, and its rerun (the same command, ``--overwrite`` included) resumes. A failing first
    job writes nothing."""
    out = tmp_path / "q"
    with monkeypatch.context() as patch:
        fail_at(patch, "quadratic_run", 2, KeyboardInterrupt())
        assert main([*FOUR_JOBS, "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert json.loads((out / "quadratic.json").read_text())["jobs_done"] == [[16, 0]]
    before = snapshot(out)
    assert main([*FOUR_JOBS, "--seed", "1", "--steps", "2", "--out", str(out)]) == 1
    assert (
        f"{out / 'quadratic.json'} is an incomplete study of other options (--seed 0 there, 1 here; "
        "--steps 3 there, 2 here): rerun with its options to resume it, pass --overwrite"
    ) in one_line_error(capsys)
    assert snapshot(out) == before
    # --overwrite replaces it: all four jobs of the new options run
    with monkeypatch.context() as patch:
        calls = fail_at(patch, "quadratic_run", 4, KeyboardInterrupt())
        assert main([*FOUR_JOBS, "--seed", "1", "--out", str(out), "--overwrite"]) == 130
    assert len(calls) == 4
    assert json.loads((out / "quadratic.json").read_text())["jobs_done"] == [[16, 1], [16, 2], [32, 1]]
    with monkeypatch.context() as patch:
        calls = fail_at(patch, "quadratic_run", 0, RuntimeError("never"))
        assert main([*FOUR_JOBS, "--seed", "1", "--out", str(out), "--overwrite", "--threads", "2"]) == 0
    assert len(calls) == 1
    capsys.readouterr()
    first = tmp_path / "first"
    with monkeypatch.context() as patch:
        fail_at(patch, "quadratic_run", 1, ValueError("simulated"))
        assert main([*FOUR_JOBS, "--out", str(first)]) == 1
    assert error_line(capsys).endswith(
        "job 1 of 4 (width M = 16, seed 0) failed; no job had finished, nothing is written; the cause: simulated"
    )
    assert list(first.iterdir()) == []
