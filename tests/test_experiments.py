"""Experiment runner: configs and overrides, train/resume equality, checkpoints, plot, reproduce."""

from __future__ import annotations

import math

import pytest
import torch

from gramnewton.lab.cli import main
from gramnewton.lab.experiments.config import dumps, load_config, parse_override, resolve
from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.step_diagnostics import DIAGNOSTIC_COLUMNS, DiagnosticsLog
from gramnewton.lab.experiments.training import Callback

TINY = """
name = "tiny"
seed = 3
[model]
name = "mlp"
kwargs = {{ in_channels = 64, hidden = [32] }}
[data]
name = "rotated-digits"
train_subset = 256
test_subset = 64
[optimizer]
name = "{optimizer}"
{hyper}
[train]
batch_size = 64
epochs = 3
threads = 1
"""
HYPER = {
    "ggn": "alpha = 0.3",
    "sgd": "lr = 0.05",
    "adam": "lr = 0.001",
    "kfac": "lr = 0.02\ninverse_every = 2\nfactor_every = 1",
}


def tiny_config(tmp_path, optimizer="ggn"):
    path = tmp_path / f"tiny_{optimizer}.toml"
    path.write_text(TINY.format(optimizer=optimizer, hyper=HYPER[optimizer]))
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optimizer.alpha=0.1", ("optimizer.alpha", 0.1)),
        ("train.epochs=3", ("train.epochs", 3)),
        ("data.name=rotated-mnist", ("data.name", "rotated-mnist")),
        ('data.root="/a b"', ("data.root", "/a b")),
        ("data.kwargs={ size = 32 }", ("data.kwargs", {"size": 32})),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_config_defaults_overrides_and_round_trip(tmp_path):
    config = load_config(tiny_config(tmp_path), ["optimizer.alpha=0.1", "train.weight_decay=0.0"])
    assert config["optimizer"] == {"name": "ggn", "alpha": 0.1}
    assert config["train"]["weight_decay"] == 0.0 and config["train"]["eval_every"] == 1
    assert config["data"]["image_size"] == 0 and config["warm_start"] == {"run": ""}
    (tmp_path / "saved.toml").write_text(dumps(config))
    assert load_config(tmp_path / "saved.toml") == config
    with pytest.raises(ValueError, match="model.name"):
        resolve({"data": {"name": "x"}, "optimizer": {"name": "sgd"}})
    with pytest.raises(ValueError, match="key=value"):
        parse_override("optimizer.alpha")


def _losses(rows):
    """Rows without the wall-clock seconds, NaN as None so that equal rows compare equal."""
    return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("optimizer", ["ggn", "kfac"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, optimizer):
    path = tiny_config(tmp_path, optimizer)
    full = run_experiment(load_config(path), tmp_path / "full")
    assert [r["epoch"] for r in full] == [0, 1, 2, 3] and [r["step"] for r in full] == [0, 4, 8, 12]
    assert all(math.isfinite(r["test_rmse"]) for r in full)
    # Killed after epoch 1: a run of 1 epoch, then resumed to 3.
    run_experiment(load_config(path, ["train.epochs=1"]), tmp_path / "split")
    resumed = run_experiment(load_config(path), tmp_path / "split", resume=True)
    assert _losses(resumed) == _losses(full)

    # Ctrl-C in the middle of epoch 2 (after its 2nd step), then resumed.
    class Interrupt(Callback):
        def on_step(self, state, loss):
            if state.step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(path), tmp_path / "ctrl-c", callbacks=[Interrupt()])
    saved = torch.load(tmp_path / "ctrl-c" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["batch_losses"]) == 2 and saved["step"] == 6
    resumed = run_experiment(load_config(path), tmp_path / "ctrl-c", resume=True)
    assert _losses(resumed) == _losses(full)
    assert _losses(read_rows(tmp_path / "ctrl-c" / "metrics.csv")) == _losses(
        read_rows(tmp_path / "full" / "metrics.csv")
    )


def test_deterministic_run_times_no_conv_path_repeats_bit_for_bit_and_restores_the_setting(tmp_path):
    from gramnewton.engines import handlers

    seen = []

    class Watch(Callback):
        def on_step(self, state, loss):
            seen.append(torch.are_deterministic_algorithms_enabled())

    class Interrupt(Callback):
        def on_step(self, state, loss):
            raise KeyboardInterrupt

    path = tiny_config(tmp_path)
    sets = ["model.name=resnet8_fixup", "model.kwargs={}", "train.epochs=2", "train.deterministic=true"]
    first = run_experiment(load_config(path, sets), tmp_path / "a", callbacks=[Watch()])
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    choice = handlers.CONV_WEIGHT_PATHS
    assert choice.used and not choice.trials  # every convolution ran its first path, none was timed
    assert _losses(run_experiment(load_config(path, sets), tmp_path / "b")) == _losses(first)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(path, sets), tmp_path / "c", callbacks=[Interrupt()])
    assert not torch.are_deterministic_algorithms_enabled()
    # the same run without it times the candidate paths of its convolutions (what the setting removes)
    run_experiment(load_config(path, sets[:-1]), tmp_path / "d")
    assert choice.trials


def test_ggn_diagnostics_columns_and_plot(tmp_path):
    ggn = run_experiment(load_config(tiny_config(tmp_path)), tmp_path / "ggn")
    assert ggn[0]["alpha"] != ggn[0]["alpha"]  # epoch 0: no step yet
    for row in ggn[1:]:
        assert row["alpha"] > 0 and row["step_norm"] > 0 and row["condition"] >= 1 and row["jitter"] >= 0
        assert math.isfinite(row["gain_ratio"])  # the tiny run's default damping measures it
        assert row["rejected"] == int(row["rejected"]) and 0 <= row["rejected"] <= 4
    written = read_rows(tmp_path / "ggn" / "metrics.csv")
    assert [r["alpha"] for r in written[1:]] == [r["alpha"] for r in ggn[1:]]
    sgd = run_experiment(load_config(tiny_config(tmp_path, "sgd"), ["train.epochs=1"]), tmp_path / "sgd")
    assert all(r[c] != r[c] for r in sgd for c in DIAGNOSTIC_COLUMNS)  # NaN: no GGN diagnostics
    png = tmp_path / "diag.png"
    assert main(["plot", str(tmp_path / "ggn"), str(tmp_path / "sgd"), "--diagnostics", "--out", str(png)]) == 0
    assert png.stat().st_size > 5_000
    assert main(["plot", str(tmp_path / "ggn"), "--metric", "step_norm", "--out", str(png)]) == 0


def test_diagnostics_summary_of_rejected_and_unmeasured_steps():
    steps = [
        [0.5, 0.3, 1.0, 0.0, 0.0, 10.0],
        [math.nan, 0.6, 3.0, 1.0, 1e-6, math.nan],
        [1.5, 1.2, 2.0, 0.0, 0.0, 30.0],
    ]
    summary = DiagnosticsLog(torch.optim.SGD([torch.zeros(1)], lr=0.1), steps).summary()
    assert summary == {
        "gain_ratio": 1.0,
        "alpha": 1.2,
        "step_norm": 2.0,
        "rejected": 1.0,
        "jitter": 1e-6,
        "condition": 20.0,
    }


def test_resume_refuses_another_config(tmp_path):
    path = tiny_config(tmp_path, "sgd")
    run_experiment(load_config(path, ["train.epochs=1"]), tmp_path / "run")
    with pytest.raises(ValueError, match="another config"):
        run_experiment(load_config(path, ["optimizer.lr=0.1"]), tmp_path / "run", resume=True)


def test_train_command_plot_and_warm_start(tmp_path, capsys):
    path = tiny_config(tmp_path, "adam")
    assert main(["train", str(path), "--out", str(tmp_path / "a"), "--set", "train.epochs=2"]) == 0
    assert "test RMSE" in capsys.readouterr().out
    assert load_config(tmp_path / "a" / "config.toml")["train"]["epochs"] == 2
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert set(saved) >= {"model", "optimizer", "epoch", "step", "seconds", "rng", "rows"} and saved["epoch"] == 2
    # Warm start of an SGD run from the Adam run: epoch 0 evaluates the Adam run's final weights.
    assert (
        main(
            [
                "train",
                str(tiny_config(tmp_path, "sgd")),
                "--out",
                str(tmp_path / "b"),
                "--set",
                "train.epochs=1",
                "--set",
                f"warm_start.run={tmp_path / 'a'}",
            ]
        )
        == 0
    )
    a, b = read_rows(tmp_path / "a" / "metrics.csv"), read_rows(tmp_path / "b" / "metrics.csv")
    assert b[0]["test_loss"] == pytest.approx(a[-1]["test_loss"], rel=1e-6)
    png = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--x", "time", "--log", "--out", str(png)]) == 0
    assert png.stat().st_size > 5_000


def test_warm_start_adapts_input_channels_and_head():
    from torch import nn

    from gramnewton.lab.experiments.setup import _adapt

    rgb = torch.randn(16, 3, 3, 3)
    gray = _adapt(rgb, torch.zeros(16, 1, 3, 3))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(nn.functional.conv2d(x.expand(-1, 3, -1, -1), rgb), nn.functional.conv2d(x, gray))
    fresh = torch.zeros(5, 64)
    assert _adapt(torch.randn(1, 64), fresh) is fresh
    assert _adapt(torch.randn(4, 4), torch.zeros(3, 5)) is None


def test_reproduce_test_budget(tmp_path, capsys):
    assert main(["reproduce", "fig2", "--test-budget", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "stand-in" in printed
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {
        "reproduce_fig2a_rsna-standin-rotated-digits.png",
        "reproduce_fig2c_rsna-standin-rotated-digits.png",
    } <= names
    # A second call reuses every finished run.
    assert main(["reproduce", "fig2", "--test-budget", "--out", str(tmp_path)]) == 0
    assert "ran in" not in capsys.readouterr().out


def test_train_step_gives_a_ggn_classifier_outputs_and_labels():
    from gramnewton import GramGaussNewton
    from gramnewton.lab.experiments.training import make_train_step

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, labels = torch.randn(16, 4), torch.randint(0, 3, (16,))
    step = make_train_step(
        model, GramGaussNewton(model, loss="cross_entropy", alpha=1.0, lam=1.0, adaptive_damping=False, momentum=0.0)
    )
    before = float(torch.nn.functional.cross_entropy(model(x), labels))
    assert float(step(x, labels)) == pytest.approx(before, rel=1e-5)
    assert float(torch.nn.functional.cross_entropy(model(x), labels)) < before
