"""Validation split, early stopping, the best-validation model and the seconds budget of
``gramnewton train`` (issue 15)."""

from __future__ import annotations

import math

import pytest
import torch
from test_classification_lab import CLASSIFY
from test_experiments import TINY, _losses
from test_lab_reliability import one_line_error

from gramnewton.lab.cli import main
from gramnewton.lab.experiments import runner
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.early_stopping import BEST, EarlyStopping, load_best
from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.reproduce import CONFIGS_DIR
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.setup import build_model, load_data, validation_split
from gramnewton.lab.experiments.training import Callback, evaluate, fit, make_train_step

# A run that over-fits within a few epochs: 256 training images, 64 of them held out.
VALIDATED = (
    TINY.format(optimizer="ggn", hyper="alpha = 0.3")
    .replace("epochs = 3", "epochs = 30\nearly_stopping_patience = 3\nkeep_best = true")
    .replace("test_subset = 64", "test_subset = 64\nvalidation_fraction = 0.25")
)
# digits on Adam, a quarter of the training images held out, the best-validation model kept
CLASSIFY_VALIDATED = (
    CLASSIFY.format(optimizer="adam", hyper="lr = 0.01").replace(
        "test_subset = 64", "test_subset = 64\nvalidation_fraction = 0.25"
    )
    + "keep_best = true\n"
)
# The metrics columns of a regression run before the validation split existed.
COLUMNS = ["epoch", "step", "seconds", "running_loss", "train_loss", "test_loss", "train_rmse", "test_rmse"]
COLUMNS += ["gain_ratio", "alpha", "step_norm", "rejected", "jitter", "condition"]


@pytest.fixture
def validated(tmp_path):
    path = tmp_path / "validated.toml"
    path.write_text(VALIDATED)
    return path


WITHOUT = ["data.validation_fraction=0", "train.early_stopping_patience=0", "train.keep_best=false"]


def test_validation_split_is_disjoint_reproducible_and_spares_the_test_set(validated):
    config, plain = load_config(validated), load_config(validated, WITHOUT)
    whole = load_data(plain, "train")
    train, held = load_data(config, "train"), load_data(config, "validation")
    assert (len(whole), len(train), len(held)) == (256, 192, 64)
    index_train, index_held = validation_split(256, 0.25, config["seed"])
    assert set(index_train.tolist()).isdisjoint(index_held.tolist())
    assert sorted(index_train.tolist() + index_held.tolist()) == list(range(256))
    assert torch.equal(train.inputs, whole.inputs[index_train]) and torch.equal(held.targets, whole.targets[index_held])
    assert held.scale == whole.scale  # errors in degrees as before
    assert torch.equal(load_data(load_config(validated), "validation").inputs, held.inputs)  # reproducible
    _, other = validation_split(256, 0.25, config["seed"] + 1)
    assert not torch.equal(other, index_held)  # the seed chooses the split
    assert torch.equal(load_data(config, "test").inputs, load_data(plain, "test").inputs)


def test_early_stopping_counts_evaluations_without_improvement():
    stopping = EarlyStopping(patience=2)
    verdicts = [stopping.update(e, loss) for e, loss in enumerate([1.0, 0.5, 0.5, math.nan, 0.4, 0.6, 0.7])]
    assert verdicts == [True, True, False, False, True, False, False]  # ties and NaN do not improve
    assert stopping.stop and (stopping.best_epoch, stopping.best_loss, stopping.since_best) == (4, 0.4, 2)
    resumed = EarlyStopping(patience=2)
    resumed.load_state_dict(stopping.state_dict())
    assert resumed == stopping
    never = EarlyStopping()
    assert never.update(0, 1.0) and not any(never.update(e, 1.0) for e in range(1, 100)) and not never.stop


def test_run_stops_after_patience_and_keeps_the_best_model(validated, tmp_path):
    rows = run_experiment(load_config(validated), tmp_path / "run")
    val = [r["val_loss"] for r in rows]
    best = min(range(len(val)), key=val.__getitem__)
    assert 0 < best and rows[-1]["epoch"] == best + 3 < 30  # stopped 3 evaluations after the best
    assert all(v > val[best] for v in val[best + 1 :])
    assert list(rows[0])[:10] == [*COLUMNS[:8], "val_loss", "val_rmse"]
    # best.pt: the best epoch's weights and row; its test MSE is the reported one.
    saved = torch.load(tmp_path / "run" / BEST, weights_only=True)
    assert _losses([saved["row"]]) == _losses([rows[best]])
    config = load_config(validated)
    model = build_model(config, load_data(config, "train"))
    row = load_best(tmp_path / "run", model)
    assert evaluate(model, load_data(config, "test"))[0] == row["test_loss"] != rows[-1]["test_loss"]
    assert evaluate(model, load_data(config, "validation"))[0] == val[best]
    png = tmp_path / "val.png"  # with a run without the split: no line there
    plain = run_experiment(load_config(validated, ["train.epochs=1", *WITHOUT]), tmp_path / "plain")
    assert "val_loss" not in plain[0]
    assert (
        main(["plot", str(tmp_path / "run"), str(tmp_path / "plain"), "--metric", "val_loss", "--out", str(png)]) == 0
    )
    assert png.stat().st_size > 5_000
    # Early stopping changes nothing before it stops: the same run without it, cut at the same epoch.
    free = run_experiment(load_config(validated, ["train.early_stopping_patience=0"]), tmp_path / "free")
    assert _losses(free[: len(rows)]) == _losses(rows) and len(free) == 31


def test_resume_keeps_the_best_so_far_and_the_patience_count(validated, tmp_path):
    full = run_experiment(load_config(validated), tmp_path / "full")
    best = min(range(len(full)), key=lambda e: full[e]["val_loss"])
    steps = full[1]["step"]

    class Interrupt(Callback):  # Ctrl-C in the middle of the epoch after the best + 1
        def on_step(self, state, loss):
            if state.step == (best + 1) * steps + 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(validated), tmp_path / "cut", callbacks=[Interrupt()])
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["early_stopping"]
    assert (saved["best_epoch"], saved["since_best"]) == (best, 1)
    resumed = run_experiment(load_config(validated), tmp_path / "cut", resume=True)
    assert _losses(resumed) == _losses(full)
    assert _losses([load_best(tmp_path / "cut")]) == _losses([full[best]])
    # A stopped run stays stopped, also with a larger epoch budget.
    again = run_experiment(load_config(validated, ["train.epochs=40"]), tmp_path / "cut", resume=True)
    assert _losses(again) == _losses(full)


def test_default_config_trains_as_before(tmp_path, validated):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(optimizer="ggn", hyper="alpha = 0.3"))
    config = load_config(path)
    run_experiment(load_config(validated, ["train.epochs=2"]), tmp_path / "run")
    assert (tmp_path / "run" / BEST).is_file()
    rows = run_experiment(config, tmp_path / "run", overwrite=True)  # the replaced run's best.pt goes too
    assert list(rows[0]) == COLUMNS and not (tmp_path / "run" / BEST).exists()
    assert list(read_rows(tmp_path / "run" / "metrics.csv")[0]) == COLUMNS
    # The run's final weights are those of the one training loop on the whole training set.
    train_set = load_data(config, "train")
    assert len(train_set) == 256
    model = build_model(config, train_set)
    optimizer = build_optimizer({**config["optimizer"], "weight_decay": config["train"]["weight_decay"]}, model)
    fit(make_train_step(model, optimizer), train_set, batch_size=64, seed=config["seed"], epochs=3)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_seconds_budget_ends_at_an_epoch_and_evaluates_it(validated, tmp_path):
    overrides = ["train.epochs=5", "train.eval_every=2", "train.early_stopping_patience=0"]
    full = run_experiment(load_config(validated, overrides), tmp_path / "full")
    rows = run_experiment(load_config(validated, [*overrides, "train.seconds=1e-9"]), tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1] and math.isfinite(rows[1]["test_loss"] + rows[1]["val_loss"])
    assert math.isnan(full[1]["test_loss"])  # epoch 1 is evaluated only because the budget ended there
    again = run_experiment(load_config(validated, [*overrides, "train.seconds=1e-9"]), tmp_path / "run", resume=True)
    assert _losses(again) == _losses(rows)
    # More seconds (0: no limit) continue the run as if it had not stopped.
    more = run_experiment(load_config(validated, overrides), tmp_path / "run", resume=True)
    assert _losses(more[2:]) == _losses(full[2:])


def test_classification_run_logs_validation_accuracy(tmp_path, capsys):
    path = tmp_path / "classify.toml"
    path.write_text(CLASSIFY_VALIDATED)
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "best model" in out and "test accuracy" in out and "stopped early" not in out
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert load_best(tmp_path / "run")["epoch"] == min(rows, key=lambda r: r["val_loss"])["epoch"]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["data.validation_fraction=1"], "data.validation_fraction must be a number in [0, 1)"),
        (["data.validation_fraction=-0.1"], "data.validation_fraction must be a number >= 0"),
        (["data.validation_fraction=0", "train.early_stopping_patience=0"], "train.keep_best needs a validation split"),
        (["data.validation_fraction=0", "train.keep_best=false"], "train.early_stopping_patience needs a validation"),
        (["train.keep_best=1"], "train.keep_best must be true or false"),
        (["train.early_stopping_patience=1.5"], "train.early_stopping_patience must be an integer"),
        (["train.seconds=-1"], "train.seconds must be a number >= 0"),
        (["train.early_stoping_patience=2"], "did you mean train.early_stopping_patience"),
        (["data.validation_fraction=0.001"], "leaves 0 for validation and 256 for training"),
    ],
)
def test_bad_validation_options_are_one_line_and_change_nothing(validated, tmp_path, capsys, overrides, named):
    args = ["train", str(validated), "--out", str(tmp_path / "run")]
    assert main([*args, *(a for o in overrides for a in ("--set", o))]) != 0
    assert named in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_several_processes_refuse_early_stopping(validated, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_rank_and_world", lambda: (0, 2))
    with pytest.raises(ValueError, match="need one process"):
        run_experiment(load_config(validated), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="need one process"):
        run_experiment(load_config(validated, ["train.early_stopping_patience=0", "train.seconds=5"]), tmp_path / "run")


@pytest.mark.parametrize("name", ["rotated_mnist_ggn_fixup", "rotated_mnist_adam_fixup"])
def test_packaged_early_stopping_configs_hold_out_a_tenth(name):
    config = load_config(CONFIGS_DIR / f"{name}.toml")
    assert config["train"]["early_stopping_patience"] == 5 and config["train"]["keep_best"]
    assert [len(load_data(config, split)) for split in ("train", "validation", "test")] == [3600, 400, 1000]


def test_validation_folds_are_disjoint_cover_the_training_set_and_fold_zero_is_the_plain_split(validated):
    """K-fold cross-validation: ``round(1 / fraction)`` folds whose held-out parts partition the
    training set; fold 0 holds out what ``validation_fraction`` alone does."""
    plain = validation_split(824, 0.2, 3)
    folds = [validation_split(824, 0.2, 3, fold) for fold in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(plain, folds[0]))
    assert [len(held) for _, held in folds] == [165, 165, 165, 165, 164]
    assert sorted(torch.cat([held for _, held in folds]).tolist()) == list(range(824))
    for train, held in folds:
        assert set(train.tolist()).isdisjoint(held.tolist()) and len(train) + len(held) == 824
    with pytest.raises(ValueError, match="validation fold 5 out of range"):
        validation_split(824, 0.2, 3, 5)
    # through the config: data.validation_fold, checked against the fraction
    config = load_config(validated, ["data.validation_fold=3"])  # a quarter held out: folds 0-3
    whole = load_data(load_config(validated, WITHOUT), "train")
    index_train, index_held = validation_split(256, 0.25, config["seed"], 3)
    assert torch.equal(load_data(config, "validation").inputs, whole.inputs[index_held])
    assert torch.equal(load_data(config, "train").targets, whole.targets[index_train])
    with pytest.raises(ValueError, match=r"validation_fold = 4 is out of range: .* gives 4 folds \(0 to 3\)"):
        load_config(validated, ["data.validation_fold=4"])
    with pytest.raises(ValueError, match="validation_fold needs a validation split"):
        load_config(validated, [*WITHOUT, "data.validation_fold=1"])
