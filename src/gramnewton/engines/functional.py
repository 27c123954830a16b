"""Functional engine: exact per-sample Jacobians of any per-sample residual function by ``torch.func``.

A residual that contains derivatives of the network with respect to its inputs (a Laplacian, a
time derivative: physics-informed residuals) is out of reach of the hooks engine, and the
reference engine pays ``b`` backward passes through the whole batch for it. When the residual is
given as a *function of one sample*, ``r_i = fn(w, x_i)``, the rows of ``J`` are per-sample
gradients: ``J = vmap(jacrev(fn))(w, x)``, one vectorised reverse pass over the samples, in chunks
of ``chunk_size`` samples so that memory stays bounded. The first chunk gives the number of
residuals per sample, so the size of ``J`` (and of the Gram matrix) is checked against the
device's memory before any other chunk is formed. The input derivatives inside ``fn`` are
``torch.func`` transforms too (``jacrev``, ``hessian``, ``jvp``; see :mod:`gramnewton.pinn`), so
they compose exactly.

The closure is a :class:`FunctionalResidual`: several :class:`Term` s (e.g. interior and boundary
points), each a per-sample function, its inputs (dimension 0 is the sample) and a weight. Called
like any closure it returns the weighted residuals, so every other engine (and adaptive damping)
accepts it as well; this engine reads its structure instead of running it.

Rows (sample-major, shared by every engine): the terms' samples in order, ``k`` outputs each.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from ..solve import NonFiniteError
from .base import Closure, GramSystem, check_fits
from .reference import ReferenceEngine, flatten, split_like

PerSample = Callable[..., Tensor]


@dataclass(frozen=True)
class Term:
    """One block of residual rows: ``weight * fn(params, *sample)`` for every sample of ``inputs``.

    Attributes:
        fn: ``fn(params, *sample) -> ()`` or ``(k,)``; ``params`` maps names to tensors and each
            of ``sample`` is one row of ``inputs`` (dimension 0 removed). Must use ``torch.func``
            (not ``torch.autograd.grad``) for derivatives with respect to the sample.
        inputs: tensors with the samples along dimension 0 (all the same length ``n``).
        weight: multiplies the term's residuals (and so its rows of ``J``), e.g. ``1/sqrt(n)``.
    """

    fn: PerSample
    inputs: tuple[Tensor, ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("a Term needs at least one input tensor (the samples along dimension 0)")
        sizes = {t.shape[0] if t.dim() else None for t in self.inputs}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise ValueError(f"a Term's inputs must share a non-empty dimension 0, got sizes {sorted(map(str, sizes))}")
        if not torch.isfinite(torch.tensor(float(self.weight))):
            raise ValueError(f"a Term's weight must be finite, got {self.weight}")

    def __len__(self) -> int:
        return self.inputs[0].shape[0]


class FunctionalResidual:
    """A closure with per-sample structure: the rows of every :class:`Term`, concatenated.

    Args:
        params: names -> the trainable tensors, e.g. ``dict(model.named_parameters())``; the
            terms' functions receive this mapping (with the current values).
        terms: the residual blocks, in row order.

    Calling it returns the ``(b,)`` or ``(b, k)`` weighted residuals with a graph to ``params``.
    """

    def __init__(self, params: Mapping[str, Tensor], *terms: Term):
        if not terms:
            raise ValueError("FunctionalResidual needs at least one Term")
        self.params = dict(params)
        self.terms = terms

    def __call__(self) -> Tensor:
        return torch.cat(
            [t.weight * vmap(t.fn, in_dims=(None, *[0] * len(t.inputs)))(self.params, *t.inputs) for t in self.terms]
        )


class FunctionalEngine:
    """Exact Gram system of a :class:`FunctionalResidual` by ``vmap(jacrev(fn))``, in chunks.

    Args:
        params: the parameters to differentiate; each must appear (by identity) among the
            closure's ``params`` values, else the step is refused (a term's function may still
            reach a missing one, e.g. ``functional_call`` falls back to the module's own tensors,
            and its columns of ``J`` could not be formed).
        chunk_size: samples per vectorised Jacobian (bounds the memory of the per-sample
            intermediates); ``None``: each term at once.

    A closure that is not a :class:`FunctionalResidual` goes to the reference engine (exact,
    slower), with a one-time warning.
    """

    def __init__(self, params: Iterable[Tensor], chunk_size: int | None = 512):
        self.params: list[Tensor] = list(params)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.chunk_size = chunk_size
        self._fallback: ReferenceEngine | None = None

    can_skip_gram = True  # compute(closure, form_gram=...) is understood

    def compute(self, closure: Closure, *, form_gram: Callable[[int], bool] | None = None) -> GramSystem:
        """Residuals ``(b, k)``, Gram ``J J^T`` ``(b*k, b*k)`` and ``v -> J^T v``; ``form_gram`` as
        in :meth:`ReferenceEngine.compute` (``False``: no Gram, for a parameter-space solve).

        Raises:
            ValueError: a trained parameter missing from the closure's; terms of different numbers
                of outputs; a ``J`` or Gram matrix larger than the device's memory
                (:func:`~.base.check_fits`, once the first chunk gives the outputs per sample:
                before any other chunk is formed). Nothing was changed.
        """
        if not isinstance(closure, FunctionalResidual):
            if self._fallback is None:
                warnings.warn(
                    "FunctionalEngine got a plain closure; it uses the reference engine (exact, slower). "
                    "Pass a gramnewton.engines.FunctionalResidual for the fast path.",
                    stacklevel=3,
                )
                self._fallback = ReferenceEngine(self.params)
            return self._fallback.compute(closure, form_gram=form_gram)
        names = _names_of(self.params, closure.params)
        missing = [tuple(p.shape) for p, name in zip(self.params, names) if name is None]
        if missing:
            raise ValueError(
                f"FunctionalEngine: {len(missing)} trained parameter(s) of shapes {missing} are not among the "
                "FunctionalResidual's params (compared by identity), so their columns of J cannot be formed; "
                "pass every trained parameter, e.g. dict(model.named_parameters()), or freeze the others "
                "(requires_grad=False); no parameter was changed"
            )
        blocks: list[tuple[Tensor, Tensor]] = []  # (values, rows of J) per chunk of samples, in row order
        form = True
        for term in closure.terms:
            size = self.chunk_size or len(term)
            for start in range(0, len(term), size):
                values, rows = self._chunk_jacobian(term, closure.params, names, start, start + size)
                if not blocks:  # the outputs per sample are known: the sizes of J and G are
                    shape = (sum(len(t) for t in closure.terms), values.shape[1])
                    whole = values.new_empty(()).expand(shape)  # the residuals' shape, dtype and device
                    check_fits((whole.numel(), sum(p.numel() for p in self.params)), whole, "dense Jacobian")
                    form = form_gram is None or form_gram(whole.numel())
                    if form:
                        check_fits((whole.numel(), whole.numel()), whole, "Gram matrix")
                elif values.shape[1] != blocks[0][0].shape[1]:
                    raise ValueError(
                        "every Term must return the same number of outputs, got "
                        f"{blocks[0][0].shape[1]} and {values.shape[1]}"
                    )
                blocks.append((values, rows))
        residuals = torch.cat([r for r, _ in blocks])
        bad = ~torch.isfinite(residuals)
        if bool(bad.any()):
            raise NonFiniteError(
                f"{int(bad.sum())} of {residuals.numel()} residuals are NaN or Inf (check the terms' functions "
                "and inputs); no parameter was changed"
            )
        jac = torch.cat([j for _, j in blocks])
        gram = jac @ jac.T if form else None

        def jt_times(v: Tensor) -> list[Tensor]:
            flat = jac.T @ v.to(jac.dtype)
            return split_like(flat, self.params)

        def j_times(v: Sequence[Tensor]) -> Tensor:
            return jac @ flatten(v, jac.dtype)

        def jacobian_columns(start: int, stop: int) -> Tensor:
            return jac[:, start:stop]

        return GramSystem(
            residuals=residuals, gram=gram, jt_times=jt_times, j_times=j_times, jacobian_columns=jacobian_columns
        )

    def _chunk_jacobian(
        self, term: Term, params: dict[str, Tensor], names: list[str], start: int, stop: int
    ) -> tuple[Tensor, Tensor]:
        """``(c, k)`` residuals and ``(c*k, m)`` Jacobian rows of samples ``start:stop`` of one term
        (``c`` of them; weight applied)."""
        # every name the closure gives a trained tensor under (an alias too: a dict of
        # named_parameters(remove_duplicate=False) names a shared layer's weight twice) gets the
        # same differentiated tensor; a detached alias would drop that path from J, silently
        trained = {id(params[n]): n for n in names}
        aliases = {n: trained[id(p)] for n, p in params.items() if id(p) in trained}
        fixed = {n: p.detach() for n, p in params.items() if n not in aliases}
        free = {n: params[n].detach() for n in set(names)}

        def one(free: dict[str, Tensor], *sample: Tensor) -> tuple[Tensor, Tensor]:
            r = term.fn({**fixed, **{n: free[c] for n, c in aliases.items()}}, *sample).reshape(-1)
            return r, r

        in_dims = (None, *[0] * len(term.inputs))
        jac, values = vmap(jacrev(one, has_aux=True), in_dims=in_dims)(
            free, *[t[start:stop].detach() for t in term.inputs]
        )
        n, k = values.shape
        columns = [jac[name].reshape(n * k, -1) for name in names]
        return term.weight * values, term.weight * torch.cat(columns, dim=1)


def _names_of(params: list[Tensor], named: Mapping[str, Tensor]) -> list[str | None]:
    """The closure's name of each engine parameter (by identity), ``None`` where it has none."""
    by_id = {id(p): n for n, p in named.items()}
    return [by_id.get(id(p)) for p in params]
