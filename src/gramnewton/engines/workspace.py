"""Buffers an engine keeps across steps, so that a steady state maps no fresh pages per step.

A training loop asks for the same large temporaries every step (per-sample gradients, conv
patches). Taken from a :class:`Workspace`, they are allocated on the first step and reused while
their shape repeats: the allocator never has to map (and the kernel never has to zero) them again,
whatever the allocator (docs/performance.md, "allocations per step").

Handlers reach the workspace of the engine running them through :func:`active` (a context
variable set only while that engine's backward pass runs), so their signature does not change and
a handler called outside an engine allocates as usual.

A buffer handed out with :meth:`Workspace.keep` belongs to one step: the next step writes over
it. A piece holding one carries a :class:`Stamp`; using it after the next step raises instead of
returning another step's numbers.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Stamp:
    """The workspace and step a kept buffer belongs to."""

    workspace: Workspace
    step: int

    def check(self) -> None:
        """Raise if the workspace has started a later step (the buffer was overwritten)."""
        if self.workspace.step != self.step:
            raise RuntimeError(
                "these per-sample gradients lived in a buffer that a later step of the engine reused; "
                "use a GramSystem before the engine computes the next one"
            )


@dataclass(frozen=True)
class ScratchStamp:
    """One hand-out of a scratch slot, ``shape``: what was written into it stays there until the
    slot is handed out again. Holds no reference to the buffer (a later, larger request of the
    slot frees it)."""

    workspace: Workspace
    slot: str
    step: int
    handed: int
    shape: tuple[int, ...]

    def tensor(self) -> Tensor | None:
        """The hand-out as it was written, or ``None`` once the slot has been handed out again
        (or the workspace started another step)."""
        work = self.workspace
        if work.step != self.step or work._handed[self.slot] != self.handed:
            return None
        buf = work._buffers.get(("scratch", self.slot))
        return None if buf is None else buf[: math.prod(self.shape)].view(self.shape)


class Workspace:
    """Named buffers reused across steps when the requested shape, dtype and device repeat.

    Attributes:
        step: incremented by :meth:`new_step`; stamps of older steps are stale.
    """

    def __init__(self) -> None:
        self._buffers: dict[Hashable, Tensor] = {}
        self._taken: Counter[Hashable] = Counter()
        self._scratch_used: Counter[str] = Counter()  # slot -> largest request of this step (entries)
        self._handed: Counter[str] = Counter()  # slot -> scratch requests so far (never reset)
        self.step = 0

    def new_step(self) -> None:
        """Start a step: buffers kept in the previous one may be handed out again. Buffers the
        previous step did not ask for (e.g. left by a first step of another shape) are freed, and a
        scratch buffer larger than the previous step's largest request is cut to it, so the steady
        state holds only what a step uses."""
        if self.step:
            for key in list(self._buffers):
                if key[0] == "keep" and key[2] >= self._taken[key[1]]:
                    del self._buffers[key]
                elif key[0] == "scratch":
                    used = self._scratch_used[key[1]]
                    buf = self._buffers.pop(key)
                    if used:  # the allocator reuses the freed block for the smaller one
                        self._buffers[key] = buf if buf.numel() == used else buf.new_empty(used)
        self.step += 1
        self._taken.clear()
        self._scratch_used.clear()

    def _buffer(self, key: Hashable, shape: tuple[int, ...], like: Tensor) -> Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            self._buffers.pop(key, None)  # free the old one before allocating its replacement
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf

    def scratch(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer for a value used up at once (the next ``scratch(slot)`` overwrites it).

        One flat buffer per slot, grown to the largest request and viewed as ``shape``: layers
        of different shapes share it without reallocating.
        """
        numel = math.prod(shape)
        self._scratch_used[slot] = max(self._scratch_used[slot], numel)
        self._handed[slot] += 1
        buf = self._buffers.get(("scratch", slot))
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            size = max(numel, buf.numel() if buf is not None and buf.dtype == like.dtype else 0)
            buf = self._buffer(("scratch", slot), (size,), like)
        return buf[:numel].view(shape)

    def scratch_stamp(self, slot: str, tensor: Tensor) -> ScratchStamp | None:
        """A stamp of the latest hand-out of scratch ``slot`` if ``tensor`` is it (``None``
        otherwise, e.g. a tensor a handler allocated itself); ask right after the hand-out."""
        buf = self._buffers.get(("scratch", slot))
        if buf is None or tensor.data_ptr() != buf.data_ptr() or not tensor.is_contiguous():
            return None
        return ScratchStamp(self, slot, self.step, self._handed[slot], tuple(tensor.shape))

    def keep(self, slot: str, shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, Stamp]:
        """A buffer that stays valid until the next step; the ``i``-th request of ``slot`` in a
        step gets the ``i``-th buffer of that slot (layers run in the same order every step)."""
        index = self._taken[slot]
        self._taken[slot] += 1
        return self._buffer(("keep", slot, index), tuple(shape), like), Stamp(self, self.step)

    def clear(self) -> None:
        """Free every buffer (they are allocated again when next asked for)."""
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


_ACTIVE: ContextVar[Workspace | None] = ContextVar("gramnewton_workspace", default=None)


def active() -> Workspace | None:
    """The workspace of the engine whose backward pass is running, or ``None``."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(workspace: Workspace | None) -> Iterator[Workspace | None]:
    """Make ``workspace`` the :func:`active` one for the duration of the block (``None``: none,
    e.g. for one-off timing runs whose buffers should not stay)."""
    token = _ACTIVE.set(workspace)
    try:
        yield workspace
    finally:
        _ACTIVE.reset(token)
