"""``gramnewton train CONFIG``: one experiment run with metrics.csv, checkpoints and --resume.

Data-parallel: ``torchrun --nproc_per_node=N -m gramnewton train CONFIG`` starts ``N`` processes
(gloo on CPU, the lab trains on CPU); each trains on its share of every batch with
``GramGaussNewton(distributed=optimizer.distributed)`` (default "auto": exact), rank 0 alone prints,
evaluates and writes the run folder (see :mod:`gramnewton.lab.experiments.runner`).
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..experiments.config import load_config
from ..experiments.early_stopping import BEST, EarlyStopping, load_best
from ..experiments.reproduce import CONFIGS_DIR
from ..experiments.runner import check_run_folder, run_experiment
from ..experiments.setup import CHECKPOINT
from ..experiments.training import Callback, FitState, ProgressBar


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train one experiment config (TOML) with checkpoints and resume")
    p.add_argument(
        "config",
        type=config_path,
        help="TOML experiment file, or the name of a packaged config (e.g. afad_ggn_fixup; see gramnewton.lab.configs)",
    )
    p.add_argument("--out", type=Path, help="run folder (default runs/<config name>)")
    replace = p.add_mutually_exclusive_group()
    replace.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    replace.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty run folder")
    add_overrides(p, "override a config value, e.g. --set optimizer.alpha=0.1 (repeatable)")
    p.set_defaults(run=run)


def add_overrides(parser: argparse.ArgumentParser, description: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option (``args.overrides``, for ``load_config``)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=description)


def config_path(text: str) -> Path:
    """A TOML file as given, else the packaged config of that name (``afad_ggn_fixup``)."""
    path = Path(text)
    if path.is_file():
        return path
    packaged = CONFIGS_DIR / f"{path.stem}.toml"
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))
    raise argparse.ArgumentTypeError(f"no config file {text} and no packaged config of that name ({', '.join(names)})")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / args.config.stem
    # refused folders before the note below, which would otherwise precede the error
    check_run_folder(out, resume=args.resume, overwrite=args.overwrite, config=config)
    with _process_group() as rank:
        if args.resume and not (out / CHECKPOINT).is_file() and rank == 0:
            print(f"--resume: no checkpoint in {out}, starting from scratch")
        try:
            rows = train_with_progress(config, out, resume=args.resume, overwrite=args.overwrite, progress=rank == 0)
        except KeyboardInterrupt:
            if not (out / CHECKPOINT).is_file():
                raise  # a second Ctrl-C during set-up: nothing to resume; the CLI says "interrupted"
            if rank == 0:
                print(f"\ninterrupted: the last checkpoint is in {out}; continue with --resume")
            return 130
    if rank:
        return 0
    name = config["name"] or args.config.stem
    print(f"{name}: last epoch {describe(rows[-1])}")
    written = [out / "metrics.csv", out / CHECKPOINT]
    stopping = EarlyStopping(config["train"]["early_stopping_patience"])
    stopping.load_state_dict(
        torch.load(out / CHECKPOINT, weights_only=True).get("early_stopping") or stopping.state_dict()
    )
    if stopping.stop:
        print(
            f"stopped early: no lower validation loss in the {stopping.patience} evaluations after epoch {stopping.best_epoch}"
        )
    if config["train"]["keep_best"] and (out / BEST).is_file():
        print(
            f"{name}: best model, the one to use (lowest validation loss; in {out / BEST}): epoch {describe(load_best(out))}"
        )
        written.append(out / BEST)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def describe(row: dict[str, Any]) -> str:
    """``"<epoch>, <s> s of training, train/val/test loss, test RMSE or accuracy"`` of a metrics row
    (MSE for regression, cross-entropy and accuracy for classification)."""
    classification = "test_accuracy" in row
    loss = "CE" if classification else "MSE"
    parts = [f"{row['epoch']:g}", f"{row['seconds']:.1f} s of training", f"train {loss} {row['train_loss']:.4g}"]
    if "val_loss" in row:
        parts.append(f"val {loss} {row['val_loss']:.4g}")
    parts.append(f"test {loss} {row['test_loss']:.4g}")
    if classification:
        parts.append(f"test accuracy {row['test_accuracy']:.2%}")
    else:
        parts.append(f"test RMSE {row['test_rmse']:.4g}")
    return ", ".join(parts)


def train_with_progress(
    config: dict[str, Any],
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    desc: str = "",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """:func:`run_experiment` with a progress bar (steps / total steps, the total within
    ``train.seconds`` when it is set; none when ``progress`` is False); Ctrl-C stops after the
    current step (checkpointed)."""
    with _deferred_interrupt() as stop:
        name = desc or config["name"] or "train"
        bar = [ProgressBar(name, seconds=config["train"]["seconds"], leave=False)] if progress else []
        callbacks = [*bar, _InterruptAfterStep(stop)]
        return run_experiment(config, out, resume=resume, overwrite=overwrite, callbacks=callbacks)


@contextmanager
def _process_group() -> Iterator[int]:
    """Under ``torchrun`` (``WORLD_SIZE > 1``), a gloo process group for the run; yields the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


class _InterruptAfterStep(Callback):
    """Raises ``KeyboardInterrupt`` between steps once ``stop()`` says Ctrl-C was pressed."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def on_step(self, state: FitState, loss: float) -> None:
        if self.stop():
            raise KeyboardInterrupt


@contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """SIGINT sets a flag instead of interrupting mid-update; a second Ctrl-C interrupts at once."""
    hit: list[bool] = []

    def handler(signum: int, frame: Any) -> None:
        if hit:
            raise KeyboardInterrupt
        hit.append(True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        yield lambda: False
        return
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)
