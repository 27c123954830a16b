"""Per-epoch summaries of GGN's per-step :class:`~gramnewton.diagnostics.StepDiagnostics` for metrics rows."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from torch.optim import Optimizer

from .training import Callback, FitState

# Per-step values kept (one list of floats per step, so checkpoints stay ``weights_only``-loadable)
# and the metrics-row columns summarising them: median gain ratio, alpha of the epoch's last
# step, median ``||phi||``, rejected-attempt count, largest jitter, median condition estimate.
DIAGNOSTIC_COLUMNS = ("gain_ratio", "alpha", "step_norm", "rejected", "jitter", "condition")


def empty_summary() -> dict[str, float]:
    """The columns of a row without GGN steps (epoch 0, other optimizers): all NaN."""
    return dict.fromkeys(DIAGNOSTIC_COLUMNS, math.nan)


class DiagnosticsLog(Callback):
    """Collects ``optimizer.last_diagnostics`` after every step of the unfinished epoch.

    Does nothing for an optimizer without ``last_diagnostics`` (SGD, Adam, K-FAC): their
    summaries are all NaN. :attr:`steps` stays aligned with ``state.batch_losses`` (a step's
    entry replaces any left from the previous epoch), so the callback order does not matter and a
    checkpoint resumes it with :meth:`pending`.

    A step's ``rejected`` entry counts its rejected attempts, ``retries + rejected`` (every retry
    follows a rejected attempt of the same batch): with ``GainRatioDamping(retries=n)`` a step
    whose first attempt the rule undid and whose retry it kept counts 1, not 0, so the column
    shows every step's cost the rule threw away.
    """

    def __init__(self, optimizer: Optimizer, steps: Iterable[Sequence[float]] = ()):
        self.optimizer = optimizer
        self.steps: list[list[float]] = [list(s) for s in steps]

    def on_step(self, state: FitState, loss: float) -> None:
        d = getattr(self.optimizer, "last_diagnostics", None)
        if d is None:
            return
        del self.steps[len(state.batch_losses) - 1 :]
        nan = math.nan
        self.steps.append(
            [
                nan if d.gain_ratio is None else float(d.gain_ratio),
                float(d.alpha),
                float(d.step_norm),
                float(d.retries + d.rejected),
                float(d.jitter),
                nan if d.condition is None else float(d.condition),
            ]
        )

    def pending(self, state: FitState) -> list[list[float]]:
        """The entries of the steps taken in the unfinished epoch (what a checkpoint saves)."""
        return [list(s) for s in self.steps[: len(state.batch_losses)]]

    def summary(self) -> dict[str, float]:
        """Summary of the steps collected (call at the end of an epoch), NaN where there is none."""
        if not self.steps:
            return empty_summary()
        column = dict(zip(DIAGNOSTIC_COLUMNS, zip(*self.steps)))
        return {
            "gain_ratio": _median(column["gain_ratio"]),
            "alpha": column["alpha"][-1],
            "step_norm": _median(column["step_norm"]),
            "rejected": int(sum(column["rejected"])),
            "jitter": max(column["jitter"]),
            "condition": _median(column["condition"]),
        }


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]  # gain ratio / condition not measured
    return statistics.median(finite) if finite else math.nan
