"""What the lab reports and how it builds optimizers, each checked against a dense recomputation:
evaluation (losses, accuracy, modes), the metrics rows of a run, GGN's per-epoch diagnostics and
the optimizer factory (defaults, keys, weight decay)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gramnewton import GramGaussNewton
from gramnewton.lab.data.base import TargetScale, TensorRegressionDataset
from gramnewton.lab.data.classification import TensorClassificationDataset
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.setup import CHECKPOINT, build_model, load_data
from gramnewton.lab.experiments.step_diagnostics import DiagnosticsLog
from gramnewton.lab.experiments.training import Callback, EpochEvaluator, FitState, evaluate, fit, make_train_step


def _net(k: int, *middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 6), *middle, nn.Tanh(), nn.Linear(6, k)).double()


# ---------------------------------------------------------------- evaluation


def test_evaluation_leaves_a_frozen_batchnorm_frozen():
    """GGN refuses a BatchNorm in training mode and says to put it in eval mode; the evaluation
    before the first epoch then put it back in training mode (``model.train(True)``), so fit's
    first GGN step raised. Every module now gets its own mode back, also after an error."""
    torch.manual_seed(0)
    data = TensorRegressionDataset(torch.randn(24, 3), torch.randn(24))
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.3), nn.Tanh(), nn.Linear(5, 1))
    model[1].eval()  # a frozen BatchNorm: its running statistics, per-sample independent
    evaluator = EpochEvaluator(model, data, data)
    fit(make_train_step(model, GramGaussNewton(model)), data, batch_size=8, epochs=2, callbacks=[evaluator])
    assert [r.epoch for r in evaluator.records] == [0, 1, 2]
    assert (model.training, model[1].training, model[2].training) == (True, False, True)

    def fail(module: nn.Module, inputs: tuple) -> None:
        assert not module.training  # evaluated in eval mode
        raise RuntimeError("forward failed")

    handle = model[4].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="forward failed"):
        evaluate(model, data)
    handle.remove()
    assert (model.training, model[1].training, model[2].training) == (True, False, True)


@pytest.mark.parametrize("task", ["mse", "cross_entropy"])
def test_evaluation_is_the_dense_loss_over_every_sample(task):
    """A last partial batch weighted by its samples, Dropout off, no gradient, train mode after."""
    torch.manual_seed(1)
    x = torch.randn(7, 3, dtype=torch.float64)
    if task == "mse":
        data, k = TensorRegressionDataset(x, torch.randn(7, 2)), 2
    else:
        data, k = TensorClassificationDataset(x, torch.tensor([0, 2, 1, 1, 0, 2, 2]), 3), 3
    model = _net(k, nn.Dropout(0.5))
    data.inputs = data.inputs.double()
    loss, acc = evaluate(model, data, task, batch_size=3)  # batches of 3, 3 and 1
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(data.inputs)
    if task == "mse":
        assert loss == pytest.approx(float((out - data.targets.double()).pow(2).mean()), rel=1e-12)
        assert math.isnan(acc)
    else:
        dense = -F.log_softmax(out, 1).gather(1, data.labels[:, None]).mean()
        assert loss == pytest.approx(float(dense), rel=1e-12)
        assert acc == pytest.approx(float((out.argmax(1) == data.labels).double().mean()), abs=1e-15)


def test_accuracy_counts_a_tie_as_one_over_its_size_and_a_nan_row_as_wrong():
    """``argmax`` picks the first of tied logits: the all-zero logits of a zero-initialised head
    (resnet8_fixup on mnist at epoch 0) scored the frequency of class 0 (0.107 on mnist's test
    split, here 3/6) instead of 1/k, and a diverged model with NaN logits scored it too."""

    class Fixed(nn.Module):
        def __init__(self, logits: torch.Tensor):
            super().__init__()
            self.logits = logits

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits[x[:, 0].long()]

    labels = torch.tensor([0, 0, 0, 1, 2, 3])
    data = TensorClassificationDataset(torch.arange(6.0)[:, None], labels, 4)
    assert evaluate(Fixed(torch.zeros(6, 4)), data, "cross_entropy")[1] == pytest.approx(1 / 4, abs=1e-15)
    assert evaluate(Fixed(torch.full((6, 4), math.nan)), data, "cross_entropy")[1] == 0.0
    logits = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],  # a tie of two with the label: 1/2
            [2.0, 2.0, 2.0, 0.0],  # a tie of three with the label: 1/3
            [0.0, 1.0, 1.0, 0.0],  # a tie without the label: 0
            [0.0, 3.0, 1.0, 0.0],  # right: 1
            [5.0, 0.0, math.nan, 0.0],  # a NaN: 0
            [0.0, 0.0, 0.0, math.inf],  # right: 1
        ]
    )
    assert evaluate(Fixed(logits), data, "cross_entropy")[1] == pytest.approx((1 / 2 + 1 / 3 + 1 + 1) / 6, abs=1e-15)


@pytest.mark.parametrize(
    "name, smoothing",
    [("ggn", 0.0), ("ggn", 0.1), ("sgd", 0.1), ("kfac", 0.0), ("adam", 0.0), ("lbfgs", 0.0), ("ggn-mse", 0.0)],
)
def test_a_steps_loss_is_the_dense_batch_loss_before_the_update(name, smoothing):
    """What ``running_loss`` averages: the mean MSE over ``b*k`` entries, or the mean cross-entropy
    against ``(1 - eps) onehot + eps / k``, of the parameters before the step."""
    torch.manual_seed(4)
    x = torch.randn(7, 3, dtype=torch.float64)
    mse = name in ("ggn-mse", "adam", "lbfgs")
    y = torch.randn(7, 2, dtype=torch.float64) if mse else torch.tensor([0, 2, 1, 1, 0, 2, 2])
    model = _net(2 if mse else 3)
    with torch.no_grad():
        out = model(x)
    if mse:
        dense = (out - y).pow(2).mean()
    else:
        targets = (1 - smoothing) * F.one_hot(y, 3).double() + smoothing / 3
        dense = -(targets * F.log_softmax(out, 1)).sum(1).mean()
    kind = name.removesuffix("-mse")
    hyper = {} if mse or kind in ("sgd", "adam", "lbfgs") else {"loss": "cross_entropy"}
    step = make_train_step(
        model, build_optimizer({"name": kind, **hyper}, model), None if mse else "cross_entropy", smoothing
    )
    assert float(step(x, y)) == pytest.approx(float(dense), rel=1e-14)


# ---------------------------------------------------------------- a run's metrics rows

TINY = """
name = "tiny"
seed = 3
[model]
name = "mlp"
kwargs = {{ in_channels = 64, hidden = [16] }}
[data]
name = "rotated-digits"
train_subset = 250
test_subset = 70
validation_fraction = {validation}
[optimizer]
name = "sgd"
lr = 0.05
[train]
batch_size = 64
epochs = 1
threads = 1
"""


class _StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, state: FitState, loss: float) -> None:
        self.losses.append(loss)


def test_a_runs_rows_equal_a_dense_recomputation_in_the_targets_unit(tmp_path: Path):
    """test/train/val MSE over the whole splits of the final model, RMSE in degrees, and the
    running loss the mean of the epoch's step losses (batches of 64, 64, 64 and 8: each step alike)."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(validation=0.2))
    config = load_config(path)
    steps = _StepLosses()
    rows = run_experiment(config, tmp_path / "run", callbacks=[steps])
    model = build_model(config, load_data(config, "train"))
    model.load_state_dict(torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["model"])
    model.eval()
    last = rows[-1]
    for split, key in (("train", "train"), ("test", "test"), ("validation", "val")):
        data = load_data(config, split)
        with torch.no_grad():
            out = model(data.inputs).double().squeeze(1)
        scale = data.scale
        assert isinstance(scale, TargetScale) and scale.unit == "degrees" and scale.std != 1.0
        mse = float((out - data.targets.double()).pow(2).mean())
        degrees = scale.to_original(out) - scale.to_original(data.targets.double())
        assert last[f"{key}_loss"] == pytest.approx(mse, rel=1e-6)
        assert last[f"{key}_rmse"] == pytest.approx(float(degrees.pow(2).mean().sqrt()), rel=1e-6)
    assert len(steps.losses) == 4  # 200 training samples after the validation split
    assert last["running_loss"] == pytest.approx(sum(steps.losses) / 4, rel=1e-12)


# ---------------------------------------------------------------- GGN's per-epoch diagnostics


def test_the_rejected_column_counts_every_rejected_attempt():
    """With ``retries`` a step whose first attempt the rule undid and whose retry it kept has
    ``rejected=False, retries=1``: the column counted it 0 (8 where 17 attempts were rejected)."""
    torch.manual_seed(2)
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.sin(3 * x).sum(1, keepdim=True)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    damping = {"name": "gain_ratio", "retries": 1, "check_every": 1}
    optimizer = GramGaussNewton(model, lam=1.0, alpha=1e-6, momentum=0.0, adaptive_damping=damping)
    log, state, seen = DiagnosticsLog(optimizer), FitState(), []
    for _ in range(9):
        loss = float(optimizer.step(lambda rows=slice(None): model(x[rows]) - y[rows]))
        state.batch_losses.append(loss)
        log.on_step(state, loss)
        seen.append(optimizer.last_diagnostics)
    assert any(d.retries and not d.rejected for d in seen)  # a retry the rule kept
    summary = log.summary()
    assert summary["rejected"] == sum(d.retries + d.rejected for d in seen) == 17
    assert summary["alpha"] == seen[-1].alpha
    assert summary["jitter"] == max(d.jitter for d in seen)


# ---------------------------------------------------------------- the optimizer factory


def test_an_unknown_optimizer_key_is_refused_with_the_closest_name():
    model = _net(1)
    with pytest.raises(ValueError, match=r"unknown ggn hyper-parameter 'lamb' \(did you mean 'lam'\?\)"):
        build_optimizer({"name": "ggn", "lamb": 8}, model)
    with pytest.raises(ValueError, match="unknown adam hyper-parameter 'zzz'; adam takes lr, betas"):
        build_optimizer({"name": "adam", "zzz": 1}, model)


def test_ggn_from_a_spec_without_hyper_parameters_is_the_constructors_default():
    """Same param_groups and, on a batch, the same step and diagnostics bit for bit; a key reaches
    param_groups."""
    torch.manual_seed(2)
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    models = [_net(1), _net(1)]
    models[1].load_state_dict(models[0].state_dict())
    built, plain = build_optimizer({"name": "ggn"}, models[0]), GramGaussNewton(models[1])
    strip = [{k: v for k, v in g.items() if k != "params"} for g in (built.param_groups[0], plain.param_groups[0])]
    assert strip[0] == strip[1]
    for model, optimizer in zip(models, (built, plain)):
        for _ in range(3):
            make_train_step(model, optimizer)(x, y)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    assert built.last_diagnostics == plain.last_diagnostics
    assert build_optimizer({"name": "ggn", "lam": 8}, _net(1)).param_groups[0]["lam"] == 8


def test_weight_decay_is_coupled_or_decoupled_as_the_runner_documents():
    """GGN ``w <- (1 - lr wd) w - phi`` (phi as without decay); SGD and Adam add ``wd w`` to the
    gradient; K-FAC to its preconditioned direction: one step each against the dense formula."""
    torch.manual_seed(3)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    start = _net(1)
    w0 = [p.detach().clone() for p in start.parameters()]
    loss = F.mse_loss(start(x), y)
    grads = torch.autograd.grad(loss, list(start.parameters()))
    wd = 0.01

    def step(name: str, decay: float, **hyper) -> list[torch.Tensor]:
        model = _net(1)
        model.load_state_dict(start.state_dict())
        optimizer = build_optimizer({"name": name, "weight_decay": decay, **hyper}, model)
        assert optimizer.param_groups[0]["weight_decay"] == decay
        make_train_step(model, optimizer)(x, y)
        return [p.detach() for p in model.parameters()]

    ggn = {"adaptive_damping": False, "lr": 0.5}
    for w, w_free, w_start in zip(step("ggn", wd, **ggn), step("ggn", 0.0, **ggn), w0):
        torch.testing.assert_close(w, w_free - 0.5 * wd * w_start, rtol=0, atol=1e-14)
    for w, g, w_start in zip(step("sgd", wd, lr=0.1), grads, w0):
        torch.testing.assert_close(w, w_start - 0.1 * (g + wd * w_start), rtol=0, atol=1e-14)
    for w, g, w_start in zip(step("adam", wd, lr=0.1), grads, w0):
        coupled = g + wd * w_start  # Adam's first step: lr m_hat / (sqrt(v_hat) + eps)
        torch.testing.assert_close(w, w_start - 0.1 * coupled / (coupled.abs() + 1e-8), rtol=0, atol=1e-12)
    for w, w_free, w_start in zip(step("kfac", wd), step("kfac", 0.0), w0):
        torch.testing.assert_close(w, w_free - 0.02 * wd * w_start, rtol=0, atol=1e-14)
