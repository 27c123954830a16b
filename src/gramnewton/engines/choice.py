"""Choosing, per layer shape, the fastest of several exact implementations by timing them.

Why a rule and not one timing: the choice is made once per process and then kept for every
step, so a wrong one (a candidate timed while the machine was busy) costs every step after it.
perf4 saw that on the 2-core machine: the Fixup ResNet's ``(32, 16, 16) -> (64, 8, 8)`` layer got
the slower path in one process (a step 15% slower throughout; docs/performance.md). Two things
make the choice robust to a loaded machine:

- **interleaved rounds**: each round runs every candidate once, the order rotated from round to
  round, and a candidate is scored by its fastest run. A slow phase of the machine then hits the
  candidates alike; to mislead, it must slow every run of the fastest candidate, which are spread
  over the trial (:func:`trial_order`).
- **a second trial later**: after ``recheck_after`` uses of a key, the candidates are timed again
  and the choice is made anew from the fastest run of each over both trials (a phase that covered
  the whole first trial does not cover the second). After that the choice is final.

All candidates compute the same values in exact arithmetic, so the choice changes speed, not the
mathematics; their floating-point rounding can differ (the grouped convolution sums in another
order than the patches path), so a choice made by timing can make two runs of one seed differ in
their last bits, and from there in their trajectories. Under ``torch.use_deterministic_algorithms
(True)`` no candidate is timed: the first one offered runs (the callers list their preferred path
first), so a seeded run on one machine and thread count repeats bit for bit in every process.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import torch

from . import workspace as ws

# Rounds of one trial: every candidate runs this many times (the first run may pay a one-time
# start-up cost; the fastest run counts).
TRIAL_ROUNDS = 3
# Uses of a key after which its candidates are timed a second (and last) time.
RECHECK_AFTER = 8


def trial_order(names: list[str], rounds: int) -> list[str]:
    """The runs of one trial: ``rounds`` rounds of every name, round ``r`` rotated by ``r``
    (``A B C, B C A, C A B``), so no candidate's runs are all next to each other."""
    count = len(names)
    return [names[(r + i) % count] for r in range(rounds) for i in range(count)]


class MeasuredChoice:
    """Chooses, per key (a layer's shapes), the fastest of several exact implementations.

    The first call with a new key runs a trial (:func:`trial_order`; outside any engine workspace,
    each result dropped at once, so a losing candidate leaves no buffer behind), then the fastest
    candidate; later calls run only the chosen one, except the ``recheck_after``-th use after the
    first trial, which runs a second trial and decides again on the runs of both.

    Args:
        clock: seconds, monotonic (``time.perf_counter``; tests inject a fake one).
        rounds: rounds per trial.
        recheck_after: uses after which a key is timed again (``0``: never).

    Attributes:
        choices: key -> chosen candidate name, for this process.
        forced: a candidate name to use whenever it is offered (tests, benchmarks), or ``None``.
        used: how many times each candidate ran (timing runs excluded).
        trials: key -> number of trials run for it (1 or 2).
        best: key -> candidate -> its fastest timed run (seconds) over the key's trials.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        rounds: int = TRIAL_ROUNDS,
        recheck_after: int = RECHECK_AFTER,
    ) -> None:
        self.clock, self.rounds, self.recheck_after = clock, rounds, recheck_after
        self.choices: dict[Hashable, str] = {}
        self.forced: str | None = None
        self.used: Counter[str] = Counter()
        self.trials: Counter[Hashable] = Counter()
        self.best: dict[Hashable, dict[str, float]] = {}
        self._uses: Counter[Hashable] = Counter()  # uses of each key since its first trial

    def __call__(
        self, key: Hashable, candidates: dict[str, Callable[[], Any]], untimed: str | None = None
    ) -> tuple[str, Any]:
        """Run the chosen candidate for ``key``; returns its name and result. ``untimed``, when
        one of ``candidates``, runs without a trial (unless another candidate is ``forced``): the
        caller knows that no trial could pay for itself here. Under
        ``torch.use_deterministic_algorithms(True)`` the first of ``candidates`` runs, untimed
        (a ``forced`` or ``untimed`` one still takes precedence: neither depends on timing)."""
        name = self.forced if self.forced in candidates else None
        if name is None and untimed in candidates:
            name = untimed
        if name is None and (len(candidates) == 1 or torch.are_deterministic_algorithms_enabled()):
            name = next(iter(candidates))
        if name is None:
            name = self._choose(key, candidates)
        self.used[name] += 1
        return name, candidates[name]()

    def _choose(self, key: Hashable, candidates: dict[str, Callable[[], Any]]) -> str:
        """The candidate for this use of ``key``, timing them first when a trial is due."""
        uses = self._uses[key]
        self._uses[key] += 1
        due = key not in self.choices or (self.trials[key] == 1 and uses == self.recheck_after > 0)
        if due or self.choices[key] not in candidates:  # a stale choice (other candidates offered)
            best = self.best.setdefault(key, {})
            with ws.activated(None):  # trial buffers are freed at once, not kept in the engine's workspace
                for name in trial_order(list(candidates), self.rounds):
                    start = self.clock()
                    candidates[name]()
                    best[name] = min(best.get(name, float("inf")), self.clock() - start)
            self.trials[key] += 1
            self.choices[key] = min(candidates, key=best.__getitem__)
        return self.choices[key]
