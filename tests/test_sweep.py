"""``gramnewton sweep``: a grid of runs of one config, chosen on the validation split (issue 15)."""

from __future__ import annotations

import math

import pytest
import torch
from test_early_stopping import CLASSIFY_VALIDATED, VALIDATED
from test_lab_reliability import one_line_error, snapshot

from gramnewton.lab.cli import main
from gramnewton.lab.commands import sweep as sweep_command
from gramnewton.lab.experiments import sweep as sweep_module
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.metrics import read_rows, write_rows
from gramnewton.lab.experiments.predictions import FoldEnsemble
from gramnewton.lab.experiments.reproduce import CONFIGS_DIR
from gramnewton.lab.experiments.setup import build_model, load_data
from gramnewton.lab.experiments.sweep import Axis, parse_axes, summarise, sweep_points
from gramnewton.lab.experiments.training import evaluation_mode
from gramnewton.solve import SingularGramError

# VALIDATED (256 images, a quarter held out) for 3 epochs, no early stopping: a point trains in a second
SHORT = ["train.epochs=3", "train.early_stopping_patience=0", "train.keep_best=false"]
SETS = [f"--set={s}" for s in SHORT]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "validated.toml"
    path.write_text(VALIDATED)
    return path


def test_axes_are_toml_arrays_and_may_not_change_the_split():
    axes = parse_axes(
        ["optimizer.lr=[1e-3, 3e-3]", 'optimizer.adaptive_damping=[{name = "gain_ratio", min_alpha = 10}, "auto"]']
    )
    assert axes == [
        Axis("optimizer.lr", (1e-3, 3e-3)),
        Axis("optimizer.adaptive_damping", ({"name": "gain_ratio", "min_alpha": 10}, "auto")),
    ]
    refused = {
        "optimizer.lr=0.1": "non-empty TOML array",
        "optimizer.lr=[]": "non-empty TOML array",
        "optimizer.lr": "section.key=value",
        "seed=[0, 1]": "one validation split",
        "data.validation_fraction=[0.1, 0.2]": "one validation split",
    }
    for item, words in refused.items():
        with pytest.raises(ValueError, match=words):
            parse_axes([item])
    with pytest.raises(ValueError, match="given twice"):
        parse_axes(["optimizer.lr=[1]", "optimizer.lr=[2]"])
    with pytest.raises(ValueError, match="at least one"):
        parse_axes([])


def test_points_are_the_grids_product_each_validated_before_any_training(config_file):
    config = load_config(config_file, SHORT)
    points = sweep_points(config, parse_axes(["optimizer.alpha=[0.1, 10]", "optimizer.lam=[1, 4]"]))
    assert [p.folder for p in points] == [
        "00-alpha=0.1,lam=1",
        "01-alpha=0.1,lam=4",
        "02-alpha=10,lam=1",
        "03-alpha=10,lam=4",
    ]
    assert [(p.config["optimizer"]["alpha"], p.config["optimizer"]["lam"]) for p in points] == [
        (0.1, 1),
        (0.1, 4),
        (10, 1),
        (10, 4),
    ]
    assert points[0].overrides == (("optimizer.alpha", 0.1), ("optimizer.lam", 1))
    assert config["optimizer"]["alpha"] == 0.3  # the base config is not changed
    # the constructor's range check and the config's key check, for the last point, before any run
    with pytest.raises(ValueError, match=r"grid point alpha=-1: .*alpha"):
        sweep_points(config, parse_axes(["optimizer.alpha=[0.1, -1]"]))
    with pytest.raises(ValueError, match="grid point alhpa=1: unknown config key optimizer.alhpa"):
        sweep_points(config, parse_axes(["optimizer.alhpa=[1]"]))
    with pytest.raises(ValueError, match="validation_fraction"):
        sweep_points(
            load_config(config_file, [*SHORT, "data.validation_fraction=0"]), parse_axes(["optimizer.alpha=[1]"])
        )


def test_the_choice_is_the_lowest_validation_loss_never_the_test_loss(config_file, tmp_path):
    points = sweep_points(load_config(config_file, SHORT), parse_axes(["optimizer.alpha=[1, 2, 3]"]))
    nan = math.nan
    curves = {  # (val_loss, test_loss) per epoch
        points[0].folder: [(nan, nan), (0.5, 0.10), (0.6, 0.05)],  # the test set's favourite
        points[1].folder: [(nan, nan), (0.3, 0.40), (0.2, 0.30), (0.4, 0.20)],  # least validation loss, mid-run
        points[2].folder: [(nan, nan), (nan, nan)],  # diverged
    }
    for folder, curve in curves.items():
        rows = [
            {"epoch": e, "seconds": e, "train_loss": 1.0, "val_loss": v, "test_loss": t, "test_rmse": 2 * t}
            for e, (v, t) in enumerate(curve)
        ]
        write_rows(tmp_path / "sweep" / folder / "metrics.csv", rows)
    rows = summarise(tmp_path / "sweep", points, {points[2].folder: "not finite"})
    assert [r["chosen"] for r in rows] == [0, 1, 0]
    chosen = rows[1]
    assert (chosen["best_epoch"], chosen["best_seconds"], chosen["val_loss"]) == (2, 2, 0.2)
    assert (chosen["test_loss"], chosen["test_rmse"]) == (0.3, 0.6)
    assert (chosen["epochs"], chosen["last_test_loss"], chosen["optimizer.alpha"]) == (3, 0.2, 2)
    assert math.isnan(rows[2]["val_loss"]) and rows[2]["error"] == "not finite"
    write_rows(tmp_path / "sweep" / points[1].folder / "metrics.csv", [{"epoch": 0, "val_loss": nan, "test_loss": 1.0}])
    assert [r["chosen"] for r in summarise(tmp_path / "sweep", points[1:])] == [0, 0]  # none to choose


def test_sweep_trains_each_point_as_train_would_and_resumes_without_retraining(config_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ["--grid", "optimizer.alpha=[0.1, 10]", *SETS]
    assert main(["sweep", str(config_file), *grid, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = read_rows(out / "sweep.csv")
    assert [r["point"] for r in summary] == ["00-alpha=0.1", "01-alpha=10"] and sum(r["chosen"] for r in summary) == 1
    chosen = next(r for r in summary if r["chosen"])
    assert f"chosen on the validation split: {chosen['point']}" in printed
    assert f"--set 'optimizer.alpha={chosen['optimizer.alpha']:g}'" in printed.replace(".0'", "'")
    assert (out / "sweep.png").stat().st_size > 0
    # a point is the run `gramnewton train` makes with the same --set (wall-clock seconds aside)
    alone = tmp_path / "alone"
    assert main(["train", str(config_file), *SETS, "--set=optimizer.alpha=10", f"--out={alone}"]) == 0

    def strip(rows):  # NaN-aware: compare the numbers' text
        return [{k: repr(v) for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(read_rows(out / "01-alpha=10" / "metrics.csv")) == strip(read_rows(alone / "metrics.csv"))
    # an occupied folder is refused unchanged; --resume reads the finished points, trains none
    before = {p.name: snapshot(p) for p in out.iterdir() if p.is_dir()}
    capsys.readouterr()
    assert main(["sweep", str(config_file), *grid, "--out", str(out)]) == 1
    assert "is not empty" in one_line_error(capsys)
    assert main(["sweep", str(config_file), *grid, "--out", str(out), "--resume"]) == 0
    assert {p.name: snapshot(p) for p in out.iterdir() if p.is_dir()} == before
    assert [r["val_loss"] for r in read_rows(out / "sweep.csv")] == [r["val_loss"] for r in summary]


def test_a_point_whose_step_fails_is_reported_and_the_sweep_goes_on(config_file, tmp_path, capsys, monkeypatch):
    train = sweep_command.train_with_progress

    def failing(config, out, **kwargs):
        if config["optimizer"]["alpha"] == 0.1:
            raise SingularGramError("the Gram-Gauss-Newton step is not finite")
        return train(config, out, **kwargs)

    monkeypatch.setattr(sweep_command, "train_with_progress", failing)
    out = tmp_path / "sweep"
    args = ["sweep", str(config_file), "--grid", "optimizer.alpha=[0.1, 10]", *SETS]
    assert main([*args, "--out", str(out)]) == 0
    assert "00-alpha=0.1: failed (the Gram-Gauss-Newton step is not finite)" in capsys.readouterr().out
    rows = read_rows(out / "sweep.csv")
    assert rows[0]["error"] == "the Gram-Gauss-Newton step is not finite" and math.isnan(rows[0]["val_loss"])
    assert [r["chosen"] for r in rows] == [0, 1]
    # every point failing: the rows are written, and the sweep is an error
    monkeypatch.setattr(sweep_command, "train_with_progress", lambda *a, **k: failing({"optimizer": {"alpha": 0.1}}, 0))
    assert main([*args, "--out", str(tmp_path / "none")]) == 1
    assert "no point of the sweep reached a finite validation loss" in one_line_error(capsys)
    assert [r["error"] for r in read_rows(tmp_path / "none" / "sweep.csv")] == [
        "the Gram-Gauss-Newton step is not finite"
    ] * 2


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--grid", "seed=[1, 2]"], "one validation split"),
        (["--grid", "optimizer.alpha=[0.1, -1]"], "grid point alpha=-1"),
        (["--grid", "optimizer.alpha=[1]", *SETS, "--set=data.validation_fraction=0"], "held-out data"),
        ([], "at least one --grid"),
    ],
)
def test_bad_sweeps_are_one_line_errors_that_train_nothing(config_file, tmp_path, capsys, argv, words):
    out = tmp_path / "sweep"
    assert main(["sweep", str(config_file), *argv, "--out", str(out)]) == 1
    assert words in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "axis"),
    [
        ("concrete_ggn_mlp", "optimizer.adaptive_damping.min_alpha=[1e-8, 10, 100, 1000, 1e4, 1e5, 1e6]"),
        ("concrete_adam_mlp", "optimizer.lr=[3e-4, 1e-3, 3e-3, 1e-2]"),
    ],
)
def test_the_packaged_tabular_configs_take_their_documented_grids(name, axis):
    for data in ("concrete", "diabetes"):
        config = load_config(CONFIGS_DIR / f"{name}.toml", [f"data.name={data}"])
        points = sweep_points(config, parse_axes([axis]))
        assert len(points) == len(parse_axes([axis])[0].values) and config["data"]["validation_fraction"] == 0.2
    if name == "concrete_ggn_mlp":  # the floor 1e-8 is the constructor's default rule
        assert points[0].config["optimizer"]["adaptive_damping"] == {
            "name": "gain_ratio",
            "check_every": 4,
            "min_alpha": 1e-8,
        }


def test_a_table_valued_axis_prints_the_set_that_trains_the_chosen_point(config_file, tmp_path, capsys):
    rule = '{name = "gain_ratio", check_every = 4, min_alpha = 10.0}'
    out = tmp_path / "sweep"
    grid = f"optimizer.adaptive_damping=[{rule}, false]"
    assert main(["sweep", str(config_file), "--grid", grid, *SETS, "--set=train.epochs=1", f"--out={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "00-adaptive_damping=_name=gain_ratio,check_every=4,min_alpha=10_",
        "01-adaptive_damping=false",
        "sweep.csv",
        "sweep.png",
    ]
    printed = capsys.readouterr().out
    chosen = next(r for r in read_rows(out / "sweep.csv") if r["chosen"])
    point = sweep_points(load_config(config_file, SHORT), parse_axes([grid]))[int(chosen["point"][:2])]
    given = printed.rsplit("train it with --set '", 1)[1].split("'")[0]
    assert load_config(config_file, [*SHORT, given]) == point.config  # the printed --set is that point's config


def test_the_figure_draws_one_pair_of_lines_per_value_of_the_other_axes(tmp_path, monkeypatch):
    """Two axes: the last (numeric) is the x axis, one validation and one test line per value of
    the first, each through its own points; a string-valued last axis falls back to point by point."""
    drawn = []
    monkeypatch.setattr(sweep_module, "save_figure", lambda fig, path: drawn.append(fig) or path)
    axes = [Axis("optimizer.lam", (16, 1)), Axis("optimizer.adaptive_damping.min_alpha", (1e-8, 100, 1000))]
    rows = [
        {"point": f"{i:02d}", "optimizer.lam": lam, "optimizer.adaptive_damping.min_alpha": floor}
        | {"val_loss": 0.1 * (i + 1), "test_loss": 0.2 * (i + 1), "chosen": i == 4}
        for i, (lam, floor) in enumerate((lam, floor) for lam in (16, 1) for floor in (1e-8, 100, 1000))
    ]
    sweep_module.plot_summary(tmp_path, rows, axes)
    lines = {line.get_label(): line for line in drawn[-1].axes[0].get_lines()}
    assert sorted(lines) == sorted(
        [
            f"lam={lam}: {kind}"
            for lam in (16, 1)
            for kind in ("validation loss (lowest)", "test loss (same evaluation)")
        ]
        + ["chosen"]
    )
    assert list(lines["lam=1: validation loss (lowest)"].get_xdata()) == [1e-8, 100, 1000]
    assert list(lines["lam=1: test loss (same evaluation)"].get_ydata()) == pytest.approx([0.8, 1.0, 1.2])
    assert list(lines["chosen"].get_xdata()) == [100] and list(lines["chosen"].get_ydata()) == [0.5]
    assert drawn[-1].axes[0].get_xscale() == "log"

    words = [Axis("optimizer.lam", (16, 1)), Axis("optimizer.metric", ("auto", "euclidean"))]
    rows = [r | {"optimizer.metric": m} for r, m in zip(rows[:4], ("auto", "euclidean") * 2)]
    sweep_module.plot_summary(tmp_path, rows, words)
    labels = [line.get_label() for line in drawn[-1].axes[0].get_lines()]
    assert labels == ["validation loss (lowest)", "test loss (same evaluation)", "chosen"]
    assert list(drawn[-1].axes[0].get_lines()[0].get_xdata()) == [0, 1, 2, 3]


def test_folds_run_each_point_on_each_validation_fold_and_choose_on_the_mean(config_file, tmp_path, capsys):
    """``--folds 2``: one run per (point, fold), each a ``gramnewton train`` run with that
    ``data.validation_fold``; the summary's numbers are the folds' means; more folds than the
    validation share gives are refused before anything trains."""
    out = tmp_path / "sweep"
    grid = ["--grid", "optimizer.alpha=[0.1, 10]", *SETS, "--folds", "2"]
    assert main(["sweep", str(config_file), *grid, "--out", str(out)]) == 0
    assert "chosen on mean over 2 validation folds" in capsys.readouterr().out
    summary = read_rows(out / "sweep.csv")
    for row in summary:
        folds = [read_rows(out / row["point"] / f"fold-{i}" / "metrics.csv") for i in range(2)]
        best = [min(rows, key=lambda r: r["val_loss"]) for rows in folds]
        assert row["val_loss"] == pytest.approx((best[0]["val_loss"] + best[1]["val_loss"]) / 2)
        assert row["test_loss"] == pytest.approx((best[0]["test_loss"] + best[1]["test_loss"]) / 2)
        assert best[0]["val_loss"] != best[1]["val_loss"]  # two splits
    # fold 1 of the last point is the run train makes with data.validation_fold = 1
    alone = tmp_path / "alone"
    assert (
        main(
            [
                "train",
                str(config_file),
                *SETS,
                "--set=optimizer.alpha=10",
                "--set=data.validation_fold=1",
                f"--out={alone}",
            ]
        )
        == 0
    )

    def strip(rows):
        return [{k: repr(v) for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(read_rows(out / "01-alpha=10" / "fold-1" / "metrics.csv")) == strip(read_rows(alone / "metrics.csv"))
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert (
        main(["sweep", str(config_file), "--grid", "optimizer.alpha=[1]", *SETS, "--folds", "5", "--out", str(refused)])
        == 1
    )
    assert "--folds 5: data.validation_fraction = 0.25 gives 4 folds" in one_line_error(capsys)
    assert not refused.exists()


def test_refit_trains_the_choice_on_the_whole_training_set_for_its_best_epochs(config_file, tmp_path, capsys):
    """``--refit``: the chosen point is the run ``train`` makes with that point's ``--set``, no
    validation split and ``train.epochs`` = its best epoch; a resumed sweep trains nothing again;
    an occupied refit folder is refused before any point trains."""
    out = tmp_path / "sweep"
    grid = ["--grid", "optimizer.alpha=[0.1, 10]", *SETS, "--refit"]
    assert main(["sweep", str(config_file), *grid, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    chosen = next(r for r in read_rows(out / "sweep.csv") if r["chosen"])
    epochs = round(chosen["best_epoch"])
    refit = read_rows(out / "refit" / "metrics.csv")
    assert f"refit {chosen['point']} on the whole training set, {epochs} epochs: test loss" in printed
    assert [r["epoch"] for r in refit] == list(range(epochs + 1)) and "val_loss" not in refit[-1]
    alone = tmp_path / "alone"
    sets = [*SETS, f"--set=optimizer.alpha={chosen['optimizer.alpha']}", "--set=data.validation_fraction=0"]
    assert main(["train", str(config_file), *sets, f"--set=train.epochs={epochs}", f"--out={alone}"]) == 0

    def strip(rows):
        return [{k: repr(v) for k, v in r.items() if k != "seconds"} for r in rows]

    assert strip(refit) == strip(read_rows(alone / "metrics.csv"))
    before = snapshot(out / "refit")
    assert main(["sweep", str(config_file), *grid, "--out", str(out), "--resume"]) == 0
    assert snapshot(out / "refit") == before
    capsys.readouterr()
    occupied = tmp_path / "occupied"
    (occupied / "refit").mkdir(parents=True)
    (occupied / "refit" / "notes.txt").write_text("mine")
    assert main(["sweep", str(config_file), *grid, "--out", str(occupied), "--resume"]) == 1
    assert "holds no checkpoint and no run of this config" in one_line_error(capsys)
    assert sorted(p.name for p in occupied.iterdir()) == ["refit"]


def test_refit_config_rounds_the_best_epoch_and_drops_the_split(config_file):
    config = load_config(config_file, SHORT)
    point = sweep_points(config, [Axis("optimizer.alpha", (1.0,))], folds=2)[0]
    refit = sweep_module.refit_config(point, {"best_epoch": 2.5})
    assert refit["train"]["epochs"] == 2 and refit["train"]["seconds"] == 0  # round half to even
    assert refit["data"]["validation_fraction"] == 0 and refit["data"]["validation_fold"] == 0
    assert sweep_module.refit_config(point, {"best_epoch": 0.0})["train"]["epochs"] == 1
    assert point.config["data"]["validation_fraction"] > 0  # the point's config is left as it was
    with pytest.raises(ValueError, match="no epoch of finite validation loss"):
        sweep_module.refit_config(point, {"best_epoch": math.nan})


def _chosen_folds_by_hand(out, folds: int):
    """The chosen row of the sweep in ``out``, its fold runs, the test split's targets and each
    fold's kept (``best.pt``) model's test outputs ``(n, k)``, computed in float64."""
    chosen = next(r for r in read_rows(out / "sweep.csv") if r["chosen"])
    runs = [out / chosen["point"] / f"fold-{i}" for i in range(folds)]
    config = load_config(runs[0] / "config.toml")
    test = load_data(config, "test")
    inputs, targets = test[torch.arange(len(test))]
    outputs = []
    for run in runs:
        model = build_model(config, test).double()
        model.load_state_dict(torch.load(run / "best.pt", weights_only=True)["model"])
        with evaluation_mode(model), torch.no_grad():
            outputs.append(model(inputs.double()))
    return chosen, runs, targets, outputs


def test_the_fold_models_averaged_are_the_mean_of_the_kept_models_outputs(config_file, tmp_path, capsys):
    """``--folds 2`` with kept models: the printed test loss is that of the two ``best.pt``
    models' outputs averaged, computed here by hand in float64, and (a mean prediction's MSE being
    at most its members' mean MSE) no higher than the folds' mean test loss of the chosen row."""
    out = tmp_path / "sweep"
    grid = ["--grid", "optimizer.alpha=[0.1, 10]", *SETS, "--set=train.keep_best=true", "--folds", "2"]
    assert main(["sweep", str(config_file), *grid, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    chosen, folds, targets, outputs = _chosen_folds_by_hand(out, 2)
    outputs = [output.reshape(targets.shape) for output in outputs]
    by_hand = float(((outputs[0] + outputs[1]) / 2 - targets.double()).pow(2).mean())
    assert f"{chosen['point']}: its 2 fold models averaged: test loss {by_hand:.4g}" in printed
    assert sweep_module.fold_ensemble_test(folds)[0] == pytest.approx(by_hand, rel=1e-5)  # float32 against float64
    assert by_hand <= chosen["test_loss"] * (1 + 1e-6)
    assert not torch.equal(outputs[0], outputs[1])  # two models, so the average is not one of them
    # without kept models there is nothing to average: said, and the sweep still succeeds
    grid[grid.index("--set=train.keep_best=true")] = "--set=train.keep_best=false"
    assert main(["sweep", str(config_file), *grid, "--out", str(tmp_path / "unkept")]) == 0
    assert "no fold models to average (the folds kept none: set train.keep_best = true)" in capsys.readouterr().out


def test_a_fold_ensemble_averages_its_models_outputs_or_probabilities():
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 4).double() for _ in range(3)]
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = sum(model(x) for model in models) / 3
    torch.testing.assert_close(FoldEnsemble(models)(x), expected)
    # probabilities: the log of the members' mean softmax, which a softmax maps back to that mean
    mean_probabilities = sum(model(x).softmax(-1) for model in models) / 3
    log_mean = FoldEnsemble(models, average="probabilities")(x)
    torch.testing.assert_close(log_mean, mean_probabilities.log(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_mean.softmax(-1), mean_probabilities, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(log_mean.softmax(-1), expected.softmax(-1))  # the two averages differ
    with pytest.raises(ValueError, match="at least one model"):
        FoldEnsemble([])
    with pytest.raises(ValueError, match="average must be one of outputs, probabilities, not 'logits'"):
        FoldEnsemble(models, average="logits")
    with pytest.raises(ValueError, match=r"needs a classifier's logits \(b, k >= 2\), got \(5, 1\)"):
        FoldEnsemble([torch.nn.Linear(3, 1).double()], average="probabilities")(x)


def test_a_classifiers_fold_models_average_their_probabilities(tmp_path, capsys):
    """A classification sweep with ``--folds 2``: the printed test cross-entropy is that of the
    two kept models' mean softmax probabilities (by hand, float64), and by the concavity of the
    log no higher than the folds' mean test loss; ``average="outputs"`` averages the logits."""
    path = tmp_path / "classify.toml"
    path.write_text(CLASSIFY_VALIDATED)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--grid", "optimizer.lr=[0.01]", "--folds", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    chosen, folds, labels, logits = _chosen_folds_by_hand(out, 2)
    probabilities = (logits[0].softmax(-1) + logits[1].softmax(-1)) / 2
    by_hand = float(torch.nn.functional.nll_loss(probabilities.log(), labels))
    accuracy = float((probabilities.argmax(-1) == labels).double().mean())
    assert f"its 2 fold models averaged: test loss {by_hand:.4g}, test accuracy {accuracy:.4g}" in printed
    assert by_hand <= chosen["test_loss"] * (1 + 1e-6)
    loss, _ = sweep_module.fold_ensemble_test(folds, average="outputs")
    by_logits = float(torch.nn.functional.cross_entropy((logits[0] + logits[1]) / 2, labels))
    assert loss == pytest.approx(by_logits, rel=1e-5) and by_logits != pytest.approx(by_hand, rel=1e-5)
