"""Random translations of image batches (``gramnewton.lab.data.augment``) and how ``fit``, the
demo, the benchmark and the runner apply them."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_classification_lab import CLASSIFY, CLASSIFY_HYPER

from gramnewton.lab.data import TensorClassificationDataset, get_dataset
from gramnewton.lab.data.augment import random_translate, translation
from gramnewton.lab.data.base import TensorRegressionDataset, standardise_images
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.experiments.training import Callback, augment_generator, fit


def _shifted(image: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """``image`` ``(C, H, W)`` moved down by ``dy`` and right by ``dx``, one pixel at a time."""
    c, h, w = image.shape
    out = fill.reshape(-1, 1, 1).expand(c, h, w).clone()
    for i, j in itertools.product(range(h), range(w)):
        if 0 <= i - dy < h and 0 <= j - dx < w:
            out[:, i, j] = image[:, i - dy, j - dx]
    return out


def _offset(original: torch.Tensor, moved: torch.Tensor, shift: int, fill: torch.Tensor) -> tuple[int, int]:
    """The ``(dy, dx)`` in ``[-shift, shift]^2`` for which ``moved`` is ``original`` translated (exactly)."""
    found = [
        (dy, dx)
        for dy, dx in itertools.product(range(-shift, shift + 1), repeat=2)
        if torch.equal(_shifted(original, dy, dx, fill), moved)
    ]
    assert len(found) == 1, f"not a translation by at most {shift} pixels (matches: {found})"
    return found[0]


def test_each_image_is_translated_within_the_shift_with_the_fill():
    images = torch.randn(40, 3, 6, 7, dtype=torch.float64)  # distinct values: a translation is unambiguous
    fill = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    out = random_translate(images, torch.Generator().manual_seed(0), shift=2, fill=fill)
    assert out.shape == images.shape and out.dtype == images.dtype and out.is_contiguous()
    offsets = [_offset(images[i], out[i], 2, fill) for i in range(len(images))]
    assert len(set(offsets)) > 10  # per image, not one shift for the whole batch
    assert any(dy != 0 for dy, _ in offsets) and any(dx != 0 for _, dx in offsets)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_translated_batches_keep_the_memory_format_of_their_input(channels, memory_format):
    # a (n, 1, H, W) batch with channels-last strides is contiguous too, and convolutions then run
    # channels-last: the gather's permuted view must not leak into the batch the network sees
    images = torch.randn(8, channels, 6, 6).contiguous(memory_format=memory_format)
    out = random_translate(images, torch.Generator().manual_seed(0), shift=1)
    assert out.stride() == images.stride()
    fill = torch.zeros(channels)
    for i in range(len(images)):  # still the translation
        _offset(images[i], out[i], 1, fill)


def test_every_offset_is_drawn():
    images = torch.randn(400, 1, 5, 5)
    out = random_translate(images, torch.Generator().manual_seed(1), shift=1)
    offsets = {_offset(images[i], out[i], 1, torch.zeros(1)) for i in range(0, 400, 4)}
    assert offsets == set(itertools.product((-1, 0, 1), repeat=2))


def test_translation_is_deterministic_under_a_seed_and_identity_at_shift_zero():
    images = torch.randn(16, 1, 8, 8)
    first = random_translate(images, torch.Generator().manual_seed(5), shift=2)
    assert torch.equal(first, random_translate(images, torch.Generator().manual_seed(5), shift=2))
    assert not torch.equal(first, random_translate(images, torch.Generator().manual_seed(6), shift=2))
    assert random_translate(images, torch.Generator().manual_seed(5), shift=0) is images
    dataset = get_dataset("digits", split="test")
    assert translation(dataset, 0) is None


@pytest.mark.parametrize(
    "images,shift,fill,match",
    [
        (torch.zeros(4, 64), 1, 0.0, "image batches"),
        (torch.zeros(4, 8, 8), 1, 0.0, "image batches"),
        (torch.zeros(4, 1, 8, 8), -1, 0.0, "shift must be an integer"),
        (torch.zeros(4, 1, 8, 8), 8, 0.0, "shift must be an integer"),
        (torch.zeros(4, 1, 8, 8), 1.5, 0.0, "shift must be an integer"),
        (torch.zeros(4, 1, 8, 8), True, 0.0, "shift must be an integer"),
        (torch.zeros(4, 2, 8, 8), 1, torch.zeros(3), "one value per channel"),
    ],
)
def test_bad_translations_are_refused(images, shift, fill, match):
    with pytest.raises(ValueError, match=match):
        random_translate(images, torch.Generator(), shift=shift, fill=fill)


def test_translation_is_refused_on_non_image_data():
    tabular = TensorRegressionDataset(torch.randn(10, 5), torch.randn(10), name="table")
    with pytest.raises(ValueError, match="shift=2: random translations need image inputs .*table has inputs \\(5,\\)"):
        translation(tabular, 2)
    assert translation(tabular, 0) is None
    with pytest.raises(ValueError, match="shift must be an integer in \\[0, 8\\)"):
        translation(get_dataset("digits", split="test"), 8)


def test_standardised_images_move_in_blank_pixels():
    raw, standard = (get_dataset("mnist", split="train", standardise=s) for s in (False, True))
    blank = standardise_images(torch.zeros(1, 1, 1, 1), raw.inputs).flatten()
    assert torch.allclose(standard.blank, blank) and float(standard.blank) < -0.1
    assert float(raw.blank) == 0.0  # raw pixels: a blank pixel is 0
    images = standard.inputs[:3]
    moved = translation(standard, 2)(images, torch.Generator().manual_seed(0))
    offsets = [_offset(images[i], moved[i], 2, standard.blank) for i in range(3)]  # blank pixels moved in
    assert any(o != (0, 0) for o in offsets)
    fresh = TensorClassificationDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 2)
    assert float(fresh.blank) == 0.0


def test_fit_augments_every_batch_the_same_under_a_seed():
    dataset = get_dataset("digits", split="test")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(x, y):
        seen.append((x, y))
        return torch.zeros(())

    augment = translation(dataset, 1)
    fit(step, dataset, batch_size=100, seed=3, epochs=2, augment=augment)
    first, seen[:] = list(seen), []
    fit(step, dataset, batch_size=100, seed=3, epochs=2, augment=augment)
    assert len(first) == 8 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, seen))
    seen.clear()
    fit(step, dataset, batch_size=100, seed=3, epochs=2)
    plain = list(seen)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, plain))  # the same batches
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first, plain))  # their inputs translated
    # batch 2 of epoch 2 is its plain inputs translated with that batch's generator
    assert torch.equal(first[6][0], augment(plain[6][0], augment_generator(3, 2, 2)))


def test_each_rank_gets_its_share_of_the_augmented_global_batch():
    dataset = get_dataset("digits", split="test")
    batches: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}

    def recorder(rank):
        def step(x, y):
            batches[rank].append(x)
            return torch.zeros(())

        return step

    augment = translation(dataset, 2)
    fit(recorder(2), dataset, batch_size=90, seed=0, epochs=1, augment=augment)
    for rank in (0, 1):
        fit(recorder(rank), dataset, batch_size=90, seed=0, epochs=1, augment=augment, shard=(rank, 2))
    for whole, share0, share1 in zip(batches[2], batches[0], batches[1]):
        assert torch.equal(whole[0::2], share0) and torch.equal(whole[1::2], share1)


def _losses(rows):
    return [{k: None if v != v else v for k, v in r.items() if k != "seconds"} for r in rows]


def test_runner_trains_with_the_levers_and_resumes_exactly(tmp_path):
    path = tmp_path / "digits.toml"
    path.write_text(CLASSIFY.format(optimizer="ggn", hyper=CLASSIFY_HYPER["ggn"]))
    levers = ["train.shift=1", "train.label_smoothing=0.1"]
    full = run_experiment(load_config(path, levers), tmp_path / "full")
    plain = run_experiment(load_config(path), tmp_path / "plain")
    assert all(math.isfinite(r["test_loss"]) for r in full) and full[-1]["train_accuracy"] > 0.4
    assert full[1]["running_loss"] != plain[1]["running_loss"] and full[0] == plain[0]

    class Interrupt(Callback):
        def on_step(self, state, loss):
            if state.step == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(path, levers), tmp_path / "ctrl-c", callbacks=[Interrupt()])
    resumed = run_experiment(load_config(path, levers), tmp_path / "ctrl-c", resume=True)
    assert _losses(resumed) == _losses(full)


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.shift=-1", "train.shift must be an integer >= 0"),
        ("train.shift=1.5", "train.shift must be an integer"),
        ("train.label_smoothing=1.0", "train.label_smoothing must be a number in \\[0, 1\\)"),
        ("train.label_smoothing=-0.1", "train.label_smoothing must be a number >= 0"),
        ("train.label_smoothing=true", "train.label_smoothing must be a number"),
    ],
)
def test_bad_lever_values_are_refused(tmp_path, override, match):
    path = tmp_path / "digits.toml"
    path.write_text(CLASSIFY.format(optimizer="sgd", hyper=CLASSIFY_HYPER["sgd"]))
    with pytest.raises(ValueError, match=match):
        load_config(path, [override])


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.shift=1", "random translations need image inputs"),  # the MLP data set's inputs are flat
        ("train.label_smoothing=0.1", "needs the cross-entropy loss"),
    ],
)
def test_levers_that_do_not_fit_the_data_are_refused_before_the_folder_changes(tmp_path, override, match):
    from test_experiments import tiny_config

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        run_experiment(load_config(tiny_config(tmp_path, "sgd"), [override, *_flat_data(override)]), out)
    assert not out.exists()


def _flat_data(override: str) -> list[str]:
    # for the shift case, a regression data set with flat (non-image) inputs: diabetes, 10 features
    return ['data.name="diabetes"', "model.kwargs={ in_channels = 10, hidden = [8] }"] if "shift" in override else []


def test_the_runner_translates_training_batches_only(tmp_path, monkeypatch):
    """Every call of the run's augmentation gets one training batch (rows of the training set, one
    call per step) and moves it; evaluation (train and test loss) and the test set never go through it."""
    from gramnewton.lab.experiments import runner
    from gramnewton.lab.experiments.setup import load_data

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(dataset, shift):
        augment = translation(dataset, shift)

        def recorded(x, generator):
            moved = augment(x, generator)
            seen.append((x, moved))
            return moved

        return recorded

    monkeypatch.setattr(runner, "translation", recording)
    path = tmp_path / "digits.toml"
    path.write_text(CLASSIFY.format(optimizer="sgd", hyper=CLASSIFY_HYPER["sgd"]))
    config = load_config(path, ["train.shift=1", "train.epochs=1"])
    rows = run_experiment(config, tmp_path / "run")
    train_rows = load_data(config, "train").inputs.flatten(1)
    assert len(seen) == rows[-1]["step"] == 4
    for x, moved in seen:
        assert (x.flatten(1)[:, None, :] == train_rows[None]).all(-1).any(1).all()  # training rows only
        assert not torch.equal(x, moved)
