"""The engine interface: what an optimizer needs from a per-sample Jacobian.

An engine runs the user's closure (the forward pass on a mini-batch, returning per-sample
residuals) and returns a :class:`GramSystem`: the residuals, the Gram matrix ``G = J J^T`` and a
way to multiply ``J^T`` by a vector, without the optimizer knowing how ``J`` was obtained.

Row convention (shared by every engine): the residuals ``(b, k)`` are flattened sample-major,
so row ``i * k + c`` of ``J`` and of ``G`` belongs to sample ``i``, output ``c``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

Closure = Callable[[], Tensor]


@dataclass(frozen=True)
class GramSystem:
    """The linear-algebra view of one mini-batch.

    Attributes:
        residuals: ``(b, k)`` detached residuals ``f(w, x_i) - y_i``.
        gram: ``(b*k, b*k)`` Gram matrix ``J J^T``, rows sample-major.
        jt_times: maps ``v`` of shape ``(b*k,)`` to ``J^T v`` as one tensor per parameter,
            shaped like the parameter (zeros for parameters the outputs do not depend on).
        jacobian_columns: ``(start, stop) -> J[:, start:stop]`` of shape ``(b*k, stop - start)``,
            the columns of the flat parameter vector (parameters flattened and concatenated in
            ``engine.params`` order); materialises only the parameters overlapping the range.
            ``None`` for an engine that cannot materialise ``J`` (data-parallel exact mode
            needs it, see :mod:`gramnewton.distributed`).
    """

    residuals: Tensor
    gram: Tensor
    jt_times: Callable[[Tensor], list[Tensor]]
    jacobian_columns: Callable[[int, int], Tensor] | None = None


class GramEngine(Protocol):
    """Computes a :class:`GramSystem` for a fixed list of parameters."""

    params: Sequence[Tensor]

    def compute(self, closure: Closure) -> GramSystem:
        """Run ``closure`` once and return the Gram system of its residuals."""
        ...


def slice_columns(block: Callable[[int], Tensor], sizes: Sequence[int], rows: Tensor, start: int, stop: int) -> Tensor:
    """Columns ``start:stop`` of the ``(n, sum(sizes))`` matrix whose column blocks are ``block(i)``.

    Args:
        block: ``i -> (n, sizes[i])``, called only for the blocks overlapping the range.
        sizes: the width of each block (a parameter's ``numel``).
        rows: any ``(n, ...)`` tensor giving ``n``, the dtype and the device of an empty result.
        start, stop: ``0 <= start <= stop <= sum(sizes)``.

    Returns:
        ``(n, stop - start)``.
    """
    parts, offset = [], 0
    for i, size in enumerate(sizes):
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            parts.append(block(i)[:, lo - offset : hi - offset])
        offset += size
    if not parts:
        return rows.new_zeros(rows.shape[0], 0)
    return torch.cat(parts, dim=1)


def residuals_2d(residuals: Tensor) -> Tensor:
    """Validate a closure's return value and view it as ``(b, k)``.

    Raises:
        TypeError: not a tensor.
        ValueError: wrong shape, no batch, or a non-finite entry.
    """
    if not isinstance(residuals, Tensor):
        raise TypeError(f"closure must return a tensor of per-sample residuals, got {type(residuals).__name__}")
    if residuals.dim() not in (1, 2):
        raise ValueError(
            "closure must return unreduced per-sample residuals of shape (b,) or (b, k), "
            f"got shape {tuple(residuals.shape)}"
        )
    if residuals.numel() == 0:
        raise ValueError(f"closure returned an empty residual tensor of shape {tuple(residuals.shape)}")
    if not residuals.is_floating_point():
        raise TypeError(f"residuals must be floating point, got {residuals.dtype}")
    bad = ~torch.isfinite(residuals.detach())
    if bool(bad.any()):
        count = int(bad.sum())
        raise ValueError(
            f"{count} of {residuals.numel()} residuals are NaN or Inf (check the targets and the "
            "model's outputs); no parameter was changed"
        )
    if not residuals.requires_grad:
        raise ValueError(
            "residuals do not depend on any parameter being optimized (requires_grad is False); "
            "run the forward pass inside the closure"
        )
    return residuals if residuals.dim() == 2 else residuals.unsqueeze(1)
