"""One experiment run from a resolved config: train, evaluate, log, checkpoint, resume.

A run folder holds ``config.toml`` (the resolved config), ``metrics.csv`` (one row per epoch)
and ``checkpoint.pt``, rewritten atomically (with ``best.pt`` when kept) after an epoch once
``train.checkpoint_seconds`` of wall clock have passed since the last write (default 10; 0: after
every epoch), after the last epoch and on an interruption between steps: a run of many short
epochs (a small tabular set: thousands per minute) spent most of its wall clock rewriting files
that grow with every epoch. A run
resumed from its checkpoint produces the same rows as an uninterrupted one, apart from the
wall-clock seconds: the data order depends only on ``(seed, epoch)``, a checkpoint taken
mid-epoch records the losses of the batches already taken (those batches are skipped), and the
model, optimizer and torch RNG states are restored.

Validation (``data.validation_fraction > 0``): a seeded share of the training set is held out
(:func:`~gramnewton.lab.experiments.setup.load_data`) and evaluated with the test set. Its loss
drives early stopping (``train.early_stopping_patience``: stop after that many evaluations
without a lower validation loss) and ``train.keep_best`` (``best.pt``: the model of the lowest
validation loss and its metrics row, :mod:`~gramnewton.lab.experiments.early_stopping`); the
checkpoint carries the best-so-far and the count, so a resumed run stops where an uninterrupted
one would. ``train.seconds`` ends the run after the first epoch that ends past that many
training seconds (wall clock: not reproducible across runs, unlike the rest).

Under ``torchrun`` (``torch.distributed`` initialised, ``P > 1`` processes) every rank trains on
its share of each global batch (:func:`~gramnewton.lab.experiments.training.fit`'s ``shard``)
with a data-parallel GGN (``optimizer.distributed``: ``"auto"``, i.e. exact, or ``"local"``);
rank 0 alone evaluates and writes ``config.toml``, ``metrics.csv`` and ``checkpoint.pt``
(which records ``P``: a run resumes only with the same number of processes).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from ...optim import GramGaussNewton, check_per_sample_independence
from ..data.augment import translation
from ..files import write_atomically
from .config import dumps, load_config
from .early_stopping import BEST, EarlyStopping, save_best
from .metrics import read_rows, write_rows
from .optimizers import build_optimizer, takes_weight_decay
from .setup import CHECKPOINT, build_model, load_data, warm_start
from .step_diagnostics import DIAGNOSTIC_COLUMNS, DiagnosticsLog, empty_summary
from .training import (
    Callback,
    EpochEvaluator,
    EpochRecord,
    FitState,
    evaluate,
    fit,
    make_train_step,
    task_loss,
)

CONFIG_FILE, METRICS_FILE = "config.toml", "metrics.csv"


def run_labels(runs: Sequence[Path]) -> list[str]:
    """A distinct legend label per run: its config's ``name`` (else its folder's name).

    Runs sharing a name get their folder as given, ``tiny (runs/a)``: the curves are keyed by label,
    and two ``tiny`` runs left one line in the figure. The same folder given twice is numbered.
    """
    names = [
        (load_config(run / CONFIG_FILE)["name"] if (run / CONFIG_FILE).is_file() else "") or run.name for run in runs
    ]
    shared = Counter(names)
    labels = [f"{name} ({run})" if shared[name] > 1 else name for name, run in zip(names, runs)]
    seen: Counter[str] = Counter()
    distinct = []
    for label in labels:
        seen[label] += 1
        distinct.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return distinct


def run_experiment(
    config: Mapping[str, Any],
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
) -> list[dict[str, Any]]:
    """Train the run ``config`` into folder ``out``; return its metric rows (epoch 0 first).

    A non-empty ``out`` is refused unless ``resume`` (continue from ``out/checkpoint.pt`` if there
    is one; its config must equal ``config`` except for the budget ``train.epochs`` and
    ``train.seconds``, which may grow; a run that early stopping ended stays ended; without one,
    only a run of ``config`` that ended before its first checkpoint is started over, other files
    are refused, :func:`check_run_folder`) or ``overwrite`` (replace the run there; not both).
    Nothing in ``out`` changes until the data, the model and the optimizer are set up: a run that
    fails at set-up leaves the old run resumable.
    ``callbacks`` (progress, say) are
    passed to :func:`~gramnewton.lab.experiments.training.fit`; a ``KeyboardInterrupt`` raised
    between steps (by one of them on Ctrl-C, say) saves a checkpoint after the last finished step
    and re-raises; one that cuts a step or an epoch's evaluation and checkpoint short (a second
    Ctrl-C) leaves the last checkpoint as it is, since the model, optimizer and RNG may then be
    past the steps counted (the resumed run redoes the steps after it).

    The optimizer is ``config["optimizer"]`` with ``train.weight_decay`` (default ``1e-4``, so
    ``[optimizer] name = "ggn"`` alone is ``GramGaussNewton(model, weight_decay=1e-4)``): GGN's
    decay is decoupled (``w <- (1 - lr wd) w`` each step, see :class:`~gramnewton.GramGaussNewton`);
    SGD and Adam add ``wd * w`` to the gradient (torch's ``weight_decay``), K-FAC to its
    preconditioned direction; L-BFGS has none (the config check allows it only 0).
    ``train.label_smoothing`` (every optimizer's cross-entropy targets,
    :func:`~gramnewton.lab.experiments.training.make_train_step`) and ``train.shift`` (random
    translations of the training images,
    :func:`~gramnewton.lab.data.augment.translation`) are checked against the data at set-up.

    Row keys: ``epoch``, ``step``, ``seconds`` (training only), ``running_loss`` (mean over the
    epoch's steps of each step's mini-batch loss before its update, each step weighted alike: the
    loss the optimizer saw, label smoothing and ``train.shift`` included), ``train_loss`` and
    ``test_loss`` (full-pass MSE in evaluation mode, NaN when not evaluated), ``train_rmse`` and
    ``test_rmse`` (in the target's original unit). For a classification data set (integer labels) the losses are
    mean cross-entropies and ``train_accuracy`` / ``test_accuracy`` replace the RMSE columns.
    With a validation split, ``val_loss`` and ``val_rmse`` (``val_accuracy`` for
    classification) follow, evaluated with the test set (NaN when not evaluated).
    Then the epoch's summary of GGN's ``last_diagnostics``
    (:mod:`~gramnewton.lab.experiments.step_diagnostics`): ``gain_ratio`` (median), ``alpha``
    (of the last step), ``step_norm`` (median), ``rejected`` (rejected attempts, retries
    included), ``jitter`` (max), ``condition`` (median); NaN at epoch 0 and for other optimizers.
    Under ``torch.distributed`` only rank 0 returns the rows (the other ranks return ``[]``).

    ``train.deterministic`` runs the whole run under ``torch.use_deterministic_algorithms(True)``
    (the previous setting is restored after it): the engine then times no candidate path per layer
    (:class:`~gramnewton.engines.choice.MeasuredChoice`), whose choice by the clock otherwise makes
    two runs of one seed differ in their last bits and from there in their trajectories, so a run
    repeats bit for bit on one machine with the same ``train.threads`` (on CUDA torch also needs
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). ``train.seconds`` still ends it by the clock.
    """
    with deterministic_algorithms(config["train"]["deterministic"]):
        return _run(config, Path(out), resume=resume, overwrite=overwrite, callbacks=callbacks)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside when ``enabled`` (else nothing changes);
    the previous setting, ``warn_only`` included, is restored on the way out, error or not."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run(
    config: Mapping[str, Any], out: Path, *, resume: bool, overwrite: bool, callbacks: Sequence[Callback]
) -> list[dict[str, Any]]:
    """:func:`run_experiment` inside its ``train.deterministic`` setting."""
    rank, world = _rank_and_world()
    check_run_folder(out, resume=resume, overwrite=overwrite, config=config)
    torch.set_num_threads(config["train"]["threads"])
    checkpoint = _load_checkpoint(out, config, world) if resume else None
    train = config["train"]
    if world > 1 and (train["early_stopping_patience"] or train["seconds"]):
        raise ValueError(
            "train.early_stopping_patience and train.seconds need one process (rank 0 alone evaluates, "
            "every rank would have to stop at the same step); use train.epochs and train.keep_best"
        )
    train_set, test_set = load_data(config, "train"), load_data(config, "test")
    validation_set = load_data(config, "validation") if config["data"]["validation_fraction"] else None
    model = build_model(config, train_set)
    if config["warm_start"]["run"] and checkpoint is None:
        warm_start(model, config["warm_start"]["run"])
    decay = {"weight_decay": train["weight_decay"]} if takes_weight_decay(config["optimizer"]["name"]) else {}
    optimizer = build_optimizer({**config["optimizer"], **decay}, model)
    if isinstance(optimizer, GramGaussNewton):  # a BatchNorm model fails at its first step: refuse it at set-up
        check_per_sample_independence(model)
    if world > 1 and getattr(optimizer, "distributed", None) is None:
        raise ValueError(
            f"{world} processes need a data-parallel optimizer: optimizer.name = 'ggn' with "
            "optimizer.distributed 'auto', 'exact' or 'local'"
        )
    train_step = make_train_step(model, optimizer, task_loss(train_set), train["label_smoothing"])
    augment = translation(train_set, train["shift"])
    evaluator = EpochEvaluator(model, train_set, test_set, every=train["eval_every"], last_epoch=train["epochs"])
    diagnostics = DiagnosticsLog(optimizer, checkpoint.get("diagnostics", ()) if checkpoint else ())
    log = _RunLog(
        out,
        model,
        optimizer,
        evaluator,
        getattr(train_set, "scale", None),
        world,
        diagnostics,
        validation_set=validation_set,
        stopping=EarlyStopping(patience=train["early_stopping_patience"]),
        keep_best=train["keep_best"],
        seconds=train["seconds"],
        write_every=train["checkpoint_seconds"],
    )
    if checkpoint is None:
        state = FitState()
        if rank == 0:
            log.rows = [log.evaluate_row(state, math.nan)]
    else:
        _restore(out, checkpoint, model, optimizer)
        state = FitState(*(checkpoint[k] for k in ("epoch", "step", "seconds", "batch_losses")))
        # rows of a checkpoint written before the diagnostics columns existed get them as NaN
        log.rows = [{**row, **{k: row.get(k, math.nan) for k in DIAGNOSTIC_COLUMNS}} for row in checkpoint["rows"]]
        log.stopping.load_state_dict(checkpoint.get("early_stopping") or log.stopping.state_dict())
    if world > 1:  # every rank has read the folder before rank 0 changes it
        dist.barrier()
    if rank == 0:  # set-up succeeded: only now does the folder change
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:  # a replaced run's checkpoint must never be resumed under this config
            (out / CHECKPOINT).unlink(missing_ok=True)
            (out / BEST).unlink(missing_ok=True)  # nor its best model taken for this run's
        text = dumps(config)
        write_atomically(out / CONFIG_FILE, lambda tmp: tmp.write_text(text))
        write_rows(out / METRICS_FILE, log.rows)
        if checkpoint is None:
            log.keep_if_best(log.rows[0])
            log.write_best()

    def step(x: Tensor, y: Tensor) -> Tensor:
        # the update may be cut short by Ctrl-C: nothing to checkpoint until _RunLog.on_step has run
        log.consistent = False
        return train_step(x, y)

    model.train()
    if log.finished(state):  # a resumed run that early stopping or its seconds had ended
        return log.rows if rank == 0 else []
    try:
        fit(
            step,
            train_set,
            batch_size=train["batch_size"],
            seed=config["seed"],
            epochs=train["epochs"],
            state=state,
            callbacks=[diagnostics, log, *callbacks] if rank == 0 else list(callbacks),
            shard=(rank, world),
            augment=augment,
        )
    except KeyboardInterrupt:
        # cut short inside a step or an epoch end, the model, optimizer, RNG and state disagree: the
        # checkpoint on disk (the last epoch's, or none) stands and the resumed run redoes the rest
        if rank == 0 and log.consistent:
            log.write(state)
        raise
    if rank == 0 and log.unwritten:  # the last epochs, inside the write interval
        log.write(state)
    if world > 1:  # rank 0's last checkpoint is on disk before any rank returns (and may resume it)
        dist.barrier()
    return log.rows if rank == 0 else []


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_run_folder(out: Path, *, resume: bool, overwrite: bool, config: Mapping[str, Any] | None = None) -> None:
    """Refuse an ``out`` that is a file, or a non-empty folder without ``resume`` or ``overwrite``.

    With ``resume`` and no checkpoint in ``out`` the run starts from scratch, which rewrites the
    folder's files: allowed only when they are a run of ``config`` (its ``config.toml``; one that
    failed before its first checkpoint), never over other files.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: pass one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pick another --out")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    if not resume:
        raise ValueError(
            f"{out} is not empty (another run?): pass --resume to continue the run there, "
            "--overwrite to replace it, or pick another --out"
        )
    if not (out / CHECKPOINT).is_file() and not (config is not None and _holds_run_of(out, config)):
        files = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise ValueError(
            f"--resume: {out} holds no checkpoint and no run of this config ({files}), so starting from "
            "scratch would overwrite its files: pass --overwrite to replace them, or pick another --out"
        )


def _holds_run_of(out: Path, config: Mapping[str, Any]) -> bool:
    """Whether ``out/config.toml`` is ``config`` (``train.epochs`` and ``train.seconds`` may differ)."""
    try:
        return _without_budget(load_config(out / CONFIG_FILE)) == _without_budget(config)
    except (ValueError, FileNotFoundError):  # missing, unreadable or no longer valid: not this config's run
        return False


def _restore(out: Path, checkpoint: Mapping[str, Any], model: nn.Module, optimizer: Optimizer) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{out / CHECKPOINT} does not fit this config's model or optimizer ({first}); use --overwrite to start over"
        ) from None


class _RunLog(Callback):
    """After every epoch: evaluate (when due), append a metrics row (with the epoch's
    ``diagnostics`` summary and the validation loss), keep the best-validation model (in memory);
    once :attr:`write_every` wall-clock seconds have passed since the last write, or when the run
    ends, :meth:`write` the files; stop the run when :attr:`stopping` says so or :attr:`seconds`
    (0: no limit) of training have passed."""

    def __init__(
        self,
        out: Path,
        model: nn.Module,
        optimizer: Optimizer,
        evaluator: EpochEvaluator,
        scale: Any,
        world: int,
        diagnostics: DiagnosticsLog,
        *,
        validation_set: Dataset | None = None,
        stopping: EarlyStopping | None = None,
        keep_best: bool = False,
        seconds: float = 0.0,
        write_every: float = 0.0,
    ):
        self.out, self.model, self.optimizer, self.evaluator, self.scale = out, model, optimizer, evaluator, scale
        self.world, self.diagnostics = world, diagnostics
        self.rows: list[dict[str, Any]] = []
        self.validation_set, self.keep_best, self.seconds = validation_set, keep_best, seconds
        self.write_every, self.last_write = write_every, time.monotonic()
        self.unwritten = False  # whether rows (or a best model) are newer than the files
        self.best: tuple[dict[str, Tensor], dict[str, Any]] | None = None  # (state dict, row) not yet in best.pt
        self.stopping = EarlyStopping() if stopping is None else stopping
        self.improved = False  # whether the last row's validation loss is the best so far
        # whether model, optimizer, RNG, ``state`` and :attr:`rows` agree (between steps, outside
        # an epoch end's evaluate-log-checkpoint): only then may an interrupt be checkpointed
        self.consistent = True

    def finished(self, state: FitState) -> bool:
        """Whether early stopping or the seconds budget has ended the run."""
        return self.stopping.stop or 0 < self.seconds <= state.seconds

    def evaluate_row(self, state: FitState, running_loss: float) -> dict[str, Any]:
        """The metrics row after ``state.epoch`` (evaluated when due, and always at the last epoch
        of a seconds budget); records the validation loss in :attr:`stopping`."""
        due = self.evaluator.due(state.epoch) or 0 < self.seconds <= state.seconds
        nan = (math.nan,) * 4
        record = EpochRecord(
            state.epoch, state.step, state.seconds, running_loss, *(self.evaluator.evaluate_now() if due else nan)
        )
        validation = None
        if self.validation_set is not None:
            validation = evaluate(self.model, self.validation_set, self.evaluator.loss) if due else nan[:2]
        self.improved = due and validation is not None and self.stopping.update(state.epoch, validation[0])
        return _row(record, self.scale, validation)

    def keep_if_best(self, row: dict[str, Any]) -> None:
        """Keep a copy of the model for ``best.pt`` if ``row`` (the last evaluated) is the best so far."""
        if self.keep_best and self.improved:
            self.best = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}, row)

    def write_best(self) -> None:
        """Write the kept best model to ``best.pt`` (if one is waiting)."""
        if self.best is not None:
            save_best(self.out, *self.best)
            self.best = None

    def write(self, state: FitState) -> None:
        """Write ``best.pt`` (if a better model is waiting: before the checkpoint that records it as
        the best), metrics.csv and the checkpoint."""
        self.consistent = False  # cut short, the files would disagree: the last checkpoint stands
        self.write_best()
        write_rows(self.out / METRICS_FILE, self.rows)
        save_checkpoint(self.out, self.model, self.optimizer, self.checkpoint_state(state))
        self.last_write, self.unwritten, self.consistent = time.monotonic(), False, True

    def on_step(self, state: FitState, loss: float) -> None:
        self.consistent = True  # fit has counted the step (and the diagnostics log, before, its entry)

    def on_epoch_end(self, state: FitState, running_loss: float) -> bool:
        # fit has counted the epoch, its row is not yet in rows: an interrupt until it is would
        # record the epoch without its row
        self.consistent = False
        self.rows.append({**self.evaluate_row(state, running_loss), **self.diagnostics.summary()})
        self.keep_if_best(self.rows[-1])
        self.consistent, self.unwritten = True, True
        finished = self.finished(state)
        if finished or time.monotonic() - self.last_write >= self.write_every:
            self.write(state)
        return finished

    def checkpoint_state(self, state: FitState) -> dict[str, Any]:
        """What :func:`save_checkpoint` records besides the model and optimizer."""
        return {
            **state.as_dict(),
            "rows": self.rows,
            "world_size": self.world,
            "diagnostics": self.diagnostics.pending(state),
            "early_stopping": self.stopping.state_dict(),
        }


def _row(record: EpochRecord, scale: Any, validation: tuple[float, float] | None = None) -> dict[str, Any]:
    """A metrics row: regression rows (``scale`` given) carry the RMSE in the target's unit,
    classification rows (``scale`` None) the accuracies; ``validation`` (loss, accuracy) adds
    ``val_loss`` and ``val_rmse`` or ``val_accuracy``."""
    row = asdict(record)
    if scale is None:  # classification: loss is the cross-entropy, accuracy is the metric
        if validation is not None:
            row |= {"val_loss": validation[0], "val_accuracy": validation[1]}
        return {**row, **empty_summary()}
    del row["train_accuracy"], row["test_accuracy"]
    row |= {"train_rmse": scale.rmse_in_unit(record.train_loss), "test_rmse": scale.rmse_in_unit(record.test_loss)}
    if validation is not None:
        row |= {"val_loss": validation[0], "val_rmse": scale.rmse_in_unit(validation[0])}
    return {**row, **empty_summary()}


def save_checkpoint(out: Path, model: nn.Module, optimizer: Optimizer, state: Mapping[str, Any]) -> Path:
    """Write ``out/checkpoint.pt`` atomically (:func:`~gramnewton.lab.files.write_atomically`).

    Holds only tensors, numbers, strings, lists and dicts, so ``torch.load(..., weights_only=True)``
    reads it: ``model``, ``optimizer`` (state dicts), ``rng`` (torch CPU RNG state), ``epoch``
    (finished epochs), ``batch_losses`` (losses of the steps taken in the unfinished epoch),
    ``step``, ``seconds``, ``rows`` (the metrics so far), ``world_size`` (the number of
    processes that trained, 1 unless ``state`` says otherwise), ``diagnostics`` (GGN's
    per-step diagnostics of the unfinished epoch, :class:`DiagnosticsLog` entries; ``[]`` if none)
    and ``early_stopping`` (:meth:`EarlyStopping.state_dict`; ``{}`` if none).
    """
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        **{k: state[k] for k in ("epoch", "step", "seconds", "batch_losses", "rows")},
        "world_size": state.get("world_size", 1),
        "diagnostics": list(state.get("diagnostics", [])),
        "early_stopping": dict(state.get("early_stopping", {})),
    }
    return write_atomically(out / CHECKPOINT, lambda tmp: torch.save(checkpoint, tmp))


def resumable(out: str | Path, config: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds a checkpoint of ``config`` (``train.epochs`` and ``train.seconds`` may differ)."""
    out = Path(out)
    return (out / CHECKPOINT).is_file() and _holds_run_of(out, config)


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "epoch", "step", "seconds", "batch_losses", "rows")


def _load_checkpoint(out: Path, config: Mapping[str, Any], world: int = 1) -> dict[str, Any] | None:
    """The checkpoint in ``out`` (None if there is none); raise ``ValueError`` (one line) for one
    of another config or another number of processes ``world``, or a file that is truncated or
    not a checkpoint."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    if not resumable(out, config):
        raise ValueError(f"{out} holds a run of another config: pick another --out, or --overwrite to replace it")
    try:
        checkpoint = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001  torch raises many types for a damaged zip or pickle
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated or damaged: {type(error).__name__}); "
            "use --overwrite to start the run over"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ValueError(f"{path} is not a gramnewton checkpoint (missing {', '.join(missing)}); use --overwrite")
    if checkpoint.get("world_size", 1) != world:
        raise ValueError(
            f"{out} was trained by {checkpoint.get('world_size', 1)} process(es); resume it with the same "
            f"number (got {world}): the batches and the checkpointed state depend on it"
        )
    return checkpoint


def _without_budget(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` less what a resumed run may change: its budget, and how often it writes its files."""
    kept = {k: v for k, v in config["train"].items() if k not in ("epochs", "seconds", "checkpoint_seconds")}
    return {**config, "train": kept}


def is_complete(out: str | Path, config: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds this config's run with a metrics row for its last epoch."""
    out = Path(out)
    if not (out / CONFIG_FILE).is_file() or not (out / METRICS_FILE).is_file():
        return False
    try:
        if load_config(out / CONFIG_FILE) != dict(config):
            return False
    except ValueError:
        return False
    rows = read_rows(out / METRICS_FILE)
    return bool(rows) and int(rows[-1]["epoch"]) == config["train"]["epochs"]
