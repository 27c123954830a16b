"""Classification data sets: int64 labels, shapes, seeded splits, Fashion-MNIST from a fixture tree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data import fashion_tree

from gramnewton.lab.data import TensorClassificationDataset, accuracy, get_dataset, is_classification


@pytest.mark.parametrize("name,shape,sizes", [("digits", (1, 8, 8), (1438, 359)), ("mnist", (1, 28, 28), (4000, 1000))])
def test_embedded_classification_sets(name, shape, sizes):
    train, test = get_dataset(name, split="train"), get_dataset(name, split="test")
    assert (len(train), len(test)) == sizes and is_classification(train) and train.num_classes == 10
    x, y = train[torch.arange(5)]
    assert x.shape == (5, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(train.inputs.min()) and float(train.inputs.max()) <= 1
    assert set(train.labels.tolist()) == set(range(10))
    # the split is a partition, fixed by the seed
    assert torch.equal(get_dataset(name, split="train").labels, train.labels)
    assert not torch.equal(get_dataset(name, split="train", seed=1).labels, train.labels)


def test_fashion_mnist_from_fixture(tmp_path: Path):
    arrays = fashion_tree(tmp_path)
    train = get_dataset("fashion-mnist", root=str(tmp_path), split="train")
    test = get_dataset("fashion-mnist", root=str(tmp_path), split="test")
    assert (len(train), len(test)) == (len(arrays["train"]), len(arrays["t10k"]))
    assert torch.allclose(train.inputs[:, 0] * 255, torch.as_tensor(arrays["train"]).float())
    assert train.labels.dtype == torch.int64
    with pytest.raises(FileNotFoundError, match="fashion-mnist.*make data"):
        get_dataset("fashion-mnist", root=str(tmp_path / "missing"))


def test_labels_are_validated_and_accuracy():
    with pytest.raises(ValueError, match="outside"):
        TensorClassificationDataset(torch.zeros(2, 3), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="integer"):
        TensorClassificationDataset(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 3)
    logits = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, -1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
