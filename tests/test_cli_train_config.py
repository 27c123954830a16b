"""``gramnewton train`` and its config checks: the defects of the CLI audit (one test per defect).

Each case is a row of "Data, runs and the command line" in docs/reliability.md: one line on stderr,
``error: <what and how to fix>``, exit 1 (2 for usage errors), and a run folder that is not
created or changed when set-up fails.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import pytest
import torch
from test_lab_reliability import TINY, one_line_error, snapshot

from gramnewton.lab.cli import main
from gramnewton.lab.commands import train as train_command
from gramnewton.lab.experiments import runner
from gramnewton.lab.experiments.config import load_config, resolve
from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.optimizers import OPTIMIZERS, build_optimizer
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.training import Callback, ProgressBar, fit
from gramnewton.lab.models import get_model


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def train(tiny: Path, out: Path, *options: str) -> int:
    """``gramnewton train tiny --out out *options``; ``--set`` is implied for ``key=value``."""
    args = ["train", str(tiny), "--out", str(out)]
    for option in options:
        args += ["--set", option] if "=" in option and not option.startswith("--") else [option]
    return main(args)


def refused(tiny: Path, tmp_path: Path, capsys, *options: str) -> str:
    """The one-line error of a run that must fail at the config check, its folder never created."""
    out = tmp_path / "refused"
    capsys.readouterr()  # what a run before printed
    assert train(tiny, out, *options) == 1
    assert not out.exists()
    return one_line_error(capsys)


# ------------------------------------------------ 1: every optimizer of the factory trains


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_of_the_factory_trains_and_resumes(tmp_path, tiny, name):
    """lbfgs failed with ``TypeError: LBFGS.__init__() got an unexpected keyword argument
    'weight_decay'`` (the runner passed train.weight_decay to every optimizer)."""
    out = tmp_path / name
    decay = "train.weight_decay=0" if name == "lbfgs" else "train.weight_decay=0.0001"
    assert train(tiny, out, f"optimizer.name={name}", decay) == 0
    assert train(tiny, out, f"optimizer.name={name}", decay, "train.epochs=2", "--resume") == 0
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and math.isfinite(float(rows[-1]["train_loss"]))


def test_weight_decay_for_lbfgs_is_refused(tmp_path, capsys, tiny):
    line = refused(tiny, tmp_path, capsys, "optimizer.name=lbfgs", "train.weight_decay=0.0001")
    assert "lbfgs has no weight decay: set train.weight_decay = 0" in line


# ------------------------------------------------ 2: --resume never overwrites other files


def test_resume_into_a_folder_without_a_checkpoint_keeps_its_files(tmp_path, capsys, tiny):
    """Was: ``--resume: no checkpoint in rr, starting from scratch`` and both files replaced."""
    out = tmp_path / "rr"
    out.mkdir()
    (out / "metrics.csv").write_text("epoch,train_loss\n1,0.5\n")
    (out / "config.toml").write_text("important\n")
    before = snapshot(out)
    assert train(tiny, out, "--resume") == 1
    line = one_line_error(capsys)
    assert "holds no checkpoint and no run of this config" in line and "--overwrite" in line
    assert "starting from scratch" not in capsys.readouterr().out
    assert snapshot(out) == before
    assert train(tiny, out, "--overwrite") == 0  # the way out the message names


def test_resume_of_this_configs_run_without_a_checkpoint_starts_over(tmp_path, capsys, tiny):
    """A run of this config that ended before its first checkpoint (config.toml and the epoch-0
    row only) is started from scratch, as before."""
    out = tmp_path / "run"
    assert train(tiny, out) == 0
    (out / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert train(tiny, out, "--resume", "train.epochs=2") == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert [int(r["epoch"]) for r in read_rows(out / "metrics.csv")] == [0, 1, 2]


# ------------------------------------------------ 3: --resume and --overwrite exclude each other


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    assert train(tiny, out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert train(tiny, out, "--resume", "--overwrite") == 2
    assert "--overwrite: not allowed with argument --resume" in one_line_error(capsys)
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="exclude each other"):
        run_experiment(load_config(tiny), out, resume=True, overwrite=True)


# ------------------------------------------------ 4: config types


def test_adam_betas_is_a_list_of_two_numbers(tmp_path, capsys, tiny):
    """(a) Was: ``optimizer.betas must be tuple ...`` for every TOML value."""
    assert train(tiny, tmp_path / "adam", "optimizer.name=adam", "optimizer.betas=[0.9, 0.99]") == 0
    config = load_config(tmp_path / "adam" / "config.toml")
    assert config["optimizer"]["betas"] == [0.9, 0.99]
    optimizer = build_optimizer(config["optimizer"], get_model("mlp", in_channels=4, hidden=[3]))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    line = refused(tiny, tmp_path, capsys, "optimizer.name=adam", "optimizer.betas=[0.9]")
    assert "optimizer.betas must be a list of 2 numbers" in line


@pytest.mark.parametrize(
    "optimizer, key, value",
    [
        ("kfac", "factor_every", "2.5"),
        ("ggn", "top_c", "1.5"),
        ("lbfgs", "max_iter", "2.5"),
        ("lbfgs", "history_size", "3.0"),
    ],
)
def test_integer_hyper_parameters_refuse_floats(tmp_path, capsys, tiny, optimizer, key, value):
    """(b) Was: trained (kfac factor_every = 2.5)."""
    line = refused(
        tiny, tmp_path, capsys, f"optimizer.name={optimizer}", "train.weight_decay=0", f"optimizer.{key}={value}"
    )
    assert f"optimizer.{key} must be an integer" in line


@pytest.mark.parametrize(
    "options, named",
    [
        (("optimizer.foreach=no",), "optimizer.foreach must be true or false (default None), got 'no'"),
        (("optimizer.name=adam", "optimizer.fused=1"), "optimizer.fused must be true or false"),
        (("optimizer.name=kfac", "optimizer.kl_clip=off"), "optimizer.kl_clip must be a number"),
        (("optimizer.name=ggn", "optimizer.process_group=world"), "optimizer.process_group cannot be set"),
        (
            ("optimizer.name=lbfgs", "train.weight_decay=0", "optimizer.line_search_fn=wolfe"),
            "optimizer.line_search_fn for lbfgs must be one of strong_wolfe",
        ),
        (
            ("optimizer.name=lbfgs", "train.weight_decay=0", "optimizer.max_eval=2.5"),
            "optimizer.max_eval must be an integer",
        ),
    ],
)
def test_keys_with_a_none_default_are_checked(tmp_path, capsys, tiny, options, named):
    """(c) Was: trained with sgd ``foreach = "no"`` (None defaults were not checked)."""
    assert named in refused(tiny, tmp_path, capsys, *options)
    resolve(load_config(tiny), ["optimizer.foreach=false"])  # a boolean is fine


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_for_every_optimizer(tmp_path, capsys, tiny, name, value):
    """(d) Was: ``optimizer.lr = nan`` trained sgd, adam and kfac into NaN losses."""
    line = refused(tiny, tmp_path, capsys, f"optimizer.name={name}", "train.weight_decay=0", f"optimizer.lr={value}")
    assert "optimizer.lr must be a number (default " in line and line.endswith(f"got {float(value)!r}")


def test_non_finite_list_items_are_refused(tmp_path, capsys, tiny):
    assert "optimizer.betas must be a list of 2 numbers" in refused(
        tiny, tmp_path, capsys, "optimizer.name=adam", "optimizer.betas=[nan, 0.99]"
    )


@pytest.mark.parametrize(
    "options, named",
    [
        (
            ("model.kwargs.hiden=[4]",),
            "unknown config key model.kwargs.hiden for mlp (did you mean model.kwargs.hidden?); "
            "mlp accepts in_channels, num_outputs, hidden, act",
        ),
        (("model.kwargs.hidden=[16.5]",), "model.kwargs.hidden must be a list of integers"),
        (('model.kwargs.in_channels="64"',), "model.kwargs.in_channels must be an integer, got '64'"),
        (("model.name=resnet8_gn", "model.kwargs={_d = 20}"), "unknown config key model.kwargs._d for resnet8_gn"),
        (("data.kwargs.standardise=no",), "data.kwargs.standardise must be true or false (default False), got 'no'"),
        (
            ("data.kwargs.sede=1",),
            "unknown config key data.kwargs.sede for rotated-digits (did you mean data.kwargs.seed?)",
        ),
        (("data.kwargs.root=x",), "data.kwargs.root is not allowed: it is set by data.root"),
        (
            ("data.name=afad-lite", "data.root=/nonexistent", "data.kwargs.skip_bad=no"),
            "data.kwargs.skip_bad must be true or false (default False), got 'no'",
        ),
    ],
)
def test_model_and_data_kwargs_are_checked_against_their_builder(tmp_path, capsys, tiny, options, named):
    """(e) Was: ``TypeError: mlp() got an unexpected keyword argument 'hiden'``, and ``skip_bad =
    "no"`` taken as true."""
    assert named in refused(tiny, tmp_path, capsys, *options)


def test_solve_dtype_takes_a_dtype_name(tmp_path, capsys, tiny):
    """(f) Was: ``Invalid solve_dtype: 'float64' (must be None, torch.float32 or torch.float64)``."""
    out = tmp_path / "ggn"
    assert train(tiny, out, "optimizer.name=ggn", "optimizer.solve_dtype=float64") == 0
    config = load_config(out / "config.toml")
    optimizer = build_optimizer(config["optimizer"], get_model("mlp", in_channels=4, hidden=[3]))
    assert optimizer.solve_dtype is torch.float64
    line = refused(tiny, tmp_path, capsys, "optimizer.name=ggn", "optimizer.solve_dtype=float16")
    assert "optimizer.solve_dtype must be one of 'float32', 'float64'" in line


# ------------------------------------------------ 5: the seed's range


def test_an_over_large_seed_is_refused_before_anything_is_written(tmp_path, capsys, tiny):
    """Was: ``error: Overflow when unpacking long long`` after config.toml and metrics.csv were written."""
    line = refused(tiny, tmp_path, capsys, "seed=92233720368547758")
    assert line == "error: seed must be an integer in [0, 100000000), got 92233720368547758"
    # the largest seed trains, with the augmentation's derived seeds too
    assert train(tiny, tmp_path / "big", "seed=99999999", "train.shift=1", "train.epochs=2") == 0


# ------------------------------------------------ 6: the progress bar's total


class _Bars(list):
    """Records the progress bars the train command builds."""

    def __call__(self, *args, **kwargs) -> ProgressBar:
        self.append(ProgressBar(*args, **kwargs))
        return self[-1]


def test_the_progress_bar_ends_at_its_total_under_a_time_budget(tmp_path, tiny, monkeypatch):
    """Was: ``98/20000`` when train.seconds ended a run of 1000 epochs."""
    bars = _Bars()
    monkeypatch.setattr(train_command, "ProgressBar", bars)
    out = tmp_path / "run"
    assert train(tiny, out, "train.epochs=1000", "train.seconds=0.3") == 0
    steps = int(read_rows(out / "metrics.csv")[-1]["step"])
    assert steps < 2 * 1000 and bars[0].bar.n == bars[0].bar.total == steps


def test_the_progress_bar_estimates_the_steps_a_time_budget_allows():
    """The total while running: whole epochs up to the one ending past the budget, at the speed so far."""
    dataset = torch.utils.data.TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    totals: list[int] = []

    class Watch(Callback):
        def on_step(self, state, loss):
            totals.append(bar.bar.total)

        def on_epoch_end(self, state, running_loss):
            return state.seconds >= 0.2  # the runner's train.seconds

    def step(x, y):
        time.sleep(0.01)
        return torch.tensor(0.0)

    bar = ProgressBar("t", seconds=0.2, file=io.StringIO())
    state = fit(step, dataset, batch_size=4, epochs=1000, callbacks=[bar, Watch()])
    assert state.step < 40  # about 0.2 s of 10 ms steps, 2 a epoch
    assert all(total % 2 == 0 and total < 60 for total in totals[1:])
    assert bar.bar.total == bar.bar.n == state.step


# ------------------------------------------------ 7: a config file that is not UTF-8


def test_a_config_that_is_not_utf8_is_named(tmp_path, capsys):
    """Was: ``error: 'utf-8' codec can't decode byte 0xe9 in position 11 ...`` without the file."""
    path = tmp_path / "bad8.toml"
    path.write_bytes(TINY.encode().replace(b'"tiny"', b'"caf\xe9"'))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 1
    line = one_line_error(capsys)
    assert str(path) in line and "byte 0xe9 on line 2 is not UTF-8" in line
    assert not (tmp_path / "run").exists()


# ------------------------------------------------ 8: Ctrl-C during start-up


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _main_or_fail(args: list[str]) -> int:
    try:
        return main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main (a traceback)")


@pytest.mark.parametrize(
    "where",
    [
        (train_command, "load_config"),  # reading the config, before the run folder is looked at
        (runner, "load_data"),  # a second Ctrl-C while the data loads (the first waits for a step)
    ],
)
def test_ctrl_c_during_start_up_is_one_line(tmp_path, capsys, tiny, monkeypatch, where):
    """Was: a 25-line ``KeyboardInterrupt`` traceback."""
    monkeypatch.setattr(*where, _interrupt)
    assert _main_or_fail(["train", str(tiny), "--out", str(tmp_path / "run")]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "interrupted" and "Traceback" not in captured.out
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_start_up_of_a_resume_keeps_the_run(tmp_path, capsys, tiny, monkeypatch):
    out = tmp_path / "run"
    assert train(tiny, out) == 0
    before = snapshot(out)
    monkeypatch.setattr(runner, "load_data", _interrupt)
    assert _main_or_fail(["train", str(tiny), "--out", str(out), "--resume", "--set", "train.epochs=2"]) == 130
    assert snapshot(out) == before


# ------------------------------------------------ 9: an MLP on image data


@pytest.mark.parametrize("model", ["model.name=mlp", "model.name=two_layer"])
def test_a_flattening_model_on_images_needs_no_in_channels(tmp_path, tiny, model):
    """Was: ``RuntimeError: mat1 and mat2 shapes cannot be multiplied (128x64 and 1x16)``: the
    model got the channel count (1), not the flattened size (1 x 8 x 8)."""
    kwargs = "model.kwargs={hidden = [16]}" if model.endswith("mlp") else "model.kwargs={width = 16}"
    assert train(tiny, tmp_path / "run", model, kwargs) == 0
    assert math.isfinite(float(read_rows(tmp_path / "run" / "metrics.csv")[-1]["test_loss"]))
