"""Classification in the lab: data sets (int64 labels, shapes, seeded splits, Fashion-MNIST from a
fixture tree), the training step and the runner's accuracy columns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_data import fashion_tree
from test_experiments import TINY

from gramnewton import GramGaussNewton
from gramnewton.lab.baselines import KFAC
from gramnewton.lab.commands.train import config_path
from gramnewton.lab.data import TensorClassificationDataset, accuracy, get_dataset, is_classification
from gramnewton.lab.data.classification import standardise_images
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.training import EpochEvaluator, FitBudget, FitState, evaluate, make_train_step


@pytest.mark.parametrize("name,shape,sizes", [("digits", (1, 8, 8), (1438, 359)), ("mnist", (1, 28, 28), (4000, 1000))])
def test_embedded_classification_sets(name, shape, sizes):
    train, test = get_dataset(name, split="train"), get_dataset(name, split="test")
    assert (len(train), len(test)) == sizes and is_classification(train) and train.num_classes == 10
    x, y = train[torch.arange(5)]
    assert x.shape == (5, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(train.labels.tolist()) == set(range(10))
    # standardised with the training split's statistics (the test split's own are not 0 and 1)
    raw_train, raw_test = (get_dataset(name, split=s, standardise=False) for s in ("train", "test"))
    assert 0 <= float(raw_train.inputs.min()) and float(raw_train.inputs.max()) <= 1
    mean, std = raw_train.inputs.double().mean(), raw_train.inputs.double().std(unbiased=False)
    assert abs(float(train.inputs.double().mean())) < 1e-5 and float(train.inputs.double().std()) == pytest.approx(
        1, abs=1e-3
    )
    assert torch.allclose(test.inputs.double(), (raw_test.inputs.double() - mean) / std, atol=1e-5)
    assert abs(float(test.inputs.double().mean())) > 1e-3
    # the split is a partition, fixed by the seed
    assert torch.equal(get_dataset(name, split="train").labels, train.labels)
    assert not torch.equal(get_dataset(name, split="train", seed=1).labels, train.labels)


def test_fashion_mnist_from_fixture(tmp_path: Path):
    arrays = fashion_tree(tmp_path)
    train = get_dataset("fashion-mnist", root=str(tmp_path), split="train", standardise=False)
    test = get_dataset("fashion-mnist", root=str(tmp_path), split="test", standardise=False)
    assert (len(train), len(test)) == (len(arrays["train"]), len(arrays["t10k"]))
    assert torch.allclose(train.inputs[:, 0] * 255, torch.as_tensor(arrays["train"]).float())
    standard = get_dataset("fashion-mnist", root=str(tmp_path), split="test")
    assert torch.allclose(standard.inputs, standardise_images(test.inputs, train.inputs))
    assert train.labels.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="fashion-mnist.*make data"):
        get_dataset("fashion-mnist", root=str(tmp_path / "missing"))


def test_standardise_images_is_per_channel():
    train = torch.stack([torch.full((2, 3, 3), 1.0), torch.full((2, 3, 3), 3.0)])
    train[:, 1] = 5.0  # a constant channel: std 0 is replaced by 1
    out = standardise_images(train[:1], train)
    assert torch.allclose(out[:, 0], torch.full((1, 3, 3), -1.0)) and torch.allclose(out[:, 1], torch.zeros(1, 3, 3))


def test_standardised_mnist_takes_resnet_relus_off_their_kink():
    """The reason for standardising (docs/classification.md): on raw pixels most ReLU inputs of a
    Fixup ResNet at initialisation are exactly 0, where autograd's derivative is one-sided."""
    from gramnewton.lab.models import get_model

    def zero_fraction(x: torch.Tensor) -> float:
        torch.manual_seed(0)
        model = get_model("resnet8_fixup", in_channels=1, num_outputs=10)
        with torch.no_grad():  # the input of the network's first ReLU
            return float((model.bias1(model.conv1(x)) == 0).double().mean())

    raw = get_dataset("mnist", split="train", standardise=False).inputs[:16]
    standard = get_dataset("mnist", split="train").inputs[:16]
    assert zero_fraction(raw) > 0.5 and zero_fraction(standard) < 1e-3


def test_labels_are_validated_and_accuracy():
    with pytest.raises(ValueError, match="outside"):
        TensorClassificationDataset(torch.zeros(2, 3), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="integer"):
        TensorClassificationDataset(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 3)
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- the training loop on classification

# the runner tests' tiny config, on the classification data set
CLASSIFY = TINY.replace('name = "rotated-digits"', 'name = "digits"')
CLASSIFY_HYPER = {
    "ggn": 'loss = "cross_entropy"\nalpha = 1.0\nadaptive_damping = true',
    "sgd": "lr = 0.1",
    "adam": "lr = 0.003",
    "kfac": 'loss = "cross_entropy"\nlr = 0.05\ninverse_every = 2\nfactor_every = 1',
}


@pytest.mark.parametrize("optimizer", list(CLASSIFY_HYPER))
def test_classification_run_learns_and_logs_accuracy(tmp_path, optimizer):
    path = tmp_path / f"{optimizer}.toml"
    path.write_text(CLASSIFY.format(optimizer=optimizer, hyper=CLASSIFY_HYPER[optimizer]))
    rows = run_experiment(load_config(path), tmp_path / "run")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"train_accuracy", "test_accuracy", "train_loss"} and "train_rmse" not in rows[0]
    assert rows[0]["train_accuracy"] < 0.3 and rows[-1]["train_accuracy"] > 0.4
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert read_rows(tmp_path / "run" / "metrics.csv")[-1]["test_accuracy"] == pytest.approx(rows[-1]["test_accuracy"])


def test_train_step_losses_and_mismatch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    expected = float(F.cross_entropy(model(x), y))
    ggn = GramGaussNewton(model, loss="cross_entropy", lam=1.0, adaptive_damping=False, momentum=0.0)
    assert float(make_train_step(model, ggn, "cross_entropy")(x, y)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="loss='cross_entropy'"):
        make_train_step(model, ggn, "mse")
    with pytest.raises(ValueError, match="loss='mse'"):
        make_train_step(model, GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0), "cross_entropy")
    with pytest.raises(ValueError, match="loss='mse'"):
        make_train_step(model, KFAC(model), "cross_entropy")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    before = float(F.cross_entropy(model(x), y))
    assert float(make_train_step(model, sgd, "cross_entropy")(x, y)) == pytest.approx(before, rel=1e-6)
    loss, acc = evaluate(model, get_dataset("digits", split="test"), "cross_entropy")
    assert loss > 0 and 0 <= acc <= 1


def test_epoch_evaluator_can_skip_the_train_split():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    train, test = get_dataset("digits", split="train"), get_dataset("digits", split="test")
    both, test_only = EpochEvaluator(model, train, test), EpochEvaluator(model, train, test, train=False)
    for evaluator in (both, test_only):
        evaluator.on_start(FitState(), FitBudget(epochs=1, seconds=math.inf, steps_per_epoch=1))
    (full,), (partial,) = both.records, test_only.records
    assert (partial.test_loss, partial.test_accuracy) == (full.test_loss, full.test_accuracy)
    assert full.train_loss > 0 and full.train_accuracy >= 0
    assert math.isnan(partial.train_loss) and math.isnan(partial.train_accuracy)


CONFIGS = ["mnist_ggn_fixup", "mnist_sgd_fixup", "mnist_adam_fixup", "mnist_kfac_fixup", "digits_ggn_fixup"]


@pytest.mark.parametrize("name", CONFIGS)
def test_packaged_classification_configs_train(tmp_path, name):
    overrides = ["train.epochs=1", "data.train_subset=64", "data.test_subset=32", "train.threads=1"]
    config = load_config(config_path(name), overrides)
    rows = run_experiment(config, tmp_path / name)
    assert [r["epoch"] for r in rows] == [0, 1] and 0 <= rows[-1]["test_accuracy"] <= 1


def test_fashion_mnist_config_names_the_data(tmp_path):
    config = load_config(config_path("fashion_mnist_ggn_fixup"))
    assert config["data"]["name"] == "fashion-mnist" and config["optimizer"]["loss"] == "cross_entropy"
