r"""Data-parallel Gram-Gauss-Newton on ``torch.distributed`` (one process per device, ``torchrun``).

Every rank's closure returns the residuals ``r_p`` of shape ``(b_p, k)`` of its own shard
(``b_p = 0`` allowed with the square loss: the rank then has no row of ``J``). The
union batch is the shards in rank order, ``B = sum_p b_p`` samples; ``J_p`` is shard ``p``'s
per-sample Jacobian ``(b_p*k, m)`` and ``J = [J_0; ...; J_{P-1}]``. Volumes below are per rank per
step, in tensor entries, ``q = (P-1)/P``; DDP's gradient all-reduce moves ``2*q*m`` (ring).

Exact mode: the single-process step on the union batch, to round-off
--------------------------------------------------------------------
The flat parameter vector (``m`` entries, parameters in ``engine.params`` order) is cut into ``P``
contiguous column ranges ``S_r`` of ``m/P`` entries; rank ``r`` owns ``S_r``. One step:

1. status: all-gather of ``(failed, fingerprint, b_p, k, 0)`` (``5 (P-1)`` numbers): if any rank
   failed or the ranks disagree, every rank raises before anything is applied (see "Errors").
2. residuals: all-gather of ``r_p`` -> ``r`` ``(B*k,)`` on every rank (``q*B*k``).
3. all-to-all: rank ``p`` sends ``J_p[:, S_r]`` to rank ``r``, so rank ``r`` holds
   ``J[:, S_r]`` ``(B*k, m/P)``: every sample's gradient restricted to its slice
   (``b_p*k*m*q``, the term that dominates).
4. all-reduce (sum) of the partial Grams ``J[:, S_r] J[:, S_r]^T`` -> ``G = J J^T``
   ``(B*k, B*k)`` (``2*q*(B*k)^2``).
5. every rank solves ``(lam G + alpha I) c = r``: identical input gives identical ``c``, so no
   broadcast is needed.
6. all-gather of the direction slices ``-J[:, S_r]^T c`` (``q*m``): every rank *copies* the same
   numbers, so the parameters stay bit-identical on every rank.

Total ``q*(b_p*k*m + 2*(B*k)^2 + B*k + m)`` against DDP's ``2*q*m``: about ``b_p*k/2`` times DDP's
volume; see docs/distributed.md for the measured counts and the scaling model.

With a metric of one weight per tensor (``metric="auto"``'s, :mod:`gramnewton.metric`) the union's
batch gradient ``J^T r / B`` is one more all-gather of slices (``q*m``), every rank updates the
same second moment from it, and step 4 all-reduces ``J[:, S_r] D[S_r] J[:, S_r]^T`` instead
(``GramSystem.weighted_gram``; the plain Gram is not formed): the single-process step in the
metric, to round-off. A per-entry metric forms its Gram from ``GramSystem.jacobian_columns``,
which this system does not provide: refused at construction (its slice-wise Gram is not built).

Local mode: block-Jacobi (additive Schwarz) with averaging
----------------------------------------------------------
Each rank takes the step of its own shard, ``d_p = -J_p^T (lam G_pp + alpha I)^{-1} r_p``
(``G_pp = J_p J_p^T``, no cross-rank Gram), and the step applied everywhere is their shard-size
weighted mean ``d = sum_p (b_p / B) d_p``: one all-reduce of ``m`` entries, DDP's volume.

Why the mean and not the sum ``sum_p d_p`` (plain additive Schwarz, i.e. the exact formula with
the off-diagonal blocks ``G_pq`` dropped): in the linearised model the residuals after a step are
``(I - lam G M) r`` with ``M = theta * blockdiag((lam G_pp + alpha I)^{-1})``, and the eigenvalues of
``lam G blockdiag(lam G_pp + alpha I)^{-1}`` lie in ``[0, P)``. The largest ones belong to directions
that all shards see alike (the constant mode of the neural tangent kernel, which dominates real
kernels); ``theta = 1`` (the sum) overshoots them by up to ``P - 1`` times and diverges for ``P > 2``,
while ``theta = 1/P`` (the mean) never overshoots: ``|1 - theta * eig| <= 1``. The mean is exact
when every shard sees the same kernel, and it is what DDP does to gradients (average), so GGN
hyper-parameters tuned for a batch of ``b_p`` carry over.

Errors
------
A rank whose closure or local computation raises does not skip the collectives: it reports the
failure in the status exchange that precedes every other collective of the step, and every rank
then raises (the failing rank its own exception; the others an exception of the same type among
``ValueError``, ``TypeError``, :class:`~gramnewton.solve.NonFiniteError`,
:class:`~gramnewton.solve.SingularGramError`, else ``RuntimeError``,
naming the rank and its message). No parameter is changed on any rank; no rank waits forever.
Failures after the status exchange (the solve, a non-finite direction) see identical numbers on
every rank and so raise on every rank.

Ranks that disagree: every status row also carries a fingerprint (CRC-32) of what must be alike
on every rank at that point: where the rank is (the construction's broadcast, an exact or local
step, a re-evaluation), the dtypes and shapes of the parameters it trains (and, at the broadcast,
of the parameters and buffers), in local mode the step's hyper-parameters and whether it has
``phi_{t-1}``, and whatever :attr:`Communicator.settings` returns (the optimizer's settings).
Every row has the same length wherever it is sent from, so ranks that reached different
collectives still meet on one all-gather. If the fingerprints differ, every rank raises the same
``ValueError`` naming the first setting that differs and each rank's value, before anything is
sent or applied: rank 0's parameters are never broadcast into other shapes (which gloo aborted
on, waited forever on, or did silently), and a rank that froze a parameter alone never starts
an all-to-all of other sizes.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .engines import Closure, GramEngine, GramSystem
from .engines.base import params_dtype
from .engines.reference import flatten, split_like
from .solve import NonFiniteError, SingularGramError, SolveInfo
from .update import GramGaussNewtonStep, gram_gauss_newton_direction

MODES = ("auto", "exact", "local")

# exception types re-raised as themselves on the ranks that did not fail
_PORTABLE: dict[str, type[Exception]] = {
    e.__name__: e for e in (ValueError, TypeError, NonFiniteError, SingularGramError)
}

# numbers of a status row after ``failed`` and the settings' fingerprint: every exchange sends
# as many, whichever collective of the step a rank has reached, so that ranks at different
# places meet on one all-gather and see that they disagree (instead of waiting or aborting)
STATUS_VALUES = 3


def layout(tensors: Sequence[Tensor]) -> tuple[str, ...]:
    """``"dtype(shape)"`` of each tensor: what every rank must hold alike to train one model."""
    return tuple(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}" for t in tensors)


def fingerprint(settings: Mapping[str, Any]) -> float:
    """CRC-32 of ``settings``' ``repr`` (names and values in order), exact in float64 and the
    same in every process (unlike ``hash``, which Python salts per process)."""
    return float(zlib.crc32(repr(list(settings.items())).encode()))


def first_difference(name: str, values: Sequence[Any]) -> str:
    """``"name ... (rank 0: a, rank 1: b)"`` for per-rank ``values`` of one setting; for sequences
    (a layout) the first entry that differs, or their lengths."""
    if all(isinstance(v, (tuple, list)) for v in values):
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            return f"the number of {name} (" + ", ".join(f"rank {p}: {len(v)}" for p, v in enumerate(values)) + ")"
        for i in range(lengths.pop()):
            if len({repr(v[i]) for v in values}) > 1:
                return f"{name}[{i}] (" + ", ".join(f"rank {p}: {v[i]}" for p, v in enumerate(values)) + ")"
    return f"{name} (" + ", ".join(f"rank {p}: {v!r}" for p, v in enumerate(values)) + ")"


class _EmptyShard(Exception):
    """This rank's closure returned no sample (a global batch with fewer samples than ranks, e.g.
    the last batch of an epoch): in exact mode the rank takes part with no row of ``J``."""


def _no_empty_shard(closure: Closure) -> Closure:
    """``closure``, raising :class:`_EmptyShard` instead of returning residuals (or ``(outputs,
    targets)``) with no sample, which the engines refuse (a batch of their own must have one).

    Only a plain function (a ``lambda``, a ``def``, a ``functools.partial``, a bound method) is
    wrapped: a closure object (a :class:`~gramnewton.generalized.LossClosure`, a
    :class:`~gramnewton.engines.FunctionalResidual`) is recognised by its type by the engines, so
    it is returned as is (an empty shard is then refused by the engine, on every rank)."""
    if not (inspect.isfunction(closure) or inspect.ismethod(closure) or isinstance(closure, functools.partial)):
        return closure

    def call(*args: Any) -> Any:
        value = closure(*args)
        first = value[0] if isinstance(value, tuple) else value
        if isinstance(first, Tensor) and first.dim() > 0 and first.shape[0] == 0:
            raise _EmptyShard()
        return value

    return call


def resolve_mode(distributed: str | None, process_group: dist.ProcessGroup | None = None) -> str | None:
    """``"exact"``, ``"local"`` or ``None`` (single process) for the ``distributed`` argument.

    ``"auto"`` is exact when ``torch.distributed`` is initialised with more than one process in
    ``process_group`` (default: the world), else off.

    Raises:
        ValueError: an unknown mode, or ``"exact"``/``"local"`` without ``torch.distributed``.
    """
    if distributed is None:
        return None
    if distributed not in MODES:
        raise ValueError(f"Invalid distributed mode: {distributed!r}; expected one of {MODES} or None")
    ready = dist.is_available() and dist.is_initialized()
    if distributed == "auto":
        return "exact" if ready and dist.get_world_size(process_group) > 1 else None
    if not ready:
        raise ValueError(
            f"distributed={distributed!r} needs torch.distributed initialised first "
            "(torch.distributed.init_process_group, e.g. under torchrun)"
        )
    return distributed


class Communicator:
    """The collectives of one optimizer on ``group``, with a count of the bytes they move.

    Args:
        group: the ranks (default: the world).
        device: where the status exchange's numbers go: the parameters' device, since NCCL
            moves only CUDA tensors (default: the CPU).

    Attributes:
        rank, world: this process's rank in ``group`` and the group's size ``P``.
        settings: ``None`` or a function returning what every rank must have alike when a step
            starts (e.g. the optimizer's hyper-parameters), ``{name: value}`` with ``repr``-able
            values: every status exchange (:meth:`agree`) compares them, by one fingerprint number.
        sent_bytes: bytes this rank sends per kind of collective since construction, counted
            from the tensors handed to each call under the bandwidth-optimal algorithms
            (all-gather: ``(P-1)`` times the own part, ring; all-reduce: ``2 (P-1)/P`` times
            the tensor, ring; all-to-all: the parts addressed to other ranks). The status
            exchange and the error path are included.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | None = None):
        self.group, self.device = group, torch.device("cpu") if device is None else device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.sent_bytes: Counter[str] = Counter()
        self.settings: Callable[[], Mapping[str, Any]] | None = None
        self._raised: BaseException | None = None  # the last error an exchange raised on every rank

    def _count(self, kind: str, nbytes: float) -> None:
        self.sent_bytes[kind] += int(nbytes)

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (in place).

        Raises:
            ValueError: on every rank, before anything is sent, when the ranks' ``tensors``
                differ in number, shape or dtype (rank 0's values cannot be copied into them).
        """
        if not tensors:  # nothing to send (e.g. no parameter newly trained): no collective either
            return
        self.agree(None, [], {"site": "broadcast of rank 0's values", "parameters and buffers": layout(tensors)})
        for t in tensors:
            dist.broadcast(t.data, group_src=0, group=self.group)
            self._count("broadcast", t.numel() * t.element_size() * (self.rank == 0) * (self.world - 1))

    def agree(
        self, error: Exception | None, values: Sequence[float], settings: Mapping[str, Any] | None = None
    ) -> Tensor:
        """Exchange ``(failed, fingerprint, *values)`` between all ranks; raise on every rank if any
        failed, or if their ``settings`` (with :attr:`settings`' own) differ.

        Args:
            error: this rank's failure so far, or ``None``.
            values: at most ``STATUS_VALUES`` numbers (the same count on every rank).
            settings: what must be alike on every rank at this point (a ``"site"`` naming the
                caller, a parameter layout), added to :attr:`settings`'.

        Returns:
            ``(P, len(values))`` float64 table, row ``p`` = rank ``p``'s ``values``.

        Raises:
            ValueError: on every rank, naming the first setting that differs and each rank's value.
        """
        if len(values) > STATUS_VALUES:
            raise ValueError(f"a status exchange carries at most {STATUS_VALUES} values, got {len(values)}")
        mine: dict[str, Any] = {}
        if self.settings is not None and error is None:
            try:
                mine.update(self.settings())
            except Exception as caught:  # reported like any other failure of this rank
                error = caught
        mine.update(settings or {})
        padded = [*values, *[0.0] * (STATUS_VALUES - len(values))]
        row = torch.tensor(
            [float(error is not None), fingerprint(mine), *padded], dtype=torch.float64, device=self.device
        )
        rows = [torch.empty_like(row) for _ in range(self.world)]
        dist.all_gather(rows, row, group=self.group)
        self._count("status", row.numel() * 8 * (self.world - 1))
        table = torch.stack(rows).cpu()
        failed = [p for p in range(self.world) if table[p, 0] != 0]
        if failed:
            self._raise_everywhere(error, failed[0])
        if bool((table[:, 1] != table[0, 1]).any()):
            self._raise_disagreement(mine)
        return table[:, 2 : 2 + len(values)]

    def fail_everywhere(self, error: Exception) -> None:
        """Report ``error``, raised on this rank where the others are on their way to a status
        exchange (e.g. a check at the start of a step), so that they raise too instead of waiting;
        nothing when ``error`` came from an exchange (every rank has raised it already). Raises
        ``error`` here."""
        if error is not self._raised:
            self.agree(error, [])
        raise error

    def _raise_disagreement(self, mine: Mapping[str, Any]) -> None:
        """Every rank's settings, then the same ``ValueError`` on every rank naming the first that differs."""
        everyone: list[dict[str, Any] | None] = [None] * self.world
        dist.all_gather_object(everyone, dict(mine), group=self.group)
        names = list(dict.fromkeys(name for settings in everyone for name in settings))
        # a setting that every rank has names the cause best; the site (where each rank is) next
        shared = [n for n in names if n != "site" and all(n in settings for settings in everyone)]
        ordered = [*shared, "site", *[n for n in names if n not in shared and n != "site"]]
        what = "settings that print alike"  # unreachable while repr is deterministic
        for name in ordered:
            values = [settings.get(name, "(none)") for settings in everyone]
            if len({repr(v) for v in values}) > 1:
                what = first_difference(name, values)
                break
        self._raised = ValueError(
            f"the {self.world} ranks disagree on {what}: every rank must train the same parameters with the "
            "same settings and reach the same step; no parameter was changed on any rank"
        )
        raise self._raised

    def _raise_everywhere(self, error: Exception | None, first: int) -> None:
        messages: list[tuple[str, str] | None] = [None] * self.world
        dist.all_gather_object(
            messages, None if error is None else (type(error).__name__, str(error)), group=self.group
        )
        if error is not None:
            self._raised = error
            raise error
        name, text = messages[first]
        self._raised = _PORTABLE.get(name, RuntimeError)(
            f"rank {first} of {self.world} failed, no parameter was changed on any rank ({name}: {text})"
        )
        raise self._raised

    def all_gather_rows(self, local: Tensor, rows: Sequence[int]) -> Tensor:
        """Concatenate every rank's ``(rows[p], ...)`` tensor along dimension 0, in rank order."""
        longest = max(rows)
        padded = local.new_zeros(longest, *local.shape[1:])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        self._count("all_gather", padded.numel() * padded.element_size() * (self.world - 1))
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    def all_to_all(self, send: Tensor, send_sizes: list[int], receive_sizes: list[int]) -> Tensor:
        """Rank ``p`` sends the ``send_sizes[r]`` entries of ``send`` addressed to rank ``r``;
        returns what every rank addressed to this one, in rank order."""
        received = send.new_empty(sum(receive_sizes))
        dist.all_to_all_single(received, send, receive_sizes, send_sizes, group=self.group)
        others = sum(n for r, n in enumerate(send_sizes) if r != self.rank)
        self._count("all_to_all", others * send.element_size())
        return received

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same numbers."""
        dist.all_reduce(tensor, group=self.group)
        self._count("all_reduce", 2 * (self.world - 1) / self.world * tensor.numel() * tensor.element_size())
        return tensor

    def gather(self, fn: Callable[[], Tensor]) -> Tensor:
        """Every rank's ``fn()`` (``(n_p, ...)``) concatenated in rank order; an error in any
        rank's ``fn`` raises on every rank (see "Errors")."""
        value, error = None, None
        try:
            value = fn()
            if not isinstance(value, Tensor) or value.dim() == 0:
                raise TypeError(f"expected a tensor with a batch dimension, got {type(value).__name__}")
        except Exception as caught:
            error = caught
        table = self.agree(error, [0.0] if error else [float(value.shape[0])], {"site": "re-evaluation"})
        return self.all_gather_rows(value, [int(n) for n in table[:, 0]])

    def total(self, fn: Callable[[], Sequence[float]], width: int) -> Tensor:
        """The sum over the ranks of ``fn()`` (``width`` numbers), float64 ``(width,)``, the same
        on every rank; an error in any rank's ``fn`` raises on every rank."""
        values, error = [0.0] * width, None
        try:
            values = [float(v) for v in fn()]
            if len(values) != width:
                raise ValueError(f"expected {width} numbers, got {len(values)}")
        except Exception as caught:
            error = caught
            values = [0.0] * width  # every rank must hand the exchange the same number of values
        return self.agree(error, values, {"site": "sum"}).sum(0)

    def bounds(self, m: int) -> list[tuple[int, int]]:
        """The contiguous column range ``[lo, hi)`` of ``m`` owned by each rank."""
        return [(r * m // self.world, (r + 1) * m // self.world) for r in range(self.world)]


class ExactGramEngine:
    """The Gram system of the union batch of all ranks (module docstring, "Exact mode").

    Args:
        engine: computes each rank's own shard; must provide ``jacobian_columns``.
        comm: the ranks.

    ``compute`` and the returned ``jt_times`` are collective: every rank calls them together.
    """

    def __init__(self, engine: GramEngine, comm: Communicator):
        self.engine, self.comm = engine, comm
        self.params = engine.params
        self._layout = layout(self.params)  # checked against the other ranks' at every step

    def compute(self, closure: Closure, form_gram: Callable[[int], bool] | None = None) -> GramSystem:
        """Residuals ``(B, k)``, Gram ``(B*k, B*k)`` and ``J^T v`` for ``v`` ``(B*k,)`` of the union
        batch, and its ``weighted_gram`` (a per-tensor metric's ``sum_p w_p J_p J_p^T``, formed as
        the Gram: each rank's column slice, scaled, then one all-reduce).

        ``form_gram``: given the union's ``B*k``, whether to form the plain Gram (``None``: always;
        a metric's step needs only the weighted one). Every rank gets the same answer, so the
        collectives stay in step."""
        comm = self.comm
        bounds = comm.bounds(sum(p.numel() for p in self.params))
        lo, hi = bounds[comm.rank]
        shape, send, error, mine = (0, 0), None, None, None
        try:
            try:
                # the union's Gram is formed below from J's column slices: the shard's own would be discarded
                call = _no_empty_shard(closure)  # a shard may have no sample
                if getattr(self.engine, "can_skip_gram", False):
                    local = self.engine.compute(call, form_gram=lambda rows: False)
                else:
                    local = self.engine.compute(call)
            except _EmptyShard:  # no row of J here: the other ranks' samples are the union batch
                send = torch.zeros(0, dtype=params_dtype(self.params), device=self.params[0].device)
            else:
                if local.jacobian_columns is None:
                    raise TypeError(
                        f"{type(self.engine).__name__} cannot materialise J, which distributed='exact' needs"
                    )
                shape, mine = tuple(local.residuals.shape), local.residuals
                send = torch.cat([local.jacobian_columns(a, b).reshape(-1) for a, b in bounds])
        except Exception as caught:  # reported to every rank by agree() before any other collective
            error = caught
        table = comm.agree(error, shape, {"site": "exact step", "parameters": self._layout})
        rows = [int(n) for n in table[:, 0]]
        ks = {int(k) for n, k in zip(rows, table[:, 1]) if n}  # an empty shard has no number of outputs
        if not ks:
            raise ValueError("every rank's closure returned an empty batch; no parameter was changed")
        if len(ks) != 1:
            raise ValueError(
                f"the ranks' residuals have different numbers of outputs {sorted(ks)}; no parameter was changed"
            )
        k = ks.pop()
        if mine is None:  # an empty shard: (0, k) in the dtype of the parameters (and J)
            mine = send.new_zeros(0, k)
        residuals = comm.all_gather_rows(mine, rows)
        received = comm.all_to_all(
            send, [rows[comm.rank] * k * (b - a) for a, b in bounds], [n * k * (hi - lo) for n in rows]
        )
        jac = received.view(sum(rows) * k, hi - lo)  # J[:, S_rank]: rank-major, then sample-major rows
        gram = comm.all_reduce_(jac @ jac.T) if form_gram is None or form_gram(jac.shape[0]) else None
        widest = max(b - a for a, b in bounds)

        def jt_times(v: Tensor) -> list[Tensor]:
            part = jac.new_zeros(widest)
            part[: hi - lo] = jac.T @ v.to(jac.dtype)
            slices = comm.all_gather_rows(part.unsqueeze(0), [1] * comm.world)
            flat = torch.cat([s[: b - a] for s, (a, b) in zip(slices, bounds)])
            return split_like(flat, self.params)

        def j_times(v: Sequence[Tensor]) -> Tensor:
            # J v = sum over ranks of J[:, S_rank] v[S_rank]: one all-reduce of (B*k,)
            return comm.all_reduce_(jac @ flatten(v, jac.dtype)[lo:hi])

        def weighted_gram(weights: Sequence[float]) -> Tensor:
            scale = torch.cat([jac.new_full((p.numel(),), float(w)) for p, w in zip(self.params, weights)])
            return comm.all_reduce_((jac * scale[lo:hi]) @ jac.T)

        return GramSystem(
            residuals=residuals, gram=gram, jt_times=jt_times, j_times=j_times, weighted_gram=weighted_gram
        )


def local_direction(
    engine: GramEngine,
    closure: Closure,
    comm: Communicator,
    *,
    losses: Callable[[GramGaussNewtonStep], Tensor],
    **options: Any,
) -> tuple[GramGaussNewtonStep, Tensor]:
    """Local mode (module docstring): ``d = sum_p (b_p / B) d_p`` from each rank's own step ``d_p``.

    Args:
        engine: this rank's engine over the parameters (every rank's in the same layout).
        closure: this rank's shard of the batch, returning residuals ``(b_p,)`` or ``(b_p, k)``
            (or a general loss's closure); a plain function's shard of no sample takes part
            with weight ``0`` (:func:`_no_empty_shard`).
        comm: the ranks' :class:`Communicator`.
        losses: the step's per-sample (or per-entry) losses, whose mean over the union batch
            is returned (e.g. the squared residuals).
        options: :func:`~gramnewton.update.gram_gauss_newton_direction`'s keywords (``lam``,
            ``alpha``, ``solve_dtype``, ``momentum`` with ``previous``, ``solve_space``). With
            momentum every rank holds the same ``phi_{t-1}``, so the combined step is
            ``phi_t = mu phi_{t-1} + sum_p (b_p / B) J_p^T c_p``.

    Returns:
        The rank's own step (its ``residuals``, ``gram`` and ``coefficients`` are this rank's;
        on a rank whose closure returned no sample, residuals ``(0, 1)`` and weight ``0``)
        with ``direction`` replaced by the combined one, and the mean loss over the union batch.
    """
    step, error, stats = None, None, (0.0, 0.0, 0.0)
    try:
        try:
            step = gram_gauss_newton_direction(engine, _no_empty_shard(closure), **options)
        except _EmptyShard:  # no sample here: weight b_p / B = 0
            step = _empty_step(engine.params, options.get("alpha"))
        values = losses(step).detach().double()
        stats = (float(step.residuals.shape[0]), float(values.sum()), float(values.numel()))
    except Exception as caught:  # reported to every rank by agree() before the all-reduce
        error = caught
    # what makes the steps of the ranks parts of one (hyper-parameters, phi_{t-1}, the parameters)
    settings = {k: v for k, v in options.items() if isinstance(v, (int, float, str, torch.dtype, type(None)))}
    settings.update({"site": "local step", "phi_previous": options.get("previous") is not None})
    table = comm.agree(error, stats, {**settings, "parameters": layout(engine.params)})
    if not table[:, 0].sum() > 0:  # identical on every rank: all raise together
        raise ValueError("every rank's closure returned an empty batch; no parameter was changed")
    weight = table[comm.rank, 0] / table[:, 0].sum()
    flat = torch.cat([d.reshape(-1) for d in step.direction]) * weight.to(step.direction[0].dtype)
    direction = split_like(comm.all_reduce_(flat), engine.params)
    if not bool(torch.isfinite(flat).all()):  # identical on every rank: all raise together
        raise SingularGramError("the combined distributed step is not finite; increase alpha; no parameter was changed")
    loss = (table[:, 1].sum() / table[:, 2].sum()).to(step.residuals.dtype)  # same order on every rank
    return replace(step, direction=direction), loss


def _empty_step(params: Sequence[Tensor], alpha: float | None) -> GramGaussNewtonStep:
    """The own step of a rank whose closure returned no sample: no residual, a zero direction
    (its weight ``b_p / B`` in the combined step is 0 anyway)."""
    dtype, device = params_dtype(params), params[0].device
    return GramGaussNewtonStep(
        direction=[torch.zeros_like(p) for p in params],
        residuals=torch.zeros(0, 1, dtype=dtype, device=device),
        gram=None,
        coefficients=None,
        solve_info=SolveInfo("none"),
        predicted=torch.zeros(0, dtype=dtype, device=device),
        alpha=alpha,
    )
