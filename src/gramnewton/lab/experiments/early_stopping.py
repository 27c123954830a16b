"""Early stopping on a validation split and the best-validation model of a run (``best.pt``).

:class:`EarlyStopping` counts the evaluations since the validation loss last fell;
:func:`save_best` / :func:`load_best` write and read the model of the best evaluation with its
metrics row. The runner (:mod:`~gramnewton.lab.experiments.runner`) calls them after every
evaluation, so the choice of the model never looks at the test set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files import write_atomically

BEST = "best.pt"


@dataclass
class EarlyStopping:
    """The best validation loss so far and the evaluations since it.

    An evaluation improves when its loss is strictly below :attr:`best_loss` (a NaN never
    does). With ``patience = n > 0`` the run should stop once ``n`` evaluations in a row have not
    improved (:attr:`stop`); ``patience = 0`` never stops. The state is plain numbers
    (:meth:`state_dict`), so a checkpoint resumes it.

    Attributes:
        patience: evaluations without improvement that end the run (0: never).
        best_loss: lowest validation loss seen (``inf`` before the first finite one).
        best_epoch: the epoch of that evaluation (-1 before).
        since_best: evaluations since the best one (all of them while there is none).
    """

    patience: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    since_best: int = 0

    def update(self, epoch: int, loss: float) -> bool:
        """Record the validation ``loss`` of an evaluation after ``epoch``; True if it is the new best."""
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.since_best = float(loss), epoch, 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        """Whether ``patience`` evaluations in a row have not improved."""
        return self.patience > 0 and self.since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (``patience`` stays this object's)."""
        self.best_loss, self.best_epoch, self.since_best = (
            float(state["best_loss"]),
            int(state["best_epoch"]),
            int(state["since_best"]),
        )


def save_best(out: Path, model: nn.Module | Mapping[str, Tensor], row: Mapping[str, Any]) -> Path:
    """Write ``out/best.pt`` atomically: ``model`` (a module, or its state dict taken earlier) and
    ``row`` (its metrics row, with the test metrics of the same evaluation);
    ``torch.load(..., weights_only=True)`` reads it."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    return write_atomically(out / BEST, lambda tmp: torch.save({"model": state, "row": dict(row)}, tmp))


def load_best(out: str | Path, model: nn.Module | None = None) -> dict[str, Any]:
    """The metrics row of the run's best-validation model (``out/best.pt``), loading its weights
    into ``model`` when one is given (a model of the run's config,
    :func:`~gramnewton.lab.experiments.setup.build_model`).

    Raises:
        FileNotFoundError: the run kept no best model (``train.keep_best`` off, or no finite
            validation loss yet).
    """
    path = Path(out) / BEST
    if not path.is_file():
        raise FileNotFoundError(f"no {BEST} in {out}: the run kept no best model (train.keep_best = true keeps one)")
    saved = torch.load(path, weights_only=True)
    if model is not None:
        model.load_state_dict(saved["model"])
    return saved["row"]
