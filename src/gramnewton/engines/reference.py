"""Reference engine: exact per-sample Jacobians for any differentiable model.

It materialises ``J`` of shape ``(b*k, m)`` with batched vector-Jacobian products
(``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the backward pass),
falling back to one backward pass per row when an operation has no batching rule. It is slow and
memory-hungry on purpose: it is the ground truth that faster engines are checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .base import Closure, GramSystem, check_fits, params_dtype, residuals_2d


def jacobian_rows(outputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Jacobian of the flattened ``outputs`` w.r.t. ``params``.

    Args:
        outputs: any shape, ``n`` entries in total, part of an autograd graph.
        params: the ``m`` parameters, in the order their columns appear.

    Returns:
        ``(n, m_total)`` tensor; row ``r`` is the gradient of ``outputs.reshape(-1)[r]``.
        Parameters that ``outputs`` does not depend on get zero columns.
    """
    flat = outputs.reshape(-1)
    n = flat.numel()
    eye = torch.eye(n, dtype=flat.dtype, device=flat.device)
    try:
        grads = torch.autograd.grad(
            flat, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True, retain_graph=True
        )
    except RuntimeError:
        # Some operations have no vmap rule for their backward: one row at a time is always exact.
        rows = [torch.autograd.grad(flat[r], params, allow_unused=True, retain_graph=True) for r in range(n)]
        grads = tuple(
            None
            if all(row[j] is None for row in rows)
            else torch.stack([torch.zeros_like(p) if row[j] is None else _dense(row[j]) for row in rows])
            for j, p in enumerate(params)
        )
    columns = [
        torch.zeros(n, p.numel(), dtype=flat.dtype, device=flat.device) if g is None else _dense(g).reshape(n, -1)
        for g, p in zip(grads, params)
    ]
    return torch.cat(columns, dim=1)


def _dense(grad: Tensor) -> Tensor:
    """A gradient as a strided tensor: ``nn.Embedding(sparse=True)``'s weight gradients are sparse."""
    return grad.to_dense() if grad.is_sparse else grad


def split_like(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a ``(m_total,)`` vector into tensors shaped like ``params``."""
    sizes = [p.numel() for p in params]
    return [chunk.view_as(p) for chunk, p in zip(torch.split(flat, sizes), params)]


def flatten(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """One ``(m_total,)`` vector of ``tensors`` in order (the inverse of :func:`split_like`)."""
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


class ReferenceEngine:
    """Exact Gram system through a dense per-sample Jacobian ``J`` of shape ``(b*k, m)``.

    Correct for any model whose residuals are differentiable in ``params``, including models
    that couple samples (the Jacobian is then the true one of the coupled outputs).
    """

    def __init__(self, params: Iterable[Tensor]):
        self.params: list[Tensor] = list(params)

    can_skip_gram = True  # compute(closure, form_gram=...) is understood

    def compute(self, closure: Closure, *, form_gram: Callable[[int], bool] | None = None) -> GramSystem:
        """Residuals ``(b, k)``, the dense ``J`` ``(b*k, m)`` and the Gram ``J J^T``; ``form_gram``,
        when given, is called with ``b*k`` and ``False`` leaves the Gram out (``gram`` is ``None``:
        a parameter-space solve needs only ``J``, and ``J J^T`` costs ``(b*k)^2 m``)."""
        with torch.enable_grad():  # also the rows' differentiation, under the caller's no_grad
            # the parameters' dtype now, not when the engine was built (a model cast afterwards)
            residuals = residuals_2d(closure(), params_dtype(self.params))
            rows = residuals.numel()
            check_fits((rows, sum(p.numel() for p in self.params)), residuals, "dense Jacobian")
            form = form_gram is None or form_gram(rows)
            if form:
                check_fits((rows, rows), residuals, "Gram matrix")
            jac = jacobian_rows(residuals, self.params).detach()
        gram = jac @ jac.T if form else None

        def jt_times(v: Tensor) -> list[Tensor]:
            return split_like(jac.T @ v.to(jac.dtype), self.params)

        def j_times(v: Sequence[Tensor]) -> Tensor:
            return jac @ flatten(v, jac.dtype)

        def jacobian_columns(start: int, stop: int) -> Tensor:
            return jac[:, start:stop]

        return GramSystem(
            residuals=residuals.detach(),
            gram=gram,
            jt_times=jt_times,
            j_times=j_times,
            jacobian_columns=jacobian_columns,
            jacobian=jac,
        )
