"""The training loop shared by the demo, the experiment runner and the benchmarks.

One abstraction unifies Gram-Gauss-Newton and first-order optimizers: :func:`make_train_step`
returns ``step(x, y) -> loss`` where ``loss`` is the mini-batch mean squared error before the
update. Data order depends only on ``(seed, epoch)``, so an interrupted run that resumes at an
epoch boundary sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from ...optim import GramGaussNewton

TrainStep = Callable[[Tensor, Tensor], Tensor]


def residuals(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample residuals ``outputs - targets`` of shape ``(b, k)``.

    ``outputs`` is ``(b, k)``; ``targets`` is ``(b,)`` (when ``k == 1``) or ``(b, k)``.
    """
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)
    if targets.shape != outputs.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}")
    return outputs - targets


def make_train_step(model: nn.Module, optimizer: Optimizer) -> TrainStep:
    """``step(x, y)``: one optimizer step on the batch, returning its MSE before the update.

    Gram-Gauss-Newton gets a closure returning the per-sample residuals; any other optimizer
    gets the usual ``zero_grad``, MSE ``backward`` and ``step`` (with a closure, for L-BFGS).
    """
    if isinstance(optimizer, GramGaussNewton):
        return lambda x, y: optimizer.step(lambda: residuals(model(x), y))

    def first_order_step(x: Tensor, y: Tensor) -> Tensor:
        losses: list[Tensor] = []

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = residuals(model(x), y).pow(2).mean()
            loss.backward()
            losses.append(loss.detach())
            return loss

        optimizer.step(closure)
        return losses[0]

    return first_order_step


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index batches of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``, last batch kept."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(torch.randperm(n, generator=gen).split(batch_size))


def batches(dataset: Dataset, indices: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
    """Collate ``dataset[idx]`` for each index tensor (in-memory data sets index with a tensor)."""
    for idx in indices:
        yield dataset[idx]


@torch.no_grad()
def mean_squared_error(model: nn.Module, dataset: Dataset, batch_size: int = 500) -> float:
    """Mean over samples and outputs of ``(f(x) - y)^2``, in evaluation mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches(dataset, list(torch.arange(len(dataset)).split(batch_size))):
        r = residuals(model(x), y)
        total += float(r.double().pow(2).sum())
        count += r.numel()
    model.train(was_training)
    return total / count


@dataclass
class EpochRecord:
    """One row of a training log; ``seconds`` counts training time only (evaluation excluded)."""

    epoch: int
    step: int
    seconds: float
    running_loss: float
    train_loss: float
    test_loss: float


def train_epoch(
    step: TrainStep,
    dataset: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    deadline: float = float("inf"),
    on_batch: Callable[[float], None] | None = None,
    losses: list[float] | None = None,
) -> tuple[int, float]:
    """Run one epoch of ``step`` (stopping early past ``deadline``, a ``time.perf_counter`` value).

    ``losses``, when given, holds the losses of the batches of this epoch already taken (they are
    skipped: an epoch interrupted after them resumes exactly) and receives each new batch's loss
    as soon as its step is done, so an exception raised by ``on_batch`` leaves it consistent.

    Returns:
        ``(steps taken in the epoch, mean of the per-batch losses)``.
    """
    losses = [] if losses is None else losses
    for x, y in batches(dataset, batch_order(len(dataset), batch_size, seed, epoch)[len(losses) :]):
        losses.append(float(step(x, y)))
        if on_batch is not None:
            on_batch(losses[-1])
        if time.perf_counter() > deadline:
            break
    return len(losses), sum(losses) / max(len(losses), 1)


def fit(
    model: nn.Module,
    optimizer: Optimizer,
    train_set: Dataset,
    test_set: Dataset,
    *,
    batch_size: int,
    max_epochs: int,
    max_seconds: float = float("inf"),
    seed: int = 0,
    on_batch: Callable[[float], None] | None = None,
    eval_every: float | None = None,
) -> list[EpochRecord]:
    """Train until ``max_epochs`` epochs or ``max_seconds`` of training time, whichever is first.

    Evaluates the full train and test MSE before training (epoch 0) and after each epoch; the
    last epoch may be partial when the time budget runs out. With ``eval_every`` it also
    evaluates at the first step past every multiple of ``eval_every`` training seconds (a record
    of the epoch in progress, so curves can be read at fixed times). Evaluation time is not
    counted.
    """
    step = make_train_step(model, optimizer)
    model.train()

    def record(epoch: int, steps: int, seconds: float, running: float) -> EpochRecord:
        return EpochRecord(
            epoch, steps, seconds, running, mean_squared_error(model, train_set), mean_squared_error(model, test_set)
        )

    records = [record(0, 0, 0.0, float("nan"))]
    seconds, steps = 0.0, 0
    next_mark = eval_every or float("inf")
    batches_per_epoch = len(batch_order(len(train_set), batch_size, seed, 0))
    for epoch in range(1, max_epochs + 1):
        losses: list[float] = []
        while True:  # the epoch, interrupted at each evaluation mark
            start, before = time.perf_counter(), len(losses)
            stop = min(max_seconds, next_mark) - seconds
            taken, running = train_epoch(step, train_set, batch_size, seed, epoch, start + stop, on_batch, losses)
            seconds += time.perf_counter() - start
            steps += taken - before
            if taken == batches_per_epoch or seconds >= max_seconds:
                break
            records.append(record(epoch, steps, seconds, running))
            while next_mark <= seconds:
                next_mark += eval_every
        records.append(record(epoch, steps, seconds, running))
        while next_mark <= seconds:
            next_mark += eval_every
        if seconds >= max_seconds:
            break
    return records


def seconds_to_target(records: list[EpochRecord], target: float) -> float | None:
    """Training seconds at the first evaluation whose train MSE is at most ``target`` (None if never)."""
    return next((r.seconds for r in records if r.train_loss <= target), None)
