"""``gramnewton predict``: trained runs' predictions, averaged, in the data's units, checked by hand in float64."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from test_early_stopping import CLASSIFY_VALIDATED
from test_lab_reliability import one_line_error

from gramnewton.lab.cli import main
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.early_stopping import save_best
from gramnewton.lab.experiments.predictions import FoldEnsemble, load_ensemble, load_split
from gramnewton.lab.experiments.setup import build_model
from gramnewton.lab.experiments.sweep import chosen_runs, fold_ensemble_test
from gramnewton.lab.experiments.training import evaluation_mode

# concrete (824 training rows, a fifth held out, 206 test rows: targets in MPa with a non-zero
# mean) on a small Adam MLP for 4 epochs, the best-validation model kept: a run trains in a second
CONCRETE = ["concrete_adam_mlp", "--set=train.epochs=4", "--set=train.seconds=0", "--set=train.threads=1"]
CONCRETE += ["--set=model.kwargs={hidden = [16]}"]


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], torch.tensor([[float(v) for v in row] for row in rows[1:]], dtype=torch.float64)


def _outputs_by_hand(run, file, split="test"):
    """The float64 outputs ``(n, k)`` of ``run``'s model saved in ``file`` on ``split`` and its samples."""
    data = load_split(run, split)
    model = build_model(load_config(run / "config.toml"), data).double()
    model.load_state_dict(torch.load(run / file, weights_only=True)["model"])
    inputs, targets = data[torch.arange(len(data))]
    with evaluation_mode(model), torch.no_grad():
        return model(inputs.double()).reshape(len(data), -1), targets, data


def _files(folder):
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _printed_number(text, before):
    return float(text.split(before, 1)[1].split()[0].rstrip(","))


@pytest.fixture
def trained_run(tmp_path):
    """A concrete run whose ``best.pt`` holds its last model's weights halved, so that the kept
    model and the last one surely differ (a choice between them is then seen in the outputs)."""
    run = tmp_path / "run"
    assert main(["train", *CONCRETE, "--out", str(run)]) == 0
    best = torch.load(run / "best.pt", weights_only=True)
    save_best(run, {name: value / 2 for name, value in best["model"].items()}, best["row"])
    return run


def test_a_runs_predictions_are_its_models_outputs_in_the_targets_unit(trained_run, capsys):
    capsys.readouterr()
    assert main(["predict", str(trained_run)]) == 0
    printed = capsys.readouterr().out
    header, table = _read(trained_run / "predictions-test.csv")
    assert header == ["index", "target", "prediction"]
    outputs, targets, test = _outputs_by_hand(trained_run, "best.pt")
    scale = test.scale
    assert scale.std > 1.0 and scale.mean > 1.0  # MPa: the unit is undone, not the identity
    torch.testing.assert_close(table[:, 0], torch.arange(len(test), dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(table[:, 1], scale.mean + scale.std * targets.double(), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(table[:, 2], scale.mean + scale.std * outputs[:, 0], rtol=1e-5, atol=1e-4)
    mse = float((outputs[:, 0] - targets.double()).pow(2).mean())
    assert f"test split, {len(test)} samples, 1 model(s) (1 best.pt)" in printed
    assert _printed_number(printed, "MSE") == pytest.approx(mse, rel=1e-3)
    assert _printed_number(printed, "RMSE") == pytest.approx(mse**0.5 * scale.std, rel=1e-3)
    # the last model instead of the kept one, and the whole training set (its validation rows too)
    out = trained_run.parent / "last.csv"
    assert main(["predict", str(trained_run), "--model", "last", "--split", "train", "--out", str(out)]) == 0
    assert "train split, 824 samples, 1 model(s) (1 checkpoint.pt)" in capsys.readouterr().out
    _, table = _read(out)
    last, _, _ = _outputs_by_hand(trained_run, "checkpoint.pt", "train")
    torch.testing.assert_close(table[:, 2], scale.mean + scale.std * last[:, 0], rtol=1e-5, atol=1e-4)
    best, _, _ = _outputs_by_hand(trained_run, "best.pt", "train")
    assert not torch.allclose(best, last)


def test_a_sweeps_fold_models_predict_their_mean_probabilities(tmp_path, capsys):
    path = tmp_path / "classify.toml"
    path.write_text(CLASSIFY_VALIDATED)
    sweep = tmp_path / "sweep"
    assert main(["sweep", str(path), "--grid", "optimizer.lr=[0.01]", "--folds", "2", "--out", str(sweep)]) == 0
    assert f"(their predictions: gramnewton predict {sweep})" in capsys.readouterr().out  # the sweep says how
    assert main(["predict", str(sweep)]) == 0
    printed = capsys.readouterr().out
    runs = chosen_runs(sweep)
    assert [run.name for run in runs] == ["fold-0", "fold-1"]
    (first, labels, _), (second, _, _) = (_outputs_by_hand(run, "best.pt") for run in runs)
    probabilities = (first.softmax(-1) + second.softmax(-1)) / 2
    header, table = _read(sweep / "predictions-test.csv")
    assert header == ["index", "label", "predicted", *(f"probability_{j}" for j in range(10))]
    torch.testing.assert_close(table[:, 1], labels.double(), rtol=0, atol=0)
    torch.testing.assert_close(table[:, 3:], probabilities, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table[:, 3:].sum(1), torch.ones(64, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(table[:, 2], table[:, 3:].argmax(1).double())
    loss, accuracy = fold_ensemble_test(runs)  # the sweep's own committee: the same model
    assert "2 model(s) averaged (probabilities) (2 best.pt)" in printed
    assert f"cross-entropy {loss:.4g}, accuracy {accuracy:.4g}" in printed
    assert accuracy == pytest.approx(float((probabilities.argmax(1) == labels).double().mean()))
    # the logits averaged instead, on request
    assert main(["predict", str(sweep), "--average", "outputs", "--out", str(tmp_path / "logits.csv")]) == 0
    _, table = _read(tmp_path / "logits.csv")
    torch.testing.assert_close(table[:, 3:], ((first + second) / 2).softmax(-1), rtol=1e-5, atol=1e-6)


def test_a_sweep_without_folds_predicts_with_its_chosen_points_run(trained_run, tmp_path):
    sweep = tmp_path / "sweep"
    assert main(["sweep", *CONCRETE, "--grid", "optimizer.lr=[1e-3, 1e-2]", "--out", str(sweep)]) == 0
    chosen = chosen_runs(sweep)
    assert len(chosen) == 1 and chosen[0].parent == sweep and (chosen[0] / "best.pt").is_file()
    ensemble, _, files = load_ensemble([chosen[0], trained_run])
    assert isinstance(ensemble, FoldEnsemble) and ensemble.average == "outputs" and files == ["best.pt"] * 2


def test_bad_predictions_are_one_line_errors_that_change_no_file(trained_run, tmp_path, capsys):
    other = tmp_path / "other"  # the same config on another test subset: other data
    assert main(["train", *CONCRETE, "--out", str(other), "--set=data.test_subset=32"]) == 0
    unkept = tmp_path / "unkept"
    assert main(["train", *CONCRETE, "--out", str(unkept), "--set=train.keep_best=false"]) == 0
    assert main(["predict", str(trained_run)]) == 0
    capsys.readouterr()
    before = _files(tmp_path)
    cases = {
        (str(trained_run),): "predictions-test.csv exists: pass --overwrite",
        (str(trained_run), str(other)): "2 paths: name the predictions file with --out",
        (str(trained_run), str(other), "--out", str(tmp_path / "both.csv")): "trained on different data",
        (str(unkept), "--model", "best"): "no best.pt in .*: the run has no such model .train.keep_best",
        (str(tmp_path / "missing"),): "neither a run folder .* nor a sweep folder",
        (str(trained_run), "--out", str(tmp_path / "no" / "such.csv")): "no folder .* to write such.csv in",
        (str(trained_run), "--out", str(tmp_path)): "is a folder: name a file",
    }
    for argv, words in cases.items():
        assert main(["predict", *argv]) == 1, argv
        assert re.search(words, one_line_error(capsys)), (argv, words)
    assert _files(tmp_path) == before
    # --overwrite replaces the file, and an unkept run's last model predicts under "auto"
    assert main(["predict", str(unkept), "--out", str(trained_run / "predictions-test.csv"), "--overwrite"]) == 0
    assert "(1 checkpoint.pt)" in capsys.readouterr().out
    assert _files(tmp_path) != before
