"""The one training loop (:func:`fit`), shared by the demo, the experiment runner and the benchmarks.

One abstraction unifies Gram-Gauss-Newton and first-order optimizers: :func:`make_train_step`
returns ``step(x, y) -> loss`` where ``loss`` is the mini-batch mean loss before the update: the
mean squared error for regression, the mean cross-entropy for classification (``loss=
"cross_entropy"``, integer labels; :func:`task_loss` tells which a data set needs). :func:`fit` runs such a step over seeded epochs within a budget of epochs and/or training
seconds and calls :class:`Callback` objects between steps (evaluation, logging, checkpointing,
progress), outside the timed region. Data order depends only on ``(seed, epoch)`` and
:class:`FitState` records the losses of the steps already taken in an unfinished epoch, so a run
resumed from a saved state (mid-epoch included) takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from ...losses import SquaredError, smooth_targets
from ...optim import GramGaussNewton
from ..baselines import KFAC
from ..data.augment import Augment
from ..data.classification import accuracy, is_classification

TrainStep = Callable[[Tensor, Tensor], Tensor]
TASK_LOSSES = ("mse", "cross_entropy")


def task_loss(dataset: Dataset) -> str:
    """``"cross_entropy"`` for a classification data set (integer labels), else ``"mse"``."""
    return "cross_entropy" if is_classification(dataset) else "mse"


def batch_loss(outputs: Tensor, targets: Tensor, loss: str = "mse", label_smoothing: float = 0.0) -> Tensor:
    """Mean loss of a batch: the MSE of ``outputs - targets`` or the cross-entropy of logits
    ``(b, k)`` against labels ``(b,)`` (with ``label_smoothing``, torch's)."""
    if loss == "cross_entropy":
        return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)
    return residuals(outputs, targets).pow(2).mean()


def residuals(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample residuals ``outputs - targets`` of shape ``(b, k)``.

    ``outputs`` is ``(b, k)``; ``targets`` is ``(b,)`` (when ``k == 1``) or ``(b, k)``.
    """
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)
    if targets.shape != outputs.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}")
    return outputs - targets


ALL = slice(None)  # the rows of a whole batch


def make_train_step(
    model: nn.Module, optimizer: Optimizer, loss: str | None = None, label_smoothing: float = 0.0
) -> TrainStep:
    """``step(x, y)``: one optimizer step on the batch, returning its mean ``loss`` before the update.

    The single place that knows how each kind of optimizer takes a step: Gram-Gauss-Newton gets
    a closure returning the per-sample residuals ``(b, k)`` (with the square loss) or
    ``(outputs, targets)`` (with another loss, e.g. ``"cross_entropy"``: logits and labels); any
    other optimizer gets the usual ``zero_grad``, :func:`batch_loss` ``backward`` and ``step``
    (with a closure, for L-BFGS and K-FAC; K-FAC with ``loss="cross_entropy"`` also gets its
    sampled-Fisher backward). ``loss`` (``"mse"`` or ``"cross_entropy"``, see :func:`task_loss`)
    defaults to the optimizer's own (GGN, K-FAC), else ``"mse"``; an optimizer built with another
    loss is refused.

    ``label_smoothing`` ``eps`` in ``[0, 1)`` (cross-entropy only) is also decided here, the same
    for every optimizer: GGN's closure returns the probability targets
    ``(1 - eps) onehot(y) + eps / k`` (:func:`~gramnewton.losses.smooth_targets`), the others
    minimise ``F.cross_entropy(..., label_smoothing=eps)``, the same loss. The returned loss is
    then the smoothed one.
    """
    own = getattr(optimizer, "loss", None) if isinstance(optimizer, (GramGaussNewton, KFAC)) else None
    own = getattr(own, "name", own)  # GramGaussNewton holds a Loss object, K-FAC a name
    loss = loss or own or "mse"
    if own is not None and own != loss:
        raise ValueError(
            f"the task's loss is {loss!r} but {type(optimizer).__name__} was built with loss={own!r}; "
            f"set loss = {loss!r} in the optimizer's settings"
        )
    if label_smoothing and loss != "cross_entropy":
        raise ValueError(f"label_smoothing={label_smoothing!r} needs the cross-entropy loss, not {loss!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if isinstance(optimizer, GramGaussNewton):
        # every closure takes the rows to evaluate (the whole batch by default), so that a damping
        # rule with a ``subset`` can re-evaluate the first rows only; a slice of a tensor is a view
        if isinstance(optimizer.loss, SquaredError):
            return lambda x, y: optimizer.step(lambda rows=ALL: residuals(model(x[rows]), y[rows]))
        if label_smoothing:
            return lambda x, y: optimizer.step(lambda rows=ALL: _smoothed(model(x[rows]), y[rows], label_smoothing))
        return lambda x, y: optimizer.step(lambda rows=ALL: (model(x[rows]), y[rows]))
    if loss not in TASK_LOSSES:
        raise ValueError(f"unknown task loss {loss!r} for a first-order optimizer; expected one of {TASK_LOSSES}")
    fisher = isinstance(optimizer, KFAC) and loss == "cross_entropy"

    def first_order_step(x: Tensor, y: Tensor) -> Tensor:
        losses: list[Tensor] = []

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            outputs = model(x)
            if fisher:
                optimizer.backward_fisher(outputs)
            loss_value = batch_loss(outputs, y, loss, label_smoothing)
            loss_value.backward()
            losses.append(loss_value.detach())
            return loss_value

        optimizer.step(closure)
        return losses[0]

    return first_order_step


def _smoothed(logits: Tensor, labels: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    return logits, smooth_targets(logits, labels, label_smoothing)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index batches of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``, last batch kept."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


def augment_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator of the augmentation of batch ``batch`` of epoch ``epoch``, seeded by all three,
    so a resumed run draws what an uninterrupted one would."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + batch)


def batches(dataset: Dataset, indices: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """Collate ``dataset[idx]`` for each index tensor (in-memory data sets index with a tensor)."""
    for idx in indices:
        yield dataset[idx]


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in evaluation mode inside the block; after it (also when it raises) every
    submodule is back in its own mode: a BatchNorm or Dropout the user froze with ``.eval()``
    (as GGN's refusal of a training-mode BatchNorm advises) stays frozen, where
    ``model.train()`` would put it back in training mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:  # parents first: a child's own mode is set last
            module.train(training)


@torch.no_grad()
def mean_squared_error(model: nn.Module, dataset: Dataset, batch_size: int = 500) -> float:
    """Mean over samples and outputs of ``(f(x) - y)^2``, in :func:`evaluation_mode`."""
    total, count = 0.0, 0
    with evaluation_mode(model):
        for x, y in batches(dataset, list(torch.arange(len(dataset)).split(batch_size))):
            r = residuals(model(x), y)
            total += float(r.double().pow(2).sum())
            count += r.numel()
    return total / count


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, loss: str = "mse", batch_size: int = 500) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over ``dataset`` in :func:`evaluation_mode`: the MSE and NaN for
    ``loss="mse"``, the mean cross-entropy and the top-1 accuracy for ``"cross_entropy"``."""
    if loss == "mse":
        return mean_squared_error(model, dataset, batch_size), math.nan
    total, correct, count = 0.0, 0.0, 0
    with evaluation_mode(model):
        for x, y in batches(dataset, list(torch.arange(len(dataset)).split(batch_size))):
            logits = model(x)
            total += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            correct += accuracy(logits, y) * len(y)
            count += len(y)
    return total / count, correct / count


@dataclass
class FitState:
    """Where a run stands; :func:`fit` updates it in place after every step, so it is consistent
    whenever a callback runs or an exception (Ctrl-C, a failing step) leaves the loop.

    Attributes:
        epoch: finished epochs.
        step: steps taken in all.
        seconds: training seconds (step calls and batch collation; callbacks excluded).
        batch_losses: the losses of the steps taken in the unfinished epoch ``epoch + 1``;
            on resume those batches are skipped.
    """

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    batch_losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seconds": self.seconds,
            "batch_losses": list(self.batch_losses),
        }


@dataclass(frozen=True)
class FitBudget:
    """What :func:`fit` will run: ``epochs`` (None: unbounded) and ``seconds`` of training,
    whichever ends first; ``steps_per_epoch`` is ``ceil(n / batch_size)``."""

    epochs: int | None
    seconds: float
    steps_per_epoch: int

    @property
    def total_steps(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.steps_per_epoch


class Callback:
    """Hooks of :func:`fit`, all optional; ``on_step`` and ``on_epoch_end`` stop the run by
    returning True. They run outside the timed region (evaluation time is not training time)."""

    def on_start(self, state: FitState, budget: FitBudget) -> None:
        """Before the first step (``state`` may be a resumed one)."""

    def on_step(self, state: FitState, loss: float) -> bool | None:
        """After every step; ``loss`` is the step's mini-batch mean loss before the update (what
        :func:`make_train_step` returns: the MSE, or the cross-entropy, label-smoothed if so)."""

    def on_epoch_end(self, state: FitState, running_loss: float) -> bool | None:
        """After every finished epoch; ``running_loss`` is the mean of its steps' losses, each step
        weighted alike (a last partial batch too): the loss the optimizer saw on the (augmented)
        batches during the epoch, not a full-pass evaluation of the model at its end."""

    def on_end(self, state: FitState) -> None:
        """After the last step, also when the loop is left by an exception."""


def fit(
    step: TrainStep,
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int = 0,
    epochs: int | None = None,
    seconds: float = math.inf,
    state: FitState | None = None,
    callbacks: Sequence[Callback] = (),
    shard: tuple[int, int] = (0, 1),
    augment: Augment | None = None,
) -> FitState:
    """Run ``step`` over the seeded epochs of ``dataset`` until ``epochs`` epochs or ``seconds``
    training seconds (the last epoch may then be partial) or a callback asks to stop.

    Batches of epoch ``e`` are :func:`batch_order` ``(len(dataset), batch_size, seed, e)``.
    ``state`` (default: a fresh one) is continued and updated in place; it is returned.
    ``augment(x, generator)`` (e.g. :func:`~gramnewton.lab.data.augment.translation`) replaces
    every batch's inputs, with :func:`augment_generator` ``(seed, e, batch)``; its time counts as
    training time.

    Data parallelism: with ``shard = (rank, world)`` (``torch.distributed``), every process
    walks the same global batches and steps on its strided share ``idx[rank::world]`` of each
    (``DistributedSampler``'s split of a batch), so ``batch_size`` is the global batch and a
    ``distributed="exact"`` GGN run takes the single-process steps. The ranks must stop at the
    same step: a ``seconds`` budget (each rank's own clock) is refused, and callbacks that stop
    the run must decide alike on every rank.
    """
    if epochs is None and not math.isfinite(seconds):
        raise ValueError("fit needs a budget: epochs, seconds or both")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard (rank, world) must have 0 <= rank < world, got {shard}")
    if world > 1 and math.isfinite(seconds):
        raise ValueError("a seconds budget cannot be used with several processes (their clocks differ); use epochs")
    state = FitState() if state is None else state
    budget = FitBudget(epochs, seconds, math.ceil(len(dataset) / batch_size))
    for callback in callbacks:
        callback.on_start(state, budget)
    try:
        stop = False
        while not stop and (epochs is None or state.epoch < epochs) and state.seconds < seconds:
            order = batch_order(len(dataset), batch_size, seed, state.epoch + 1)
            for index in range(len(state.batch_losses), len(order)):
                start = time.perf_counter()
                x, y = _batch(dataset, order[index], shard, augment, (seed, state.epoch + 1, index))
                loss = float(step(x, y))
                state.seconds += time.perf_counter() - start
                state.step += 1
                state.batch_losses.append(loss)
                stop = _any(c.on_step(state, loss) for c in callbacks) or state.seconds >= seconds
                if stop:
                    break
            if len(state.batch_losses) == len(order):  # the epoch is finished (also when stopping at its end)
                running = sum(state.batch_losses) / len(order)
                state.epoch, state.batch_losses = state.epoch + 1, []
                stop = _any(c.on_epoch_end(state, running) for c in callbacks) or stop
        return state
    finally:
        for callback in callbacks:
            callback.on_end(state)


def _batch(
    dataset: Dataset, idx: Tensor, shard: tuple[int, int], augment: Augment | None, where: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """This rank's share of the batch ``idx``, augmented with :func:`augment_generator` ``(*where)``:
    the whole global batch is augmented before the share is taken, so P processes train on the
    inputs one process would."""
    rank, world = shard
    if augment is None:
        return dataset[idx[rank::world]]
    x, y = dataset[idx]
    return augment(x, augment_generator(*where))[rank::world], y[rank::world]


def _any(answers: Iterator[bool | None]) -> bool:
    # every callback runs (a logger after a stopping evaluator still logs): no short-circuit
    return any([bool(a) for a in answers])


@dataclass
class EpochRecord:
    """One row of a training log; ``seconds`` counts training time only (evaluation excluded)."""

    epoch: int
    step: int
    seconds: float
    running_loss: float
    train_loss: float
    test_loss: float
    train_accuracy: float = math.nan  # classification only
    test_accuracy: float = math.nan


class EpochEvaluator(Callback):
    """Evaluates the full train and test loss (MSE, or cross-entropy and accuracy for a
    classification data set) before training and after every ``every``-th epoch and
    ``last_epoch`` (default: the budget's last; NaN in between) into :attr:`records` (epoch 0 first).
    ``train=False`` evaluates the test split only (train loss and accuracy NaN): on mnist the
    4,000 training images cost four times the test split's time, which a time-to-accuracy run
    spends after every epoch."""

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        test_set: Dataset,
        every: int = 1,
        last_epoch: int | None = None,
        train: bool = True,
    ):
        self.model, self.train_set, self.test_set, self.every = model, train_set, test_set, every
        self.last_epoch, self.train = last_epoch, train
        self.loss = task_loss(train_set)
        self.records: list[EpochRecord] = []

    def due(self, epoch: int) -> bool:
        """Whether the evaluation after ``epoch`` is due (every ``every``-th epoch and the last)."""
        return epoch % self.every == 0 or epoch == self.last_epoch

    def evaluate(self, epoch: int) -> tuple[float, float, float, float]:
        """``(train loss, test loss, train accuracy, test accuracy)`` (NaN when not due / regression)."""
        if not self.due(epoch):
            return math.nan, math.nan, math.nan, math.nan
        return self.evaluate_now()

    def evaluate_now(self) -> tuple[float, float, float, float]:
        train_loss, train_acc = evaluate(self.model, self.train_set, self.loss) if self.train else (math.nan, math.nan)
        test_loss, test_acc = evaluate(self.model, self.test_set, self.loss)
        return train_loss, test_loss, train_acc, test_acc

    def on_start(self, state: FitState, budget: FitBudget) -> None:
        self.last_epoch = budget.epochs if self.last_epoch is None else self.last_epoch
        if state.epoch == 0 and not state.batch_losses and not self.records:
            self.records.append(EpochRecord(0, 0, 0.0, math.nan, *self.evaluate(0)))

    def on_epoch_end(self, state: FitState, running_loss: float) -> None:
        self.records.append(
            EpochRecord(state.epoch, state.step, state.seconds, running_loss, *self.evaluate(state.epoch))
        )

    def finish(self, state: FitState) -> None:
        """Evaluate the partial epoch of a run stopped by its time budget (nothing if none)."""
        if state.batch_losses and state.step > self.records[-1].step:
            running = sum(state.batch_losses) / len(state.batch_losses)
            self.records.append(EpochRecord(state.epoch + 1, state.step, state.seconds, running, *self.evaluate_now()))


class ProgressBar(Callback):
    """A tqdm bar: elapsed / total training seconds when :func:`fit`'s budget is in seconds, else
    steps / total steps; ``desc`` names the run (e.g. the optimizer).

    ``seconds`` (0: none) is a time budget that a callback enforces at epoch ends (the runner's
    ``train.seconds``, which :func:`fit` does not see): the total is then the smaller of the
    epochs' steps and the steps the budget is expected to allow, whole epochs at the speed so far,
    re-estimated after every step."""

    def __init__(self, desc: str = "train", seconds: float = 0.0, **tqdm_kwargs: Any):
        self.desc, self.seconds, self.tqdm_kwargs = desc, seconds, tqdm_kwargs
        self.bar: Any = None
        self.timed = False
        self.budget: FitBudget | None = None
        self.start = (0, 0.0)  # (step, seconds) when the bar started: the speed is of this run's steps

    def on_start(self, state: FitState, budget: FitBudget) -> None:
        from tqdm import tqdm

        self.timed = math.isfinite(budget.seconds)
        if self.timed:
            self.bar = tqdm(
                desc=self.desc,
                total=round(budget.seconds, 1),
                initial=round(state.seconds, 1),
                unit="s",
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}{postfix}]",
                **self.tqdm_kwargs,
            )
        else:
            self.budget, self.start = budget, (state.step, state.seconds)
            self.bar = tqdm(
                desc=self.desc, total=budget.total_steps, initial=state.step, unit="step", **self.tqdm_kwargs
            )

    def on_step(self, state: FitState, loss: float) -> None:
        self.bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
        if self.timed:
            self.bar.update(min(state.seconds, self.bar.total) - self.bar.n)
        else:
            if self.seconds > 0:
                self.bar.total = self._expected_steps(state)
            self.bar.update()

    def _expected_steps(self, state: FitState) -> int | None:
        """The steps the run will take: the epochs' (None if unbounded) or, if fewer, the whole
        epochs up to the one ending past :attr:`seconds` at this run's speed so far."""
        steps, seconds = state.step - self.start[0], state.seconds - self.start[1]
        if self.budget is None or steps == 0 or seconds <= 0:
            return None if self.budget is None else self.budget.total_steps
        per_epoch = self.budget.steps_per_epoch
        remaining = max(self.seconds - state.seconds, 0.0) * steps / seconds
        by_time = max(math.ceil((state.step + remaining) / per_epoch), 1) * per_epoch
        total = self.budget.total_steps
        return by_time if total is None else min(total, by_time)

    def on_end(self, state: FitState) -> None:
        if not self.timed and 0 < self.seconds <= state.seconds:  # the time budget ended the run: it is done
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def seconds_to_accuracy(records: list[EpochRecord], target: float) -> float | None:
    """Training seconds at the first evaluation whose test accuracy is at least ``target`` (None if never)."""
    return next((r.seconds for r in records if r.test_accuracy >= target), None)


def seconds_to_target(records: list[EpochRecord], target: float) -> float | None:
    """Training seconds at the first evaluation whose train MSE is at most ``target`` (None if never)."""
    return next((r.seconds for r in records if r.train_loss <= target), None)


def lowest_test_loss(records: list[EpochRecord]) -> EpochRecord | None:
    """The first evaluation with the lowest test loss, NaN ignored (None if there is none): the
    model a user stopping at the best test loss would keep, and when training reached it."""
    finite = [r for r in records if not math.isnan(r.test_loss)]
    return min(finite, key=lambda r: r.test_loss) if finite else None
