r"""Data-parallel Gram-Gauss-Newton on ``torch.distributed`` (one process per device, ``torchrun``).

Every rank's closure returns the residuals ``r_p`` of shape ``(b_p, k)`` of its own shard. The
union batch is the shards in rank order, ``B = sum_p b_p`` samples; ``J_p`` is shard ``p``'s
per-sample Jacobian ``(b_p*k, m)`` and ``J = [J_0; ...; J_{P-1}]``. Volumes below are per rank per
step, in tensor entries, ``q = (P-1)/P``; DDP's gradient all-reduce moves ``2*q*m`` (ring).

Exact mode: the single-process step on the union batch, to round-off
--------------------------------------------------------------------
The flat parameter vector (``m`` entries, parameters in ``engine.params`` order) is cut into ``P``
contiguous column ranges ``S_r`` of ``m/P`` entries; rank ``r`` owns ``S_r``. One step:

1. status: all-gather of ``(failed, b_p, k)`` (``P`` numbers): if any rank failed, every rank
   raises before anything is applied (see "Errors").
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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .engines import Closure, GramEngine, GramSystem
from .engines.reference import flatten, split_like
from .solve import NonFiniteError, SingularGramError
from .update import GramGaussNewtonStep, gram_gauss_newton_direction

MODES = ("auto", "exact", "local")

# exception types re-raised as themselves on the ranks that did not fail
_PORTABLE: dict[str, type[Exception]] = {
    e.__name__: e for e in (ValueError, TypeError, NonFiniteError, SingularGramError)
}


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

    def _count(self, kind: str, nbytes: float) -> None:
        self.sent_bytes[kind] += int(nbytes)

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values (in place)."""
        for t in tensors:
            dist.broadcast(t.data, group_src=0, group=self.group)
            self._count("broadcast", t.numel() * t.element_size() * (self.rank == 0) * (self.world - 1))

    def agree(self, error: Exception | None, values: Sequence[float]) -> Tensor:
        """Exchange ``(failed, *values)`` between all ranks; raise on every rank if any failed.

        Returns:
            ``(P, len(values))`` float64 table, row ``p`` = rank ``p``'s ``values``.
        """
        mine = torch.tensor([float(error is not None), *values], dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(rows, mine, group=self.group)
        self._count("status", mine.numel() * 8 * (self.world - 1))
        table = torch.stack(rows)
        failed = [p for p in range(self.world) if table[p, 0] != 0]
        if failed:
            self._raise_everywhere(error, failed[0])
        return table[:, 1:]

    def _raise_everywhere(self, error: Exception | None, first: int) -> None:
        messages: list[tuple[str, str] | None] = [None] * self.world
        dist.all_gather_object(
            messages, None if error is None else (type(error).__name__, str(error)), group=self.group
        )
        if error is not None:
            raise error
        name, text = messages[first]
        raise _PORTABLE.get(name, RuntimeError)(
            f"rank {first} of {self.world} failed, no parameter was changed on any rank ({name}: {text})"
        )

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
        table = self.agree(error, [0.0] if error else [float(value.shape[0])])
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
        return self.agree(error, values).sum(0)

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
        shape, send, error = (0, 0), None, None
        try:
            # the union's Gram is formed below from J's column slices: the shard's own would be discarded
            if getattr(self.engine, "can_skip_gram", False):
                local = self.engine.compute(closure, form_gram=lambda rows: False)
            else:
                local = self.engine.compute(closure)
            if local.jacobian_columns is None:
                raise TypeError(f"{type(self.engine).__name__} cannot materialise J, which distributed='exact' needs")
            shape = tuple(local.residuals.shape)
            send = torch.cat([local.jacobian_columns(a, b).reshape(-1) for a, b in bounds])
        except Exception as caught:  # reported to every rank by agree() before any other collective
            error = caught
        table = comm.agree(error, shape)
        rows, ks = [int(n) for n in table[:, 0]], {int(k) for k in table[:, 1]}
        if len(ks) != 1:
            raise ValueError(
                f"the ranks' residuals have different numbers of outputs {sorted(ks)}; no parameter was changed"
            )
        k = ks.pop()
        residuals = comm.all_gather_rows(local.residuals, rows)
        received = comm.all_to_all(send, [shape[0] * k * (b - a) for a, b in bounds], [n * k * (hi - lo) for n in rows])
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
        losses: the step's per-sample (or per-entry) losses, whose mean over the union batch
            is returned (e.g. the squared residuals).
        options: :func:`~gramnewton.update.gram_gauss_newton_direction`'s keywords (``lam``,
            ``alpha``, ``solve_dtype``, ``momentum`` with ``previous``, ``solve_space``). With
            momentum every rank holds the same ``phi_{t-1}``, so the combined step is
            ``phi_t = mu phi_{t-1} + sum_p (b_p / B) J_p^T c_p``.

    Returns:
        The rank's own step (its ``residuals``, ``gram`` and ``coefficients`` are this rank's)
        with ``direction`` replaced by the combined one, and the mean loss over the union batch.
    """
    step, error, stats = None, None, (0.0, 0.0, 0.0)
    try:
        step = gram_gauss_newton_direction(engine, closure, **options)
        values = losses(step).detach().double()
        stats = (float(step.residuals.shape[0]), float(values.sum()), float(values.numel()))
    except Exception as caught:  # reported to every rank by agree() before the all-reduce
        error = caught
    table = comm.agree(error, stats)
    weight = table[comm.rank, 0] / table[:, 0].sum()
    flat = torch.cat([d.reshape(-1) for d in step.direction]) * weight.to(step.direction[0].dtype)
    direction = split_like(comm.all_reduce_(flat), engine.params)
    if not bool(torch.isfinite(flat).all()):  # identical on every rank: all raise together
        raise SingularGramError("the combined distributed step is not finite; increase alpha; no parameter was changed")
    loss = (table[:, 1].sum() / table[:, 2].sum()).to(step.residuals.dtype)  # same order on every rank
    return replace(step, direction=direction), loss
