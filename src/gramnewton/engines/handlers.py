"""Per-layer handlers for the hooks engine: one module's per-sample Jacobian from saved factors.

Index conventions (BackPACK-style, stated once for every handler):
    ``n`` rows, one per (sample, output) pair, sample-major (row ``i * k + c``);
    ``a``: the module's input for those rows, ``(n, ...)`` (an input shared by the ``k`` rows of
    one sample is repeated); ``g``: the gradient of output ``c`` of sample ``i`` with respect to
    the module's output, shaped like the output, ``(n, ...)``.
A handler returns, for each requested parameter name, a :class:`Piece`: either the materialised
per-sample gradients (:class:`Dense`, ``(n, numel)``; :class:`PermutedDense` when their columns
come out in another order) or the factors of a Linear/Conv weight (:class:`Factored`) whose Gram
matrix is ``(A A^T) * (G G^T)`` summed over positions. A bias beside a factored weight adds
its Gram part through the weight's factors (``(A A^T + 1) * (G G^T)``, :class:`FoldedBias`).

Which form a weight gets is decided by :func:`factored_is_cheaper`, a multiply-add count; a
convolution on small maps (a 3x3 convolution at 2x2) takes its factorised ``A A^T`` from the inner
products of its input's positions instead of its patches (:class:`InputOverlap`, chosen by
:func:`overlap_is_cheaper`). How a
2-d convolution's per-sample weight gradients are computed (one grouped convolution, patches
and a batched GEMM, or for few input channels one correlation per channel) is chosen per layer
shape by timing the candidates (:class:`.choice.MeasuredChoice`).

Pieces add their Gram part with ``add_gram_lower``: everything but the upper-right block
``G[:h, h:]`` (``h = n // 2``) is guaranteed (a symmetric rank-k update, :func:`add_gram_lower`);
the engine mirrors the lower-left block into it once at the end (:func:`mirror_lower`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ..nn import ScalarBias, ScalarScale
from . import workspace as ws
from .choice import MeasuredChoice

# Measured on the 2-core CPU (docs/design.md, "Cost model"): im2col by the channels-last patch view
# (:func:`_patch_view`) costs 0.46-1.48 convolutions of the same shapes (median 0.86; b 32 and 128,
# 3-64 channels, 2x2 to 14x14), so it is charged one convolution's multiply-adds. (``F.unfold``, used before,
# took ~6 ms at any small size: 5-16 convolutions.)
UNFOLD_PENALTY = 1.0
# The factorised Gram builds an ``(n*S, n*S)`` matrix; above this many entries it is not used.
MAX_FACTORED_ENTRIES = 1 << 24
# The symmetric update (two half-size products, 3/4 of the multiply-adds) only from this many
# rows and ``SYRK_MIN_MULTIPLY_ADDS`` multiply-adds of the full product ``n^2 numel`` up: below,
# the second product's call and the blocks' views cost more than the quarter they save. Measured
# on the 2-core CPU (float32, 2 threads, OMP_WAIT_POLICY=PASSIVE; benchmarks/kernels.py,
# docs/performance.md, twenty-fifth session): the halves took 4-6x the full product's time at
# 2^14-2^16 multiply-adds, 1.4-2x at 2^20-2^22, 0.97-1.09x at 2^24, 0.94x at 2^25.2 (128 rows of
# a 16-channel 3x3 convolution's gradients) and 0.81-0.93x from 2^26.
SYRK_MIN_ROWS = 32
SYRK_MIN_MULTIPLY_ADDS = 1 << 25


def halves_pay(n: int, numel: int) -> bool:
    """Whether ``gram += jac jac^T`` for ``jac`` ``(n, numel)`` is done as the symmetric update's
    two half-size products (:func:`add_gram_lower`) rather than one full product."""
    return n >= SYRK_MIN_ROWS and n * n * numel >= SYRK_MIN_MULTIPLY_ADDS


def lower_blocks(n: int) -> tuple[tuple[slice, slice], ...]:
    """The blocks of an ``(n, n)`` Gram matrix that the symmetric update sets: ``G[:h, :h]`` and
    the bottom block row ``G[h:, :]`` (``h = n // 2``), as ``(rows, columns)`` index pairs."""
    h = n // 2
    return ((slice(None, h), slice(None, h)), (slice(h, None), slice(None)))


def add_gram_lower(gram: Tensor, jac: Tensor, *, overwrite: bool = False) -> None:
    """Symmetric rank-k update: ``gram += jac jac^T`` except, where it pays, the upper-right block
    ``G[:h, h:]``.

    ``gram`` is ``(n, n)``, ``jac`` ``(n, numel)``, ``h = n // 2``. Where :func:`halves_pay`, the
    rows are split in halves ``[J1; J2]``: ``G[:h, :h] += J1 J1^T`` and ``G[h:, :] += J2 J^T``
    (the bottom block row, its diagonal block included), 3/4 of the multiply-adds of ``J J^T``;
    the upper-right block is not updated: :func:`mirror_lower` copies it from the lower-left one
    once every piece is added. Otherwise the whole product is added (the mirror then copies
    equal values). ``overwrite``: ``gram``'s blocks are set to the products instead (their old
    contents, e.g. an uninitialised buffer's, are not read; the upper-right block is left as it
    is when the halves are taken).
    """
    beta = 0.0 if overwrite else 1.0  # addmm_ with beta 0 ignores the old values, NaN included
    if not halves_pay(*jac.shape):
        gram.addmm_(jac, jac.T, beta=beta)  # no block views: their indexing costs a small product's time
        return
    for rows, cols in lower_blocks(jac.shape[0]):
        gram[rows, cols].addmm_(jac[rows], jac[cols].T, beta=beta)


def mirror_lower(gram: Tensor) -> None:
    """Make ``gram`` ``(n, n)`` symmetric after :func:`add_gram_lower` updates (in place):
    ``G[:h, h:] = G[h:, :h]^T`` with ``h = n // 2``, the only block those updates leave out (one
    copy of ``n^2 / 4`` entries; its diagonal blocks are full products, symmetric already).
    Below ``SYRK_MIN_ROWS`` rows no update leaves the block out: nothing is copied (the copy,
    with its two views, took 14 us at ``n = 8``: more than a small layer's two Gram products)."""
    if gram.shape[0] < SYRK_MIN_ROWS:
        return
    h = gram.shape[0] // 2
    gram[:h, h:].copy_(gram[h:, :h].mT)


@dataclass
class Dense:
    """Materialised per-sample gradients of one parameter, ``jac`` of shape ``(n, numel)``."""

    jac: Tensor

    def add_gram_lower(self, gram: Tensor) -> None:
        """``gram += jac jac^T`` (``(n, n)``) but its upper-right block (:func:`add_gram_lower`)."""
        add_gram_lower(gram, self.jac)

    def jt_times(self, v: Tensor) -> Tensor:
        """``jac^T v`` for ``v`` of shape ``(n,)``; returns ``(numel,)``."""
        return self.jac.T @ v

    def j_times(self, v: Tensor) -> Tensor:
        """``jac v`` for ``v`` of shape ``(numel,)``; returns ``(n,)``."""
        return self.jac @ v

    def dense(self) -> Dense:
        return self


@dataclass
class FoldedBias(Dense):
    """The per-sample gradients of a Linear/Conv bias whose Gram part its weight's
    :class:`Factored` piece adds (``with_bias``); ``add_gram_lower`` adds nothing.

    Attributes:
        weight: that weight's piece (a handler may return several such pairs, e.g. an LSTM's
            ``ih`` and ``hh`` projections: a Gram weighted per parameter unfolds each pair by it).
    """

    weight: Factored | None = field(default=None, repr=False, compare=False)

    def add_gram_lower(self, gram: Tensor) -> None:
        """Nothing: the weight's factors add this bias's part (:meth:`Factored.add_gram_lower`)."""


@dataclass
class UsedRows:
    """Per-sample gradients of a parameter of which a batch touches some rows only: an
    embedding table ``(vocab, dim)`` whose ``u`` used rows are ``rows``. ``jac`` ``(n, u * dim)``
    holds the gradients of those rows, in that order; the table's other rows have zero gradient
    in every sample, so the Gram part, ``J^T v`` and ``J v`` need ``u`` rows, not ``vocab`` (an
    embedding of 30,000 tokens at ``b = 128``, 16 tokens a sample: at most 2,048 rows).

    Attributes:
        jac: ``(n, u * dim)``.
        rows: ``(u,)`` distinct row indices of the parameter, increasing.
        shape: the parameter's ``(vocab, dim)``.
    """

    jac: Tensor
    rows: Tensor
    shape: tuple[int, int]

    def add_gram_lower(self, gram: Tensor) -> None:
        """``gram += jac jac^T`` (the unused rows add nothing) but its upper-right block."""
        add_gram_lower(gram, self.jac)

    def jt_times(self, v: Tensor) -> Tensor:
        """``(vocab * dim,)``: ``jac^T v`` in the used rows, zero in the others."""
        out = self.jac.new_zeros(self.shape)
        out.index_copy_(0, self.rows, (self.jac.T @ v).view(-1, self.shape[1]))
        return out.reshape(-1)

    def j_times(self, v: Tensor) -> Tensor:
        """``(n,)`` for ``v`` ``(vocab * dim,)``: only its used rows count."""
        return self.jac @ v.view(self.shape)[self.rows].reshape(-1)

    def dense(self) -> Dense:
        """``(n, vocab * dim)``, the unused rows' columns zero."""
        n = self.jac.shape[0]
        full = self.jac.new_zeros(n, *self.shape)
        full[:, self.rows] = self.jac.view(n, -1, self.shape[1])
        return Dense(full.reshape(n, -1))


@dataclass
class TokenRows:
    """An embedding's per-sample gradients as their factors: sample ``i``'s row is
    ``sum_s e_{x_is} g_is^T`` (the table's row ``x_is`` gets ``g_is``) over its ``T`` tokens. As a
    Linear layer on one-hot inputs (:class:`Factored`), whose inputs' inner products are token
    equalities, the Gram part is ``sum_{s,t} [x_is = x_jt] g_is . g_jt``, summed token by token over
    the samples that share it (:meth:`add_gram_lower`): at most ``(nT)^2 dim`` multiply-adds
    against :class:`UsedRows`' ``n^2 u dim`` (the handler takes it when the batch uses more than
    ``T^2`` distinct tokens, the bound of the masked ``(nT, nT)`` product it first used).

    Attributes:
        tokens: ``(n, T)`` row indices of the table.
        g: ``(n, T, dim)`` output gradients at the tokens (zero at the padding token).
        shape: the table's ``(vocab, dim)``.
    """

    tokens: Tensor
    g: Tensor
    shape: tuple[int, int]

    def add_gram_lower(self, gram: Tensor) -> None:
        """``gram += sum_{s,t} [x_is = x_jt] g_is . g_jt`` (the whole matrix), token by token: with
        ``u_i(x)`` sample ``i``'s gradients summed over its positions holding token ``x``, ``G_ij +=
        sum_x u_i(x) . u_j(x)``, one product per pair of samples that share a token. That is
        ``sum_x r_x^2 dim`` multiply-adds (``r_x`` samples hold token ``x``) against ``(nT)^2 dim``
        for the ``(nT, nT)`` product masked by token equality that it replaces (the text
        embedding of ``benchmarks/user_models.py``, docs/performance.md, twenty-fourth session)."""
        n, positions, dim = self.g.shape
        tokens = self.tokens.reshape(-1)
        sample = torch.arange(n, device=tokens.device).repeat_interleave(positions)
        # one row per distinct (token, sample), sorted by token: that sample's gradients there, summed
        keys, inverse = torch.unique(tokens * n + sample, return_inverse=True)
        rows = self.g.new_zeros(keys.numel(), dim).index_add_(0, inverse, self.g.reshape(-1, dim))
        owner = keys % n
        sizes = torch.unique_consecutive(keys // n, return_counts=True)[1]  # rows per token
        # every ordered pair (p, q) of rows of one token: p repeated once per row of its token
        size = sizes.repeat_interleave(sizes)  # each row's token's row count
        first = (sizes.cumsum(0) - sizes).repeat_interleave(sizes)  # each row's token's first row
        p = torch.arange(keys.numel(), device=tokens.device).repeat_interleave(size)
        q = first[p] + torch.arange(p.numel(), device=tokens.device) - (size.cumsum(0) - size)[p]
        chunk = max(1, (1 << 22) // dim)  # a bounded (chunk, dim) product at a time
        for start in range(0, p.numel(), chunk):
            i, j = p[start : start + chunk], q[start : start + chunk]
            gram.index_put_((owner[i], owner[j]), (rows[i] * rows[j]).sum(1), accumulate=True)

    def jt_times(self, v: Tensor) -> Tensor:
        """``(vocab * dim,)``: ``sum_i v_i sum_s e_{x_is} g_is^T``."""
        n, _, dim = self.g.shape
        out = self.g.new_zeros(self.shape)
        out.index_add_(0, self.tokens.reshape(-1), (self.g * v.view(n, 1, 1)).reshape(-1, dim))
        return out.reshape(-1)

    def j_times(self, v: Tensor) -> Tensor:
        """``(n,)``: ``sum_s g_is . V[x_is]`` for ``v`` ``(vocab * dim,)``."""
        return (self.g * v.view(self.shape)[self.tokens]).sum((1, 2))

    def dense(self) -> Dense:
        """``(n, vocab * dim)``."""
        n, positions, dim = self.g.shape
        vocab = self.shape[0]
        index = self.tokens + torch.arange(n, device=self.tokens.device).unsqueeze(1) * vocab
        full = self.g.new_zeros(n * vocab, dim)
        full.index_add_(0, index.reshape(-1), self.g.reshape(-1, dim))
        return Dense(full.view(n, vocab * dim))


def _square_scratch(slot: str, gram: Tensor) -> Tensor:
    """An uninitialised ``gram``-shaped buffer: the running engine's workspace scratch ``slot``
    (reused across steps), or a fresh one outside an engine."""
    work = ws.active()
    return torch.empty_like(gram) if work is None else work.scratch(slot, tuple(gram.shape), gram)


@dataclass
class Factored:
    """Per-sample weight gradients ``sum_s g_s a_s^T`` kept as their factors, per group.

    Attributes:
        a: ``(n, groups, S, kin)`` inputs (im2col patches for convolutions) at ``S`` positions.
        g: ``(n, groups, S, kout)`` output gradients at the same positions.
        in_shape, in_perm: when set, ``a``'s ``kin`` columns are laid out as ``in_shape`` (a conv's
            patches: ``(kh, kw, kin / (kh kw))``) and ``in_perm`` takes that to the parameter's
            ``kin`` layout (``(2, 0, 1)``); the Gram matrix does not depend on the column order.
        with_bias: the Gram part also counts the layer's bias (a :class:`FoldedBias` piece), whose
            per-sample gradients ``sum_s g_is`` (per group) are the weight's with an input of ones.
        overlap: when set, ``A A^T`` comes from the convolution's input positions
            (:class:`InputOverlap`) instead of from ``a``, which ``J^T v`` and ``J v`` still use.
    The parameter is laid out ``(groups * kout, kin)``, as Linear and Conv weights are.
    """

    a: Tensor
    g: Tensor
    in_shape: tuple[int, ...] | None = None
    in_perm: tuple[int, ...] | None = None
    with_bias: bool = False
    overlap: InputOverlap | None = None

    def _to_parameter(self, cols: Tensor) -> Tensor:
        """``(rows, kin)`` in ``a``'s column order -> the parameter's column order."""
        if self.in_perm is None:
            return cols
        rows = cols.shape[0]
        return cols.view(rows, *self.in_shape).permute(0, *(p + 1 for p in self.in_perm)).reshape(rows, -1)

    def _from_parameter(self, cols: Tensor) -> Tensor:
        """``(rows, kin)`` in the parameter's column order -> ``a``'s (the inverse of the above)."""
        if self.in_perm is None:
            return cols
        rows, shape = cols.shape[0], [self.in_shape[p] for p in self.in_perm]
        inverse = sorted(range(len(self.in_perm)), key=self.in_perm.__getitem__)
        return cols.reshape(rows, *shape).permute(0, *(p + 1 for p in inverse)).reshape(rows, -1)

    def add_gram_lower(self, gram: Tensor) -> None:
        """``gram[i, j] += sum_{group, s, s'} (a_is . a_js' + [with_bias]) (g_is . g_js')``.

        The bias term is the bias's Gram part: its per-sample gradients ``sum_s g_is`` have inner
        products ``sum_{s, s'} g_is . g_js'``, which the weight's ``G G^T`` holds already (an
        input column of ones, without copying ``a``). With one position the two products are
        full ones, or where :func:`halves_pay` (large ``n`` and widths) symmetric rank-k updates
        (:func:`add_gram_lower`) into two ``(n, n)`` scratch buffers of the engine's workspace
        (reused every step: at the full batch of 824 rows, zeroing fresh ones cost about a tenth
        of a step of an 8-96-96-1 MLP) with the upper-right block left to the mirror; with
        several the whole matrix is added, its ``A A^T`` from the input positions' inner products
        when ``overlap`` is set.
        """
        n, groups, positions, _ = self.a.shape
        for j in range(groups):
            if self.overlap is not None:
                gram.add_(self.overlap.gram_part(j, self.g[:, j], self.with_bias))
                continue
            a = self.a[:, j].reshape(n * positions, -1)
            g = self.g[:, j].reshape(n * positions, -1)
            if positions == 1 and not halves_pay(n, a.shape[1] + g.shape[1]):
                inputs = a @ a.T
                if self.with_bias:
                    inputs += 1.0
                gram.addcmul_(inputs, g @ g.T)
            elif positions == 1:
                inputs, outputs = _square_scratch("factored_inputs", gram), _square_scratch("factored_outputs", gram)
                add_gram_lower(inputs, a, overwrite=True)
                add_gram_lower(outputs, g, overwrite=True)
                for block in lower_blocks(n):  # only these blocks of both are set
                    if self.with_bias:
                        inputs[block] += 1.0
                    gram[block].addcmul_(inputs[block], outputs[block])
            else:
                inputs = a @ a.T  # rows and columns (sample, position)
                if self.with_bias:
                    inputs += 1.0
                # the sums over positions one axis at a time, the contiguous one last: summing the
                # (n, S, n, S) view over (1, 3) at once took 4-5x as long (0.35 against 0.08 ms at
                # n = 128, S = 4; docs/performance.md, twentieth session)
                products = inputs.mul_(g @ g.T).view(n, positions, n * positions).sum(1)
                gram.add_(products.view(n, n, positions).sum(2))

    def jt_times(self, v: Tensor) -> Tensor:
        """``sum_i v_i sum_s g_is a_is^T`` flattened, ``(groups * kout * kin,)``."""
        n, groups, positions, kin = self.a.shape
        kout = self.g.shape[3]
        # weight the smaller factor by v
        a, g = (self.a * v.view(n, 1, 1, 1), self.g) if kin <= kout else (self.a, self.g * v.view(n, 1, 1, 1))
        if groups == 1:
            a, g = a.reshape(n * positions, kin), g.reshape(n * positions, kout)
            # Same product, the longer side as columns: for the two-layer net's (32, 10) and
            # (32, 4096) factors, a^T g then transposed took 126 us against 417 us for g^T a
            # (2 threads, MKL; docs/performance.md).
            product = (a.T @ g).T if kout > kin else g.T @ a
        else:
            a = a.transpose(0, 1).reshape(groups, n * positions, kin)
            g = g.transpose(0, 1).reshape(groups, n * positions, kout)
            product = torch.bmm(g.transpose(1, 2), a).reshape(groups * kout, kin)
        return self._to_parameter(product).reshape(-1)

    def j_times(self, v: Tensor) -> Tensor:
        """Row ``i``: ``sum_{group, s} g_is^T V_group a_is`` for ``v`` of shape ``(groups * kout * kin,)``
        (``V_group`` its ``(kout, kin)`` block); returns ``(n,)``. Costs what ``jt_times`` costs."""
        groups, kin, kout = self.a.shape[1], self.a.shape[3], self.g.shape[3]
        weight = self._from_parameter(v.view(groups * kout, kin)).view(groups, kout, kin)
        projected = torch.einsum("ngsi,goi->ngso", self.a, weight)  # V a_is at every position
        return (projected * self.g).sum((1, 2, 3))

    def dense(self) -> Dense:
        """The per-sample gradients, ``(n, groups * kout * kin)``."""
        n, kin = self.a.shape[0], self.a.shape[3]
        per_sample = torch.einsum("ngso,ngsi->ngoi", self.g, self.a).reshape(-1, kin)
        return Dense(self._to_parameter(per_sample).reshape(n, -1))


@dataclass
class InputOverlap:
    """A convolution's input at its ``T`` positions, for its factorised Gram's ``A A^T`` without
    the patches (:meth:`Factored.add_gram_lower`).

    The patches of output positions ``s`` and ``s'`` hold input positions ``t`` and ``t'`` at the
    same kernel offset for ``M[(s, s'), (t, t')]`` offsets (a zero-padded position holds nothing),
    so ``(A A^T)[(i, s), (j, s')] = sum_{t, t'} M[(s, s'), (t, t')] x_it . x_jt'``: per group
    ``(nT)^2 cin + n^2 T^2 S^2`` multiply-adds against the patches' ``(nS)^2 kh kw cin``. On
    small maps that is several times fewer: for a 3x3 convolution with 64 channels at 2x2 (``T = S
    = 4``), ``n = 128``, 38 against 168 million, and its Gram part (the piece built, im2col
    included) took 1.28 against 2.56 ms (benchmarks/kernels.py; docs/performance.md, twentieth
    session).

    Attributes:
        x: ``(groups, T * n, cin)``, the input's rows position-major (row ``t * n + i``).
        pairs: ``M``, ``(S * S, T * T)`` (:func:`patch_pairs`).
    """

    x: Tensor
    pairs: Tensor

    def gram_part(self, group: int, g: Tensor, with_bias: bool) -> Tensor:
        """``sum_{s, s'} ((A A^T)[(i, s), (j, s')] + [with_bias]) (g_is . g_js')`` for the group's
        output gradients ``g`` ``(n, S, kout)``; returns ``(n, n)``."""
        n, positions = g.shape[:2]
        x = self.x[group]
        in_positions = x.shape[0] // n
        inner = (x @ x.T).view(in_positions, n, in_positions, n).transpose(1, 2).reshape(in_positions**2, n * n)
        inputs = self.pairs @ inner  # (S * S, n * n): rows (s, s'), columns (i, j)
        if with_bias:
            inputs += 1.0
        rows = g.transpose(0, 1).reshape(positions * n, -1)  # position-major, as x
        outputs = (rows @ rows.T).view(positions, n, positions, n).transpose(1, 2).reshape(positions**2, n * n)
        return inputs.mul_(outputs).sum(0).view(n, n)


@functools.lru_cache(maxsize=64)
def patch_pairs(
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``M`` of :class:`InputOverlap` for a 2-d convolution of an ``in_size`` input (zero
    ``padding`` still to apply) to ``out_size``: ``(S * S, T * T)``, entry ``((s, s'), (t, t'))``
    the number of kernel offsets ``o`` at which output position ``s`` reads input position ``t``
    and ``s'`` reads ``t'`` (positions row-major). Cached per geometry; not to be modified."""
    (h, w), (ho, wo) = in_size, out_size
    reads = torch.zeros(kernel[0] * kernel[1], ho * wo, h * w, dtype=torch.float64)  # (offset, s, t)
    for p in range(kernel[0]):
        for q in range(kernel[1]):
            for r in range(ho):
                for c in range(wo):
                    th = r * stride[0] + p * dilation[0] - padding[0]
                    tw = c * stride[1] + q * dilation[1] - padding[1]
                    if 0 <= th < h and 0 <= tw < w:
                        reads[p * kernel[1] + q, r * wo + c, th * w + tw] = 1.0
    pairs = torch.einsum("ost,oru->srtu", reads, reads).reshape((ho * wo) ** 2, (h * w) ** 2)
    return pairs.to(dtype=dtype, device=device)


@dataclass
class PermutedDense:
    """Per-sample gradients whose columns are a permutation of the parameter's entries (possibly
    the identity: the grouped path's gradients, kept in a workspace buffer for the stamp).

    Attributes:
        jac: ``(n, numel)``; each row laid out as ``shape`` (a conv weight from patches:
            ``(kout, kh, kw, kin)``).
        perm: takes ``shape`` to the parameter's layout (``(0, 3, 1, 2)`` for that conv weight).
        stamp: set when ``jac`` lives in an engine's workspace: every use checks that the engine
            has not started another step since (which would have overwritten it).
    The Gram matrix does not depend on the column order; ``J^T v`` is permuted back (``numel``
    entries, not ``n * numel``).
    """

    jac: Tensor
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    stamp: ws.Stamp | None = None

    def _jac(self) -> Tensor:
        if self.stamp is not None:
            self.stamp.check()
        return self.jac

    def add_gram_lower(self, gram: Tensor) -> None:
        """``gram += jac jac^T`` but its upper-right block (:func:`add_gram_lower`)."""
        add_gram_lower(gram, self._jac())

    def jt_times(self, v: Tensor) -> Tensor:
        """``J^T v`` in the parameter's layout, ``(numel,)``, for ``v`` of shape ``(n,)``."""
        return (self._jac().T @ v).view(self.shape).permute(self.perm).reshape(-1)

    def j_times(self, v: Tensor) -> Tensor:
        """``J v`` for ``v`` ``(numel,)`` in the parameter's layout; returns ``(n,)``."""
        param_shape = [self.shape[p] for p in self.perm]
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        return self._jac() @ v.reshape(param_shape).permute(inverse).reshape(-1)

    def dense(self) -> Dense:
        """The per-sample gradients in the parameter's layout, ``(n, numel)`` (a new tensor)."""
        n = self.jac.shape[0]
        jac = self._jac().view(n, *self.shape).permute(0, *(p + 1 for p in self.perm))
        return Dense(jac.clone(memory_format=torch.contiguous_format).view(n, -1))


@dataclass
class KeptConv:
    """A convolution weight's per-sample gradients kept as the layer's input and output gradient.

    Used where the per-sample gradients ``(n, numel)`` are much larger than ``x`` and ``g``
    (:data:`KEEP_FACTORS_ABOVE`; deep layers), so they need not stay in memory until ``J^T v``: the Gram
    part is added from per-sample gradients that are formed, used and dropped at once, ``J^T v``
    is one batched weight-gradient convolution of the ``v``-weighted output gradients (the kernel
    of SGD's backward) and ``J v`` one convolution of ``x`` by ``v``.

    Except while the per-sample gradients formed for the Gram still sit in the engine's scratch
    (:data:`JAC_SLOT`), untouched: no later layer has formed its own there, as for the last kept
    layer of the backward pass (the only one on the regression demo's resnet8_fixup). ``J^T v``
    and ``J v`` are then products with them, which read ``n * numel`` floats instead of running a
    convolution over the batch (there 5.5 -> 1.9 ms a step, docs/performance.md, gram8). The
    scratch is held by the workspace in any case, so this costs no memory.

    Attributes:
        module: the convolution (hyper-parameters and weight shape).
        x: ``(n, C_in, ...)`` input as the convolution sees it, before the zero ``padding``.
        g: ``(n, C_out, ...)`` output gradients.
        padding: symmetric zero padding still to apply, per spatial dimension.
        per_sample: ``transient -> piece``, forms the per-sample gradients (the measured path,
            :data:`CONV_WEIGHT_PATHS`); ``transient=True``: in a scratch buffer, used up at once.
    """

    module: nn.Module
    x: Tensor
    g: Tensor
    padding: tuple[int, ...]
    per_sample: Callable[[bool], Dense | PermutedDense]
    # the per-sample gradients formed for the Gram, as a stamp of their scratch and the piece
    # without its ``jac`` (the stamp gives it back while it is intact; no reference is held)
    _formed: tuple[ws.ScratchStamp, Dense | PermutedDense] | None = field(default=None, init=False, repr=False)

    def add_gram_lower(self, gram: Tensor) -> None:
        """``gram += J J^T`` but its upper-right block (:func:`add_gram_lower`); ``J`` is not kept."""
        piece = self.per_sample(True)
        piece.add_gram_lower(gram)
        work = ws.active()
        stamp = work.scratch_stamp(JAC_SLOT, piece.jac) if work is not None else None
        self._formed = None if stamp is None else (stamp, replace(piece, jac=None))

    def _intact(self) -> Dense | PermutedDense | None:
        """The per-sample gradients formed for the Gram, if their scratch still holds them."""
        if self._formed is None:
            return None
        stamp, piece = self._formed
        jac = stamp.tensor()
        return None if jac is None else replace(piece, jac=jac)

    def jt_times(self, v: Tensor) -> Tensor:
        """``sum_i v_i J_i`` by one weight-gradient convolution (or from the intact per-sample
        gradients); ``(numel,)`` for ``v`` ``(n,)``."""
        intact = self._intact()
        if intact is not None:
            return intact.jt_times(v.to(intact.jac.dtype)).to(v.dtype)
        m = self.module
        weighted = self.g * v.to(self.g.dtype).view(-1, *[1] * (self.g.dim() - 1))
        grad = torch.ops.aten.convolution_backward(
            weighted,
            self.x,
            self.g.new_empty(1).expand(m.weight.shape),
            None,
            list(m.stride),
            list(self.padding),
            list(m.dilation),
            False,
            [0] * len(self.padding),
            m.groups,
            (False, True, False),
        )[1]
        return grad.reshape(-1).to(v.dtype)

    def j_times(self, v: Tensor) -> Tensor:
        """``J v``: row ``i`` is ``<g_i, conv(x_i, V)>`` (or from the intact per-sample gradients)
        for ``v`` ``(numel,)``; returns ``(n,)``."""
        intact = self._intact()
        if intact is not None:
            return intact.j_times(v.to(intact.jac.dtype)).to(v.dtype)
        m = self.module
        out = torch.ops.aten.convolution(
            self.x,
            v.to(self.x.dtype).view(m.weight.shape),
            None,
            list(m.stride),
            list(self.padding),
            list(m.dilation),
            False,
            [0] * len(self.padding),
            m.groups,
        )
        return (out * self.g).flatten(1).sum(1).to(v.dtype)

    def dense(self) -> Dense:
        """The per-sample gradients, ``(n, numel)``, formed again."""
        return self.per_sample(False).dense()


Piece = Dense | FoldedBias | Factored | PermutedDense | KeptConv | UsedRows | TokenRows


# How 2-d convolutions get their per-sample weight gradients (see ``_conv``).
CONV_WEIGHT_PATHS = MeasuredChoice()
# The workspace slot of conv per-sample gradients (scratch: used up at once; keep: until ``J^T v``).
JAC_SLOT = "conv_jac"
# The patches path copies ``n * S * kh * kw * kin`` entries; it is offered only when that is at
# most this many times the per-sample gradients' ``n * kout * kh * kw * kin`` (i.e. S <= 4 kout).
MAX_PATCHES_OVER_GRADIENTS = 4
# The grouped path runs on chunks of samples whose ``x``, ``g`` and per-sample gradients are each at
# most this many bytes (the kernel copies ``x`` and ``g`` and returns new gradients; well below
# glibc's 32 MiB ceiling for heap blocks: ``_conv_weight_per_sample``).
GROUPED_CHUNK_BYTES = 8 << 20
# Inside an engine the patches path gathers its patches in this many chunks of samples (scratch
# ``1 / PATCH_CHUNKS`` of the whole; one batched GEMM per chunk).
PATCH_CHUNKS = 4
# A convolution whose patches copy (``n * S * kh * kw * kin`` entries) is smaller than this runs the
# patches path without a timing trial. At that size no path can save more than the patches path's
# own cost (a copy of at most 2 MiB and its GEMM, tenths of a millisecond), while a trial runs every
# candidate three times and the first call of the grouped or correlation path in a process compiles
# oneDNN kernels: 40-54 ms for resnet8's stem on 8x8 images, whose trial chose the patches path in
# every process, as it did for the network's (128, 16, 8, 8) -> (128, 32, 4, 4) layer (295k entries);
# the demo's 28x28 stem (903k entries) chose the correlation path and stays timed
# (docs/performance.md, twenty-sixth session).
UNTIMED_PATCHES_BELOW = 1 << 19
# The correlation path runs one convolution per input channel; it is offered up to this many
# (image stems, 1-3 channels, where the grouped convolution's n groups of 1-3 channels are slow:
# chosen for both stems of docs/performance.md's perf3 runs, per-sample time 0.038 -> 0.030 s).
MAX_CORRELATE_CHANNELS = 4
# A convolution weight used once keeps ``(x, g)`` instead of its per-sample gradients
# (:class:`KeptConv`) when those are more than this many times larger, per sample: it saves
# memory at the price of one batched weight-gradient convolution in ``J^T v``. 1 would also keep
# ResNet-32's 64-channel layers at 64x64 (1.1x): peak RSS 1.06-1.09x SGD instead of 1.11-1.18x,
# but ``J^T r`` +0.12 s, the step 6-8% slower (docs/performance.md, mem6).
KEEP_FACTORS_ABOVE = 4


def factored_is_cheaper(
    n: int,
    positions: int,
    kin: int,
    kout: int,
    groups: int = 1,
    unfold: bool = False,
    overlap: tuple[int, int] | None = None,
) -> bool:
    """Cost model (multiply-adds) choosing between the two forms of a weight's Gram matrix.

    With ``n`` rows, ``S = positions``, per-group sizes ``kin`` and ``kout``:
        materialised: ``n*S*groups*kin*kout`` (per-sample gradients) ``+ n^2*groups*kin*kout``
            (``J J^T``);
        factorised: the products of :func:`_patch_products` (``A A^T`` and ``G G^T`` from the
            factors), or for a convolution offering ``overlap = (T, cin)`` (``T`` input positions,
            ``cin`` channels per group) the cheaper of those and :func:`_overlap_products`
            (:class:`InputOverlap`), ``+ UNFOLD_PENALTY*n*S*groups*kin*kout`` when the input must be
            unfolded (a convolution other than 1x1, stride 1, no padding; ``J^T v`` uses the patches
            either way).
    ``J^T r`` costs the same ``n*S*groups*kin*kout`` either way and is left out. A factorised
    form is refused when its square temporaries exceed ``MAX_FACTORED_ENTRIES`` entries.
    """
    rows = n * positions
    weight = groups * kin * kout
    materialised = rows * weight + n * n * weight
    products = _patch_products(n, positions, kin, kout, groups)
    if overlap is not None:
        products = min(products, _overlap_products(n, *overlap, positions, kout, groups))
    return products + (UNFOLD_PENALTY * rows * weight if unfold else 0.0) < materialised


def overlap_is_cheaper(
    n: int, in_positions: int, cin: int, positions: int, kin: int, kout: int, groups: int = 1
) -> bool:
    """Whether a factorised convolution takes ``A A^T`` from its input positions
    (:class:`InputOverlap`) rather than its patches, by the multiply-adds of the two."""
    overlap = _overlap_products(n, in_positions, cin, positions, kout, groups)
    return overlap < _patch_products(n, positions, kin, kout, groups)


def _patch_products(n: int, positions: int, kin: int, kout: int, groups: int) -> float:
    """``groups*(n*S)^2*(kin + kout)`` (``A A^T`` and ``G G^T``) ``+ (n*S)^2`` (their product and
    block sums); infinite when ``(n*S)^2 > MAX_FACTORED_ENTRIES``."""
    square = (n * positions) ** 2
    return math.inf if square > MAX_FACTORED_ENTRIES else groups * square * (kin + kout) + square


def _overlap_products(n: int, in_positions: int, cin: int, positions: int, kout: int, groups: int) -> float:
    """:class:`InputOverlap`'s ``groups*((n*T)^2*cin + n^2*T^2*S^2 + (n*S)^2*kout)`` (the input
    positions' inner products, their sums into ``A A^T``, ``G G^T``) ``+ n^2*(T^2 + 2*S^2)`` (two
    reorderings, the product and its sum); infinite when ``(n*T)^2 > MAX_FACTORED_ENTRIES``."""
    inputs, outputs = (n * in_positions) ** 2, (n * positions) ** 2
    if max(inputs, outputs) > MAX_FACTORED_ENTRIES:
        return math.inf
    return groups * (inputs * cin + inputs * positions**2 + outputs * kout) + inputs + 2 * outputs


Contributions = Callable[[nn.Module, Tensor, Tensor, frozenset], "dict[str, Piece]"]


@dataclass(frozen=True)
class LayerHandler:
    """How the hooks engine treats one module type.

    Attributes:
        contributions: ``(module, a, g, names) -> {name: Piece}`` for the requested
            parameter names (a parameter used by several calls has its calls' pieces joined or
            summed by the engine).
        unsupported: ``module -> reason`` when this instance cannot be handled exactly
            (its parameters then go to the reference engine), ``None`` when it can.
        check: raises when the module must not be used for GGN at all (BatchNorm in training).
        needs_input: False when ``contributions`` ignores ``a`` (it then gets ``None``): the
            engine must not keep such an input alive, autograd may free it early.
        needs_output: True when ``contributions`` gets, as ``a``, a :class:`RecordedCall` (the
            module's outputs with their autograd graph, and its arguments) instead of its input,
            and as ``g`` one gradient per output (:data:`OutputGrads`) (:data:`AUTOGRAD_ROWS`).
        autocast: True when the module may compute in a lower precision than its parameters
            under ``torch.autocast``, its input and parameters cast to that dtype (Linear and
            convolutions; GroupNorm and LayerNorm, which the CPU's autocast runs in bfloat16):
            the engine then hands ``contributions`` the cast input and the output gradients in
            the parameters' dtype. Other modules computing in another dtype than their
            parameters go to the reference engine.
        sequence_first: True when the module treats every dimension before its last ones alike
            (Linear, LayerNorm, Embedding, ScalarBias/ScalarScale), so that a sequence-first
            ``(T, b, ...)`` input has its samples in dimension 1 (PyTorch's default layout for
            transformers): the engine then moves that dimension to 0 for ``contributions``, where
            dimension 0 does not have the batch's size and dimension 1 does, and its row check
            verifies that those rows are the samples.
        chained_outputs: True when ``contributions`` takes each output's gradient as it arrives
            (the total at that output, holding the paths through another output computed from it
            inside the module) and counts each path once (``LSTMCell``: ``h'`` from ``c'``); the
            engine then does not route a module whose outputs are computed one from another.
        parameter_names: ``module -> names`` of the parameters ``contributions`` computes, those
            the module's type registers (Linear: ``weight``, ``bias``). A module holding another
            takes :data:`AUTOGRAD_ROWS` instead: a forward pre-hook forms its ``weight`` from
            ``weight_g`` and ``weight_v`` (``torch.nn.utils.weight_norm``) or from
            ``weight_orig`` (``prune``, ``spectral_norm``), and only the module's graph, through
            the formed weight, leads to them. ``None`` (a handler registered without it): a name
            asked for and not returned raises, never zero rows.
    """

    contributions: Contributions
    unsupported: Callable[[nn.Module], str | None] = lambda module: None
    check: Callable[[nn.Module], None] = lambda module: None
    needs_input: bool = True
    needs_output: bool = False
    autocast: bool = False
    sequence_first: bool = False
    chained_outputs: bool = False
    parameter_names: Callable[[nn.Module], Collection[str]] | None = None


def fixed_names(*fixed: str) -> Callable[[nn.Module], Collection[str]]:
    """``parameter_names`` of a module type whose parameters' names do not depend on the instance."""
    return lambda module: fixed


_WEIGHT_AND_BIAS = fixed_names("weight", "bias")  # Linear, the convolutions, the norm layers

HANDLERS: dict[type, LayerHandler] = {}


def register_handler(*types: type, **options: Any) -> Callable[[Contributions], Contributions]:
    """Register ``contributions`` for exactly these module types (subclasses are not matched:
    a subclass may change ``forward``)."""

    def decorator(fn: Contributions) -> Contributions:
        for t in types:
            if t in HANDLERS:
                raise ValueError(f"a handler for {t.__name__} is already registered")
            HANDLERS[t] = LayerHandler(fn, **options)
        return fn

    return decorator


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s exact type, or ``None``."""
    return HANDLERS.get(type(module))


# Entries of the batched cotangents (rows x the output's entries) of one call of
# torch.autograd.grad in _rows_through_graph: 2**24 float32 entries are 64 MB.
AUTOGRAD_ROWS_ENTRIES = 1 << 24


def output_tensors(output: Any) -> list[Any]:
    """The entries of a module's output in order, nested tuples, lists and dicts (their values,
    in insertion order: ``{"logits": ..., "aux": ...}``, a Hugging Face ``ModelOutput``)
    flattened (``LSTM``'s ``(out, (h, c))`` -> ``[out, h, c]``); a tensor is ``[output]``."""
    if isinstance(output, (tuple, list)):
        return [leaf for entry in output for leaf in output_tensors(entry)]
    if isinstance(output, dict):
        return [leaf for entry in output.values() for leaf in output_tensors(entry)]
    return [output]


# Modules whose type fixes the batch dimension of their outputs on a batched (3-D) input.
_RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)


def output_batch_dims(module: nn.Module, args: tuple, kwargs: dict, positions: Sequence[int]) -> tuple[int, ...]:
    """The batch dimension of each followed output of a call of ``module`` (``positions``: their
    indices in :func:`output_tensors`): ``0``, except where the module's exact type fixes another
    layout. ``nn.RNN``/``GRU``/``LSTM`` on a 3-D input return ``out`` ``(b, T, H)`` with
    ``batch_first``, else ``(T, b, H)``, and final states ``(layers * directions, b, H)`` (batch in
    dimension 1 whatever ``batch_first``). Known from the type, never guessed from sizes (the row
    check, :mod:`.rows`, still verifies that these rows are the samples). ``nn.MultiheadAttention``
    without ``batch_first`` on a 3-D query returns ``(T, b, E)`` (its weights ``(b, T, S)``)."""
    if type(module) in _RECURRENT:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, Tensor) and x.dim() == 3:
            return tuple((0 if module.batch_first else 1) if position == 0 else 1 for position in positions)
    if type(module) is nn.MultiheadAttention and not module.batch_first:
        query = args[0] if args else kwargs.get("query")
        if isinstance(query, Tensor) and query.dim() == 3:
            return tuple(1 if position == 0 else 0 for position in positions)
    return (0,) * len(positions)


@dataclass
class RecordedCall:
    """What :data:`AUTOGRAD_ROWS` gets as ``a``: a module call's followed outputs (its distinct
    differentiable tensors, nested tuples and lists flattened) and the arguments it was called
    with. Per output: ``positions``, its index in :func:`output_tensors` of what the module
    returned; ``batch_dims``, its batch dimension (:func:`output_batch_dims`); ``edges``, its place
    in the autograd graph; ``versions``, its version counter when the module returned it: the
    caller may change an output in place afterwards (``h.mul_(2)``), after which the tensor stands
    for the changed values and their graph, the edge still for the module's. ``stops``: the graph
    edges ``(node, output_nr)`` of outputs of the same module's earlier calls that a path from this
    call's outputs reaches without leaving through its arguments (a state the module keeps on
    itself, ``self.h``), found by the locality walk (:mod:`.locality`): its rows stop there
    (:func:`_cut_outside`)."""

    outputs: tuple[Tensor, ...]
    args: tuple
    kwargs: dict
    positions: tuple[int, ...]
    batch_dims: tuple[int, ...]
    edges: tuple[GradientEdge, ...]
    versions: tuple[int, ...]
    stops: tuple[tuple[Any, int], ...] = ()


# The gradients at a recorded call's outputs, one per output in RecordedCall order: ``(n, ...)``
# with the batch moved to dimension 0 (row ``r``: sample ``r // k``), None where no gradient
# reaches that output (autograd's zero).
OutputGrads = tuple[Tensor | None, ...]


def sample_shape(shape: Sequence[int], batch_dim: int) -> tuple[int, ...]:
    """One sample's part of an output of ``shape``: the shape without its batch dimension."""
    return (*shape[:batch_dim], *shape[batch_dim + 1 :])


def _autograd_rows(module: nn.Module, call: RecordedCall, g: OutputGrads, names: frozenset) -> dict[str, Piece]:
    """Per-sample gradients of a module no handler knows, ``{name: Dense (n, numel)}``.

    Row ``r`` of each output's gradient in ``g`` (``(n, ...)``, ``n = b k`` rows sample-major)
    is the output gradient of sample ``i = r // k`` at that output's row ``i`` (its batch
    dimension); since row ``i`` of each output reaches sample ``i``'s residuals only (the row
    check, :mod:`.rows`), the row of ``J`` for the module's own parameters is the
    vector-Jacobian product of the module with those gradients at row ``i`` of every output at
    once. Two exact ways, the first that applies:

    1. :func:`_rows_by_recomputation`: the module run again on each sample (``torch.func``:
       ``vmap`` of ``vjp``), one forward and backward of the module at the batch; taken only
       when the run gives the recorded outputs again (``torch.func`` refuses random draws and
       writes to buffers) and the module has no hooks.
    2. :func:`_rows_through_graph`: through the recorded graph, whatever the module computes.
    """
    # its own parameters, and any of its descendants' it used without calling them (adopted)
    params = {name: p for name, p in module.named_parameters() if name in names}
    changed = any(t._version != v for t, v in zip(call.outputs, call.versions))
    with _cut_outside(call, params.values()):
        rows = None if changed else _rows_by_recomputation(module, call, g, params)
        if rows is None:
            rows = _rows_through_graph(call, g, params)
    return {name: Dense(rows[name]) for name in params}


@contextlib.contextmanager
def _cut_outside(call: RecordedCall, params: Iterable[Tensor]) -> Iterator[None]:
    """While open, the gradient arriving at any tensor argument of ``call`` (nested: an LSTM's
    ``(h0, c0)``) and at the outputs of the module's earlier calls (``call.stops``) is zero, so
    that a backward pass from the call's outputs differentiates the module's own operations only.
    Without the cut, a path that leaves the call through an input and reaches the module's
    parameters again through an earlier call of the same module (a cell in a loop, a state passed
    from one call to the next) was counted in this call's rows as well as in that call's own; so
    was a path through a state the module keeps on itself (``self.h = tanh(lin(x) + w * self.h)``,
    the previous call's output, no argument: Gram 0.3-1% off): the gradient at the earlier call's
    output holds the paths through this call, and its rows count them. An argument that is one of
    the rows' ``params`` (a module handed its own weight) is not cut: its gradient there is the
    rows'. The locality walk (:mod:`.locality`) routes the module where a path beyond the cut
    is in no call's rows."""
    own = {id(p) for p in params}
    handles = [
        t.register_hook(torch.zeros_like)
        for t in output_tensors((call.args, call.kwargs))
        if isinstance(t, Tensor) and t.requires_grad and id(t) not in own
    ]
    handles += [node.register_prehook(functools.partial(_zero_at, nr)) for node, nr in call.stops]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zero_at(index: int, grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """A node's incoming gradients with the one at output ``index`` zeroed (a pre-hook)."""
    return tuple(torch.zeros_like(g) if i == index and g is not None else g for i, g in enumerate(grads))


def _rows_by_recomputation(
    module: nn.Module, call: RecordedCall, g: OutputGrads, params: dict[str, Tensor]
) -> dict[str, Tensor] | None:
    """``vmap`` over the samples of the module's ``vjp`` on that sample alone (tensor arguments
    with the batch as dimension 0 are split, others shared; each output's one-sample batch
    dimension dropped), or ``None`` where it cannot be used or does not reproduce every recorded
    output (to ``sqrt(eps)`` of its dtype, relative to its largest entry). The run gets copies of
    the module's buffers, so none is changed (``torch.func`` refuses most writes to a buffer, not
    an ``out=`` one); a run that wrote to one is not used. The attributes of the module and its
    descendants are set back to the forward's afterwards: its Python code runs again, and
    ``self.h = ...`` was left holding a tensor of the ``vmap`` (a state carried to the next step),
    ``self.calls += 1`` counted twice. Other side effects (a list appended to) would happen again."""
    outputs, dims = call.outputs, call.batch_dims
    b = outputs[0].shape[dims[0]]
    if any(m._forward_hooks or m._forward_pre_hooks for m in module.modules()):
        return None  # hooks would run again (and may change what the module returns)
    batched = [isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == b for t in call.args]
    if not any(batched) or any(isinstance(t, Tensor) for t in call.kwargs.values()):
        return None
    n = next(x for x in g if x is not None).shape[0]
    k = n // b
    cotangents = tuple(
        (x.to(out.dtype) if x is not None else out.new_zeros(n, *sample_shape(out.shape, d))).reshape(
            b, k, *sample_shape(out.shape, d)
        )
        for x, out, d in zip(g, outputs, dims)
    )
    values = {name: p.detach() for name, p in params.items()}
    # the run's buffers are copies: torch.func lets some writes to a buffer through (``out=``, as in
    # spectral_norm's power iteration), which would run the forward's side effects a second time
    # (its ``_u`` advanced twice a step); a copy written to means the run is not the recorded one
    copies = {name: t.detach().clone() for name, t in module.named_buffers()}
    args = tuple(t.detach() if isinstance(t, Tensor) else t for t in call.args)

    def sample(cotangent: tuple[Tensor, ...], *split: Any) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        inputs = [x.unsqueeze(0) if flag else x for x, flag in zip(split, batched)]

        def forward(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            state = {**p, **copies}
            out = output_tensors(torch.func.functional_call(module, state, tuple(inputs), call.kwargs, strict=False))
            if any(out[i].shape[d] != 1 for i, d in zip(call.positions, dims)):
                raise ValueError("an output without the one sample in its batch dimension")  # not this layout
            return tuple(out[i].squeeze(d) for i, d in zip(call.positions, dims))

        out, vjp = torch.func.vjp(forward, values)
        # a loop: some backward rules fail nested vmaps (PReLU)
        columns = [vjp(tuple(t[c] for t in cotangent))[0] for c in range(k)]
        return out, {name: torch.stack([column[name] for column in columns]) for name in values}

    attributes = [(m, dict(vars(m))) for m in module.modules()]  # the entries, not copies of them
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # torch.func's note that an operation has no batching rule (it then loops over the
            # samples; an LSTM's, attention's): about this engine's own call, nothing a user can change
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            outs, grads = torch.func.vmap(
                sample, in_dims=(0, *(0 if f else None for f in batched)), out_dims=(dims, 0)
            )(cotangents, *args)
    except Exception:  # torch.func refuses random draws, writes to buffers, data-dependent control flow, ...
        return None
    finally:
        for m, saved in attributes:
            vars(m).clear()
            vars(m).update(saved)
    if any(t._version for t in copies.values()):  # the run wrote a buffer: not the recorded forward
        return None
    for again, recorded in zip(outs, outputs):
        expected = recorded.detach()
        tolerance = torch.finfo(expected.dtype).eps ** 0.5 * float(expected.abs().max().clamp_min(1e-30))
        if again.shape != expected.shape or float((again - expected).abs().max()) > tolerance:
            return None
    if not _rows_sum_to_the_batch_gradient(call, g, cotangents, grads, params):
        return None
    return {name: grads[name].reshape(b * k, -1) for name in params}


def _rows_sum_to_the_batch_gradient(
    call: RecordedCall,
    g: OutputGrads,
    cotangents: tuple[Tensor, ...],
    grads: dict[str, Tensor],
    params: dict[str, Tensor],
) -> bool:
    """Whether the rows run again sample by sample (``grads[name]`` ``(b, k, *shape)``, from
    ``cotangents`` ``(b, k, ...)`` per output), weighted by ``s_i`` per sample, sum to the
    module's vector-Jacobian product through its recorded graph with the cotangents weighted
    alike. Equal outputs do not prove equal derivatives: a module that mixes its samples through
    a term that is zero where it is checked (``h + gamma * h.mean(0)`` with a gate ``gamma = 0``,
    ReZero's start) returns the same outputs alone, but its derivative with respect to ``gamma``
    is ``mean(h)`` in the batch and ``h_i`` alone. The weights ``s_i`` (drawn from ``[1, 2)``
    with a fixed seed) make the check see it where the cotangents are the same for every sample
    (a linear head: ``sum_i c h_i = sum_i c mean(h)``). One backward pass of the module's own
    operations; the tolerance is ``sqrt(eps)`` of the weighted sum of the rows' absolute values."""
    b = cotangents[0].shape[0]
    weights = torch.rand(b, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1

    def weighted(t: Tensor) -> Tensor:  # (b, k, ...) -> s_i times each sample's k rows, summed over k
        return (t * weights.to(t).view(b, *[1] * (t.dim() - 1))).sum(1)

    reached = [
        (edge, weighted(cotangent).movedim(0, d))
        for edge, cotangent, d, x in zip(call.edges, cotangents, call.batch_dims, g)
        if x is not None
    ]
    names = list(params)
    batch = torch.autograd.grad(
        [e for e, _ in reached],
        [params[n] for n in names],
        [c for _, c in reached],
        retain_graph=True,
        allow_unused=True,
    )
    for name, total in zip(names, batch):
        summed, scale = weighted(grads[name]).sum(0), weighted(grads[name].abs()).sum(0)
        expected = torch.zeros_like(summed) if total is None else total.to_dense().to(summed).reshape(summed.shape)
        tolerance = torch.finfo(summed.dtype).eps ** 0.5 * float(scale.max().clamp_min(1e-30))
        if float((summed - expected).abs().max()) > tolerance:
            return False
    return True


def _rows_through_graph(call: RecordedCall, g: OutputGrads, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The rows as vector-Jacobian products of the module's outputs (their graph edges, those
    the residuals reach) through the forward's recorded graph (several inputs, random draws,
    buffers, autocast: what the module did is what is differentiated), batched with
    ``is_grads_batched`` over chunks of rows, each a backward pass over the module's own
    operations only: ``n`` times the module's backward at the full batch (its cotangents are
    mostly zeros), where the reference engine pays ``n`` backward passes of the whole network.
    Where the batched pass fails (a backward that reads its gradient's values), the rows are
    taken one by one."""
    tensors = list(params.values())
    # the outputs' shapes and dtypes: their edges are differentiated
    reached = [(e, out, d, x) for e, out, d, x in zip(call.edges, call.outputs, call.batch_dims, g) if x is not None]
    edges = [e for e, _, _, _ in reached]
    n, b = reached[0][3].shape[0], reached[0][1].shape[reached[0][2]]
    sample = torch.arange(n, device=reached[0][3].device) // (n // b)
    kept: list[list[Tensor]] = [[] for _ in tensors]
    chunk = max(1, AUTOGRAD_ROWS_ENTRIES // max(1, sum(out.numel() for _, out, _, _ in reached)))
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk), device=sample.device)
        cotangents = []
        for _, out, d, x in reached:
            cotangent = out.new_zeros(len(rows), *out.shape)
            # row r's gradient at its sample's row of the output (in the output's batch dimension)
            cotangent.movedim(d + 1, 1)[torch.arange(len(rows), device=sample.device), sample[rows]] = x[rows].to(
                out.dtype
            )
            cotangents.append(cotangent)
        try:
            parts = torch.autograd.grad(
                edges, tensors, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        except (RuntimeError, NotImplementedError):
            each = [
                torch.autograd.grad(edges, tensors, [c[r] for c in cotangents], retain_graph=True, allow_unused=True)
                for r in range(len(rows))
            ]
            parts = [None if t[0] is None else torch.stack([x.to_dense() for x in t]) for t in zip(*each)]
        for rows_of, part, p in zip(kept, parts, tensors):
            if part is None:  # a parameter this call does not use: zero rows
                part = p.new_zeros(len(rows), p.numel())
            rows_of.append((part.to_dense() if part.is_sparse else part).reshape(len(rows), -1))
    return {name: torch.cat(r) if len(r) > 1 else r[0] for name, r in zip(params, kept)}


# Any module with parameters of its own and no handler: exact for every forward (an unsupported
# instance of a handled type, e.g. an Embedding with ``scale_grad_by_freq``, still goes to the reference engine).
AUTOGRAD_ROWS = LayerHandler(_autograd_rows, needs_input=False, needs_output=True, autocast=True)


def _projection_pieces(a: Tensor, g: Tensor, weight: str, bias: str, names: frozenset) -> dict[str, Piece]:
    """Pieces of a projection ``y = x W^T + c`` applied at every position, in ``groups`` blocks of
    ``W``'s rows: ``a`` ``(n, groups, S, kin)`` inputs, ``g`` ``(n, groups, S, kout)`` gradients
    at its output, ``W`` laid out ``(groups * kout, kin)``."""
    n, groups, positions, kin = a.shape
    pieces: dict[str, Piece] = {}
    if weight in names:
        factored = Factored(a, g, with_bias=bias in names)
        cheaper = factored_is_cheaper(n, positions, kin, g.shape[3], groups)
        pieces[weight] = factored if cheaper else factored.dense()
    if bias in names:
        pieces[bias] = _bias_piece(g.sum(2).reshape(n, -1), pieces.get(weight))
    return pieces


def _blocks_dense(
    inputs: list[Tensor], grads: list[Tensor], weight: str, bias: str, names: frozenset
) -> dict[str, Piece]:
    """Per-sample gradients of a weight made of row blocks, block ``j`` applied as a projection at
    the ``S_j`` positions of its own input: ``inputs[j]`` ``(n, S_j, kin)``, ``grads[j]``
    ``(n, S_j, kout)``; row ``i`` of block ``j`` is ``sum_s g_js a_js^T`` (the blocks' lengths may
    differ, so they are not groups of one :class:`Factored`). The bias's rows are ``sum_s g_js``."""
    n = inputs[0].shape[0]
    pieces: dict[str, Piece] = {}
    if weight in names:
        blocks = [torch.einsum("nso,nsi->noi", g, a) for a, g in zip(inputs, grads)]
        pieces[weight] = Dense(torch.cat(blocks, 1).reshape(n, -1))
    if bias in names:
        pieces[bias] = Dense(torch.cat([g.sum(1) for g in grads], 1))
    return pieces


def _attention_mask(attn_mask: Tensor | None, padding: Tensor | None, k: int, dtype: torch.dtype) -> Tensor | None:
    """The additive mask ``MultiheadAttention`` applies, for its rows: ``attn_mask`` ``(T, S)``
    plus ``key_padding_mask`` ``(b, S)`` repeated for each sample's ``k`` rows, ``(b k, 1, 1, S)``;
    a boolean mask is ``-inf`` where True (not attended), a float one is added as it is."""

    def additive(mask: Tensor) -> Tensor:
        return (
            mask.to(dtype)
            if mask.is_floating_point()
            else torch.zeros_like(mask, dtype=dtype).masked_fill(mask, -math.inf)
        )

    merged = None if attn_mask is None else additive(attn_mask)
    if padding is not None:
        rows = additive(padding).repeat_interleave(k, 0)[:, None, None, :]
        merged = rows if merged is None else merged + rows
    return merged


def _attention_rows(module: nn.Module, call: RecordedCall, g: OutputGrads, names: frozenset) -> dict[str, Piece]:
    """``nn.MultiheadAttention`` as ``TransformerEncoderLayer`` calls it (batch or sequence first, one
    embedding size, keys and values of one length (queries of it or of another: a decoder's
    cross-attention), an ``attn_mask`` of ``(L, S)`` (a causal one among them) and a
    ``key_padding_mask`` of ``(b, S)`` or none, no ``bias_k``/``add_zero_attn``,
    no dropout at work, the weights not returned or not reaching the residuals): its four
    projections' per-sample gradients as factors. The attention is run again at the batch from
    the recorded inputs, and one backward pass from the rows' output gradients ``g[0]``
    (``(n, T, E)``, ``n = b k``) gives the
    gradients at the queries, keys and values (each sample's attention sees that sample alone,
    so row ``r``'s are its own): ``in_proj_weight`` is then three groups of a :class:`Factored`
    weight (inputs ``x_q, x_k, x_v``, gradients ``dq, dk, dv``), ``out_proj`` one (input: the
    heads' concatenated outputs). Anything else takes :func:`_autograd_rows`."""
    kwargs = call.kwargs
    query, key, value = (list(call.args) + [kwargs.get(k) for k in ("query", "key", "value")])[:3]
    attn_mask, padding = kwargs.get("attn_mask"), kwargs.get("key_padding_mask")
    length = 1 if module.batch_first else 0  # the sequences' dimension
    plain = (
        module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
        and (module.dropout == 0.0 or not module.training)
        and all(isinstance(t, Tensor) and t.dim() == 3 for t in (query, key, value))
        and key.shape[length] == value.shape[length]  # queries may be of another length (cross-attention)
        # is_causal is a hint that attn_mask is causal: the mask is what is run again (a hint that
        # is not true makes the run differ from the recorded output, below: the general way)
        and (attn_mask is None or (isinstance(attn_mask, Tensor) and attn_mask.dim() == 2))
        and (padding is None or (isinstance(padding, Tensor) and padding.dim() == 2))
        and call.outputs[0].dtype == module.in_proj_weight.dtype
        and len(call.args) + sum(k in kwargs for k in ("query", "key", "value")) == 3
        and call.positions[0] == 0  # the output followed first is the attention's, not its weights
        and g[0] is not None
        and all(x is None for x in g[1:])  # the weights, where returned, do not reach the residuals
    )
    if not plain:
        return _autograd_rows(module, call, g, names)
    output, grad = call.outputs[0], g[0]  # grad: (n, T, E), its batch first (the engine moved it)
    if not module.batch_first:  # sequence-first (T, b, E): the same attention, its batch first
        query, key, value, output = (t.transpose(0, 1) for t in (query, key, value, output))
    n, b = grad.shape[0], output.shape[0]
    heads, width = module.num_heads, module.embed_dim
    inputs = [
        t.detach().unsqueeze(1).expand(b, n // b, *t.shape[1:]).reshape(n, *t.shape[1:]) for t in (query, key, value)
    ]
    weights = module.in_proj_weight.detach().chunk(3)
    biases = module.in_proj_bias.detach().chunk(3) if module.in_proj_bias is not None else (None,) * 3
    mask = _attention_mask(attn_mask, padding, n // b, query.dtype)
    with torch.enable_grad():
        qkv = [F.linear(x, w, c).requires_grad_() for x, w, c in zip(inputs, weights, biases)]
        split = [t.unflatten(2, (heads, width // heads)).transpose(1, 2) for t in qkv]  # (n, H, T, d)
        attended = F.scaled_dot_product_attention(*split, attn_mask=mask).transpose(1, 2).flatten(2)  # (n, T, E)
        out = F.linear(attended, module.out_proj.weight.detach(), None)
        grads = torch.autograd.grad(out, qkv, grad.to(out.dtype), retain_graph=False)
    # the run must reproduce the recorded output (inputs changed in place since, an option not
    # looked at above): else the general way
    expected = output.detach()
    again = (out.detach() if module.out_proj.bias is None else out.detach() + module.out_proj.bias.detach())[:: n // b]
    tolerance = torch.finfo(expected.dtype).eps ** 0.5 * float(expected.abs().max().clamp_min(1e-30))
    if output._version != call.versions[0] or float((again - expected).abs().max()) > tolerance:
        return _autograd_rows(module, call, g, names)
    if inputs[0].shape[1] == inputs[1].shape[1]:  # one length: the three projections as groups of factors
        pieces = _projection_pieces(
            torch.stack(inputs, 1), torch.stack(grads, 1), "in_proj_weight", "in_proj_bias", names
        )
    else:  # cross-attention: queries of another length than the keys, the three blocks' rows dense
        pieces = _blocks_dense(inputs, grads, "in_proj_weight", "in_proj_bias", names)
    pieces.update(
        _projection_pieces(attended.detach().unsqueeze(1), grad.unsqueeze(1), "out_proj.weight", "out_proj.bias", names)
    )
    return pieces


# MultiheadAttention: its output and arguments (needs_output) to check the call's options and to
# fall back on AUTOGRAD_ROWS; its out_proj's parameters are adopted (it applies them itself)
HANDLERS[nn.MultiheadAttention] = LayerHandler(
    _attention_rows,
    needs_input=False,
    needs_output=True,
    autocast=True,
    parameter_names=fixed_names(
        "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"
    ),
)


def _sum_to_rows(x: Tensor) -> Tensor:
    """``(n, ...)`` -> ``(n, 1)`` sum over everything but the rows.

    A sum over the dimensions, not over a reshape: a channels-last gradient's reshape is a copy
    (at ``(128, 16, 28, 28)`` 1.07 against 0.10-0.12 ms a call; the usual layout the same, 0.11 ms,
    and the same bits; docs/performance.md, thirty-fourth session)."""
    if x.dim() == 1:  # sum(()) would reduce over everything
        return x.unsqueeze(1)
    return x.sum(tuple(range(1, x.dim()))).unsqueeze(1)


@register_handler(ScalarBias, needs_input=False, sequence_first=True, parameter_names=fixed_names("bias"))
def _scalar_bias(module: nn.Module, a: Tensor | None, g: Tensor, names: frozenset) -> dict[str, Piece]:
    # d(x + b)/db sums the output gradient over every entry of the sample.
    return {"bias": Dense(_sum_to_rows(g))}


@register_handler(ScalarScale, sequence_first=True, parameter_names=fixed_names("scale"))
def _scalar_scale(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    return {"scale": Dense(_sum_to_rows(g * a))}


@register_handler(nn.Linear, autocast=True, sequence_first=True, parameter_names=_WEIGHT_AND_BIAS)
def _linear(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    n, out_features = g.shape[0], module.out_features
    positions = math.prod(g.shape[1:-1])  # all leading dimensions are positions (not -1: in may be 0)
    a3 = a.reshape(n, positions, module.in_features)  # (n, S, in)
    g3 = g.reshape(n, positions, out_features)
    pieces: dict[str, Piece] = {}
    if "weight" in names:
        if factored_is_cheaper(n, positions, module.in_features, out_features):
            pieces["weight"] = Factored(a3.unsqueeze(1), g3.unsqueeze(1), with_bias="bias" in names)
        elif positions == 1:
            pieces["weight"] = Dense((g3[:, 0, :, None] * a3[:, 0, None, :]).reshape(n, -1))
        else:
            pieces["weight"] = Dense(torch.bmm(g3.transpose(1, 2), a3).reshape(n, -1))
    if "bias" in names:
        pieces["bias"] = _bias_piece(g3.sum(1), pieces.get("weight"))
    return pieces


def _bias_piece(per_sample: Tensor, weight: Piece | None) -> Dense:
    """A bias's per-sample gradients ``(n, out)``: a :class:`FoldedBias` when its weight's
    :class:`Factored` piece adds its Gram part (a product of ``n^2 * out`` multiply-adds saved: on
    concrete-100k's full batch, 824 rows and two 310-wide biases, the step took 0.83-0.85x the
    time, with the factored products as symmetric updates; docs/performance.md)."""
    folded = isinstance(weight, Factored) and weight.with_bias
    return FoldedBias(per_sample, weight) if folded else Dense(per_sample)


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _conv_unsupported(module: nn.Module) -> str | None:
    if module.transposed:  # pragma: no cover - ConvNd subclasses registered here are never transposed
        return "transposed convolution"
    return None


def _conv_padded_input(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input as the convolution sees it, and the zero padding still to apply.

    Non-zero padding modes and ``padding='same'`` (possibly asymmetric) are applied here, so the
    per-sample kernels below only ever see symmetric integer zero padding.
    """
    dims = _CONV_DIMS[type(module)]
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * dims
    if module.padding == "valid":
        return x, (0,) * dims
    if module.padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * dims
    return x, tuple(module.padding)


def _grouped_weight_gradients(module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...]) -> Tensor:
    """``(n, numel)``: the rows folded into the channels, ``(1, n*C, ...)``, with ``n * groups``
    groups; the batched weight gradient of that convolution is the stack of the per-sample ones."""
    n, weight = x.shape[0], module.weight
    grouped = g.new_empty(1).expand(n * weight.shape[0], *weight.shape[1:])
    return torch.ops.aten.convolution_backward(
        g.reshape(1, n * g.shape[1], *g.shape[2:]),
        x.reshape(1, n * x.shape[1], *x.shape[2:]),
        grouped,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0] * len(padding),
        n * module.groups,
        (False, True, False),
    )[1].reshape(n, -1)


def _conv_weight_per_sample(
    module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...], transient: bool = False
) -> Dense | PermutedDense:
    """Per-sample weight gradients ``(n, numel)`` by grouped weight-gradient convolutions
    (:func:`_grouped_weight_gradients`: the same fast kernel as an ordinary weight gradient, no
    im2col), over chunks of samples whose ``x``, ``g`` and gradients are each at most
    ``GROUPED_CHUNK_BYTES``.

    Why chunks: the kernel copies its folded ``x`` and ``g`` (two temporaries of their size) and
    returns the gradients in a new tensor. At ResNet-32's first stage at 64x64, b = 128, the copies
    are 32 MiB each, at glibc's ceiling for serving blocks from its heap, so every call mapped (and
    the kernel zeroed) 64 MiB afresh: 16k page faults per layer and step, which SGD's backward does
    not pay (docs/performance.md, mem6). At its third stage the gradients are 19 MB a layer
    (``x`` and ``g`` 8 MiB): freed at each call's end, glibc returned their pages to the system
    and the next call faulted them in again, 6.7k faults and 33 against 14 ms a layer
    (docs/performance.md, twenty-ninth session). Chunked, every temporary is a block of at most
    ``GROUPED_CHUNK_BYTES`` that the next chunk reuses.

    Inside an engine, gradients kept until ``J^T v`` (not ``transient``) go to a buffer of its
    workspace (``transient`` ones, when chunked, to its scratch), allocated once and reused while
    shapes repeat: left to the allocator, these blocks (19 MB per 64-channel layer of ResNet-32 at
    64x64, b = 128) were freed at the end of every step, which took most of the step's "solve and
    apply" time and let glibc's heap grow step after step (docs/performance.md, mem5). The result is
    then a :class:`PermutedDense` with the identity permutation, which carries the workspace's stamp.
    """
    n, weight = x.shape[0], module.weight
    row = max(x[0].numel(), g[0].numel(), weight.numel())  # the largest of a sample's three blocks
    chunk = max(1, GROUPED_CHUNK_BYTES // (row * x.element_size()))
    work = ws.active()
    identity = tuple(range(weight.dim()))
    if chunk >= n:
        grads = _grouped_weight_gradients(module, x, g, padding)
        if work is None or transient:
            return Dense(grads)
        kept, stamp = work.keep(JAC_SLOT, tuple(grads.shape), grads)
        kept.copy_(grads)
        return PermutedDense(kept, tuple(weight.shape), identity, stamp)
    shape, stamp = (n, weight.numel()), None
    if work is None:
        jac = x.new_empty(shape)
    elif transient:
        jac = work.scratch(JAC_SLOT, shape, x)
    else:
        jac, stamp = work.keep(JAC_SLOT, shape, x)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        jac[rows] = _grouped_weight_gradients(module, x[rows], g[rows], padding)
    return PermutedDense(jac, tuple(weight.shape), identity, stamp)


def _conv2d_weight_per_sample_patches(
    module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...], transient: bool = False
) -> PermutedDense:
    """Per-sample weight gradients of a 2-d convolution with ``groups == 1`` by patches and one
    batched GEMM: ``J_i = g_i (kout, S) @ P_i (S, kh*kw*kin)``.

    The patches are gathered from the channels-last padded input with a strided view and one copy
    (channel runs are contiguous, unlike ``F.unfold``'s); their columns, and so the gradients', come
    out ordered ``(kh, kw, kin)``: the piece carries that permutation instead of copying ``J``.
    Inside an engine both go to its workspace (``J`` to a scratch buffer when ``transient``, the
    caller using it up at once), so a steady state allocates neither. There the patches are
    gathered ``ceil(n / PATCH_CHUNKS)`` samples at a time, so their scratch is a quarter of all the
    samples' patches (18 -> 4.5 MB for a 64-channel layer of ResNet-32 at 32x32, b = 128; it is held
    at the backward's peak with the activations: docs/performance.md, mem6).
    """
    n, kin = x.shape[:2]
    (kh, kw), (ho, wo) = module.kernel_size, g.shape[2:]
    view = _patch_view(x, module.kernel_size, module.dilation, padding, module.stride, (ho, wo))[:, 0]
    kout = g.shape[1]
    shape, perm = (kout, kh, kw, kin), (0, 3, 1, 2)
    work = ws.active()
    if work is None:
        jac = torch.bmm(g.reshape(n, kout, ho * wo), view.reshape(n, ho * wo, kh * kw * kin))
        return PermutedDense(jac.reshape(n, -1), shape, perm)
    stamp = None
    if transient:
        jac = work.scratch(JAC_SLOT, (n, kout, kh * kw * kin), x)
    else:
        jac, stamp = work.keep(JAC_SLOT, (n, kout, kh * kw * kin), x)
    chunk = -(-n // PATCH_CHUNKS)
    patches = work.scratch("conv_patches", (chunk, ho, wo, kh, kw, kin), x)
    rows = g.reshape(n, kout, ho * wo)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        part = patches[:size]
        part.copy_(view[start : start + size])
        torch.bmm(rows[start : start + size], part.view(size, ho * wo, kh * kw * kin), out=jac[start : start + size])
    return PermutedDense(jac.view(n, -1), shape, perm, stamp)


def _conv2d_weight_per_sample_correlate(module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...]) -> Dense:
    """Per-sample weight gradients of a 2-d convolution with ``groups == 1`` by correlating each
    input channel with the output gradients: ``(n, kout * kin * kh * kw)``, the parameter's layout.

    ``J_i[o, c, a, b] = sum_{p, q} g_i[o, p, q] xp_i[c, a d_h + p s_h, b d_w + q s_w]`` (``xp``
    padded, ``s`` stride, ``d`` dilation): for each input channel ``c`` one convolution of the
    samples' channel ``c`` (as ``n`` channels) by their output gradients (as ``n * kout`` kernels
    of size ``(ho, wo)``, ``groups = n``), with the module's dilation as stride and its stride as
    dilation. Offered for few input channels (image stems), where the grouped convolution's ``n``
    groups of one to three channels are slow (docs/performance.md, perf3).
    """
    n, kin = x.shape[:2]
    ph, pw = padding
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    (kh, kw), kout = module.kernel_size, g.shape[1]
    kernels = g.reshape(n * kout, 1, *g.shape[2:])
    per_channel = []
    for c in range(kin):
        corr = F.conv2d(xp[:, c].unsqueeze(0), kernels, stride=module.dilation, dilation=module.stride, groups=n)
        per_channel.append(corr[0, :, :kh, :kw].reshape(n, kout, kh, kw))  # the extent may exceed the kernel
    return Dense(torch.stack(per_channel, 2).reshape(n, -1))


def _conv_weight_paths(
    module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...], transient: bool
) -> dict[str, Callable[[], Piece]]:
    """The exact ways to get a convolution's per-sample weight gradients for these shapes, the
    preferred first (what runs untimed under deterministic algorithms, :mod:`.choice`): the
    correlation where it is offered (image stems, where timing picked it), else the patches path
    (picked for the demo network's other layers), else the grouped convolution, offered everywhere."""
    paths: dict[str, Callable[[], Piece]] = {}
    # on other devices the grouped convolution's kernels are the tuned ones
    cpu_2d = x.dim() == 4 and module.groups == 1 and x.device.type == "cpu"
    if cpu_2d and x.shape[1] <= MAX_CORRELATE_CHANNELS:
        paths["correlate"] = lambda: _conv2d_weight_per_sample_correlate(module, x, g, padding)
    if cpu_2d and math.prod(g.shape[2:]) <= MAX_PATCHES_OVER_GRADIENTS * module.out_channels:
        paths["patches"] = lambda: _conv2d_weight_per_sample_patches(module, x, g, padding, transient)
    paths["grouped"] = lambda: _conv_weight_per_sample(module, x, g, padding, transient)
    return paths


def _conv_factors(module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...], overlap: bool) -> Factored:
    """im2col factors ``(n, groups, S, kin)`` and ``(n, groups, S, kout)`` of a 1-d or 2-d convolution,
    the patches' columns ordered ``(kh, kw, channel)`` (:func:`_patch_view`), and with ``overlap``
    the input positions of :class:`InputOverlap`."""
    n, groups = x.shape[0], module.groups
    if x.dim() == 3:  # a 1-d convolution is a 2-d one of height 1
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel, dilation, pad, stride = (
            (1, *module.kernel_size),
            (1, *module.dilation),
            (0, *padding),
            (1, *module.stride),
        )
    else:
        kernel, dilation, pad, stride = module.kernel_size, module.dilation, padding, module.stride
    ho, wo = g.shape[2:]
    view = _patch_view(x, kernel, dilation, pad, stride, (ho, wo), groups)  # (n, groups, ho, wo, kh, kw, c)
    a = view.reshape(n, groups, ho * wo, -1)
    gf = g.reshape(n, groups, -1, ho * wo).transpose(2, 3)
    cin, (h, w) = x.shape[1] // groups, x.shape[2:]
    inputs = None
    if overlap:
        rows = x.reshape(n, groups, cin, h * w).permute(1, 3, 0, 2).reshape(groups, h * w * n, cin)
        pairs = patch_pairs(
            (h, w), (ho, wo), tuple(kernel), tuple(dilation), tuple(pad), tuple(stride), x.dtype, x.device
        )
        inputs = InputOverlap(rows, pairs)
    return Factored(a, gf, (*kernel, cin), (2, 0, 1), overlap=inputs)


def padded_channels_last(x: Tensor, padding: tuple[int, int]) -> Tensor:
    """``x`` ``(n, C, H, W)`` zero-padded by ``padding = (ph, pw)`` on each side, channels-last,
    in one copy (``F.pad`` then a channels-last copy made two: at b = 128 on a 64-channel 7x7
    input 0.52 -> 0.27 ms, benchmarks/kernels.py)."""
    ph, pw = padding
    if not (ph or pw):
        return x.contiguous(memory_format=torch.channels_last)
    n, channels, h, w = x.shape
    shape = (n, channels, h + 2 * ph, w + 2 * pw)
    xp = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).zero_()
    xp[:, :, ph : ph + h, pw : pw + w].copy_(x)
    return xp


def _patch_view(
    x: Tensor,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
    out: tuple[int, int],
    groups: int = 1,
) -> Tensor:
    """The patches of a 2-d convolution's input ``x`` ``(n, C, H, W)`` as a strided view
    ``(n, groups, ho, wo, kh, kw, C / groups)`` of the channels-last padded input (``out`` =
    ``(ho, wo)``). Its copy is im2col with contiguous channel runs, faster than ``F.unfold``
    (docs/performance.md, "im2col").
    """
    n, channels = x.shape[:2]
    xp = padded_channels_last(x, padding)
    sn, sc, sh, sw = xp.stride()
    (kh, kw), (dh, dw), (st_h, st_w), (ho, wo) = kernel, dilation, stride, out
    cin = channels // groups
    return xp.as_strided((n, groups, ho, wo, kh, kw, cin), (sn, cin * sc, st_h * sh, st_w * sw, dh * sh, dw * sw, sc))


@register_handler(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, unsupported=_conv_unsupported, autocast=True, parameter_names=_WEIGHT_AND_BIAS
)
def _conv(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    n = g.shape[0]
    pieces: dict[str, Piece] = {}
    if "weight" in names:
        x, padding = _conv_padded_input(module, a)
        groups, kout = module.groups, module.out_channels // module.groups
        kin = module.weight[0].numel()
        positions = math.prod(g.shape[2:])
        trivial = all(k == 1 for k in module.kernel_size) and all(s == 1 for s in module.stride) and not any(padding)
        inputs = (math.prod(x.shape[2:]), x.shape[1] // groups)  # T and cin of an InputOverlap
        use_factors = x.dim() in (3, 4) and (
            factored_is_cheaper(n, positions, kin, kout, groups, unfold=not trivial, overlap=inputs)
        )
        if use_factors:
            overlap = overlap_is_cheaper(n, *inputs, positions, kin, kout, groups)
            pieces["weight"] = replace(_conv_factors(module, x, g, padding, overlap), with_bias="bias" in names)
        else:
            key = (type(module), tuple(x.shape), tuple(g.shape), module.kernel_size, module.stride)
            # the strides too: the paths' costs depend on the memory layout (channels-last or not)
            key += (module.dilation, padding, module.groups, x.dtype, x.device, x.stride(), g.stride())

            untimed = "patches" if n * positions * kin < UNTIMED_PATCHES_BELOW else None

            def per_sample(transient: bool = False) -> Dense | PermutedDense:
                paths = _conv_weight_paths(module, x, g, padding, transient)
                return CONV_WEIGHT_PATHS(key, paths, untimed)[1]

            if module.weight.numel() > KEEP_FACTORS_ABOVE * (x[0].numel() + g[0].numel()):
                pieces["weight"] = KeptConv(module, x, g, padding, per_sample)
            else:
                pieces["weight"] = per_sample()
    if "bias" in names:
        pieces["bias"] = _bias_piece(g.reshape(n, g.shape[1], -1).sum(2), pieces.get("weight"))
    return pieces


def _affine_pieces(x_hat: Tensor, g: Tensor, channel_dims: int, names: frozenset) -> dict[str, Piece]:
    """Per-sample gradients of an elementwise affine ``w * x_hat + b`` (LayerNorm).

    ``x_hat`` and ``g`` are ``(n, P..., C...)``: the last ``channel_dims`` axes are the
    parameter's axes, everything between rows and them is summed over.
    """
    n = g.shape[0]
    width = math.prod(g.shape[g.dim() - channel_dims :])
    pieces: dict[str, Piece] = {}
    if "weight" in names:
        pieces["weight"] = Dense((g * x_hat).reshape(n, -1, width).sum(1))
    if "bias" in names:
        pieces["bias"] = Dense(g.reshape(n, -1, width).sum(1))
    return pieces


def _channel_affine_pieces(
    normalise: Callable[[Tensor], Tensor], a: Tensor, g: Tensor, names: frozenset
) -> dict[str, Piece]:
    """Per-sample gradients of a per-channel affine ``w_c * x_hat + b_c`` on ``(n, C, ...)``.

    ``x_hat = normalise(a)``; the weight's row ``i`` is ``sum_{...} g_i * x_hat_i`` per channel,
    ``(n, C)``, the product written over ``x_hat`` and summed over the trailing (contiguous)
    positions; the bias's is ``sum_{...} g_i``. One temporary the size of the activation; moving
    the channels last, as :func:`_affine_pieces` does for LayerNorm, made three more (the step's
    time is unchanged: docs/performance.md, mem6).
    """
    positions = tuple(range(2, g.dim()))
    pieces: dict[str, Piece] = {}
    if "weight" in names:
        product = normalise(a).mul_(g)
        pieces["weight"] = Dense(product.sum(positions) if positions else product)
    if "bias" in names:
        pieces["bias"] = Dense(g.sum(positions) if positions else g.clone())
    return pieces


@register_handler(nn.GroupNorm, autocast=True, parameter_names=_WEIGHT_AND_BIAS)
def _group_norm(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    return _channel_affine_pieces(lambda x: F.group_norm(x, module.num_groups, None, None, module.eps), a, g, names)


@register_handler(nn.LayerNorm, autocast=True, sequence_first=True, parameter_names=_WEIGHT_AND_BIAS)
def _layer_norm(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    x_hat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    return _affine_pieces(x_hat, g, len(module.normalized_shape), names)


def batch_norm_check(module: nn.Module) -> None:
    """Raise for a BatchNorm module in training mode (its outputs couple the samples)."""
    if module.training:
        raise ValueError(
            f"{type(module).__name__} in training mode normalises with batch statistics, so each output "
            "depends on the whole batch and the per-sample Gram matrix is undefined. Put it in eval mode, "
            "or replace it with GroupNorm (gramnewton.convert_batchnorm)."
        )


def _batch_norm_unsupported(module: nn.Module) -> str | None:
    # in eval mode PyTorch normalises with the running statistics whenever they exist, whatever
    # ``track_running_stats`` says now; without them (built without, or set to None afterwards, as
    # test-time adaptation does) with the batch's: the samples mix
    if module.running_mean is None or module.running_var is None:
        return "BatchNorm without running statistics uses batch statistics even in eval mode"
    return None


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_handler(
    *_BATCH_NORMS, unsupported=_batch_norm_unsupported, check=batch_norm_check, parameter_names=_WEIGHT_AND_BIAS
)
def _batch_norm_eval(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    # eval mode: a fixed per-channel affine map of the input, normalised by the running statistics
    return _channel_affine_pieces(
        lambda x: F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps),
        a,
        g,
        names,
    )


def _embedding_unsupported(module: nn.Module) -> str | None:
    # a sparse one is taken: its sparse gradients are autograd's weight gradient, never computed here
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq makes the gradient depend on the whole batch"
    return None


@register_handler(
    nn.Embedding, unsupported=_embedding_unsupported, sequence_first=True, parameter_names=fixed_names("weight")
)
def _embedding(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict[str, Piece]:
    """Per-sample gradients of the table's rows the batch uses (the others are zero for every
    sample): ``(n, u * dim)`` for the ``u`` distinct tokens of ``a`` (:class:`UsedRows`), the
    whole table's ``(n, vocab * dim)`` (:class:`Dense`) when the batch uses every row, or their
    factors (:class:`TokenRows`) when those are cheaper: more than ``T^2`` distinct tokens in the
    batch (``T`` tokens a sample) and the square product within ``MAX_FACTORED_ENTRIES``."""
    n, (vocab, dim) = g.shape[0], module.weight.shape
    tokens = a.reshape(n, -1)
    used, position = torch.unique(tokens, return_inverse=True)  # (u,), (n, T) into used
    u, positions = used.numel(), tokens.shape[1]
    if u > positions**2 and (n * positions) ** 2 <= MAX_FACTORED_ENTRIES:
        g = g.reshape(n, positions, dim)
        if module.padding_idx is not None:  # the padding row receives no gradient
            g = g.masked_fill((tokens == module.padding_idx).unsqueeze(2), 0.0)
        return {"weight": TokenRows(tokens, g, (vocab, dim))}
    index = position + torch.arange(n, device=a.device).unsqueeze(1) * u
    jac = g.new_zeros(n * u, dim)
    jac.index_add_(0, index.reshape(-1), g.reshape(-1, dim))
    jac = jac.view(n, u, dim)
    if module.padding_idx is not None:  # the padding row receives no gradient
        jac[:, used == module.padding_idx] = 0
    if u == vocab:
        return {"weight": Dense(jac.reshape(n, -1))}
    return {"weight": UsedRows(jac.reshape(n, -1), used, (vocab, dim))}
