"""Per-sample losses for the generalized Gram-Gauss-Newton step.

A loss ``L = sum_i l_i(f_i, y_i)`` of the network outputs ``f_i`` (``(k,)`` per sample) enters the
generalized Gauss-Newton step only through three per-sample quantities, all with respect to the
outputs (never the parameters):

- ``l_i``: the loss value (``per_sample``, shape ``(b,)``);
- ``g_i = dl_i/df_i``: its gradient (``gradient``, shape ``(b, k)``);
- ``B_i``: a square root of its Hessian, ``H_i = d^2 l_i/df_i^2 = B_i B_i^T`` (``hessian_sqrt``,
  shape ``(b, k, q)``), together with ``u_i`` solving ``B_i u_i = g_i`` (``sqrt_solve``, shape
  ``(b, q)``; it exists when ``g_i`` lies in the range of ``H_i``, which holds for every loss here).

The protocol (:class:`Loss`) is these methods plus ``check`` (validate and normalise the targets).
Write a new loss by subclassing :class:`Loss` and implementing ``check``, ``per_sample``,
``gradient`` and ``hessian_sqrt``; ``sqrt_solve`` defaults to the least-squares solution of
``B_i u_i = g_i`` (exact whenever ``g_i`` is in the range of ``B_i``).

Losses here: :class:`SquaredError` (``l = 1/2 ||f - y||^2``, Eq. 11 of the paper),
:class:`CrossEntropy` (softmax, integer labels or probability targets) and
:class:`BinaryCrossEntropy` (independent sigmoids, multi-label). Everything is torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .solve import NonFiniteError


class Loss:
    """A per-sample loss ``l_i(f_i, y_i)`` with the output-space derivatives GGN needs.

    All methods take detached outputs ``f`` of shape ``(b, k)`` and targets as returned by
    :meth:`check`; none of them builds an autograd graph.
    """

    name = "loss"

    def check(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Validate ``targets`` against ``outputs`` ``(b, k)`` and return them in the form the
        other methods use. Raises ``TypeError``/``ValueError`` with a message saying what is wrong."""
        raise NotImplementedError

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``l_i``, shape ``(b,)``."""
        raise NotImplementedError

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``g_i = dl_i/df_i``, shape ``(b, k)``."""
        raise NotImplementedError

    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``B_i`` with ``B_i B_i^T = d^2 l_i/df_i^2``, shape ``(b, k, q)``."""
        raise NotImplementedError

    def sqrt_solve(self, outputs: Tensor, targets: Tensor, sqrt_h: Tensor, grad: Tensor) -> Tensor:
        """``u_i`` with ``B_i u_i = g_i``, shape ``(b, q)``: the minimum-norm least-squares solution
        (``pinv(B_i) g_i``, singular values below ``max(k, q) eps`` times the largest dropped).

        Raises:
            ValueError: ``g_i`` is not in the range of ``B_i``: more than ``sqrt(eps) ||g_i||`` of it
                lies outside the span of the kept left singular vectors, and the least-squares
                ``u_i`` would silently drop that part from the step.
        """
        return _least_squares_root(self.name, sqrt_h, grad)


def _least_squares_root(name: str, sqrt_h: Tensor, grad: Tensor) -> Tensor:
    """``pinv(B_i) g_i`` ``(b, q)`` for ``sqrt_h`` ``(b, k, q)`` and ``grad`` ``(b, k)``, refusing a
    ``g_i`` outside the range of ``B_i``. The part outside is measured on the singular vectors,
    ``g_i - U_i U_i^T g_i``, not as ``B_i u_i - g_i``: that residual grows with ``cond(B_i)``
    (1e-3 of ``||g_i||`` for a full-rank float32 factor of condition 1e4) and would refuse it."""
    left, values, right_h = torch.linalg.svd(sqrt_h, full_matrices=False)  # (b, k, r), (b, r), (b, r, q)
    eps = torch.finfo(values.dtype).eps
    keep = values > max(sqrt_h.shape[-2:]) * eps * values.amax(-1, keepdim=True)
    coords = torch.where(keep, (left.transpose(-2, -1) @ grad.unsqueeze(-1)).squeeze(-1), 0.0)  # U_i^T g_i
    inverse = torch.where(keep, 1 / torch.where(keep, values, torch.ones_like(values)), 0.0)
    outside = (grad - (left @ coords.unsqueeze(-1)).squeeze(-1)).norm(dim=1)
    bad = outside > eps**0.5 * grad.norm(dim=1)
    if bool(bad.any()):
        raise ValueError(
            f"loss {name!r}: the output gradient g_i of {int(bad.sum())} of {grad.shape[0]} samples is not in the "
            "range of the Hessian factor B_i (no curvature along part of it, e.g. a term linear in the outputs), "
            "so the sample-space step would drop that part; give the loss curvature there or implement "
            "sqrt_solve; no parameter was changed"
        )
    return (right_h.transpose(-2, -1) @ (inverse * coords).unsqueeze(-1)).squeeze(-1)


def _check_outputs(outputs: Tensor, what: str) -> None:
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {getattr(outputs, 'dtype', type(outputs))}")
    if outputs.dim() != 2 or outputs.shape[0] == 0:
        raise ValueError(f"{what} must have shape (b, k) with b >= 1, got {tuple(outputs.shape)}")
    bad = ~torch.isfinite(outputs.detach())
    if bool(bad.any()):
        raise NonFiniteError(
            f"{int(bad.sum())} of {outputs.numel()} {what} are NaN or Inf (check the model and its inputs); "
            "no parameter was changed"
        )


def _check_float_targets(outputs: Tensor, targets: Tensor, what: str) -> Tensor:
    """Float targets of ``outputs``' shape (``(b,)`` allowed when ``k == 1``), in ``outputs``' dtype."""
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.dim() == 1 and outputs.shape[1] == 1:
        targets = targets.unsqueeze(1)
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{what} must have the outputs' shape {tuple(outputs.shape)}, got {tuple(targets.shape)} (no broadcasting)"
        )
    if not bool(torch.isfinite(targets).all()):
        raise ValueError(f"{what} contain NaN or Inf; no parameter was changed")
    return targets.detach().to(outputs.dtype)


class SquaredError(Loss):
    """``l_i = 1/2 ||f_i - y_i||^2``: ``g_i = f_i - y_i`` (the residual), ``B_i = I``, ``u_i = g_i``.

    With this loss the generalized step is exactly Eq. 11 of the paper; ``GramGaussNewton``
    (``loss="mse"``) then keeps its residual path, where the closure returns ``f - y``.
    """

    name = "mse"

    def check(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_outputs(outputs, "outputs")
        return _check_float_targets(outputs, targets, "targets")

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).pow(2).sum(1)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return outputs - targets

    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        b, k = outputs.shape
        return torch.eye(k, dtype=outputs.dtype, device=outputs.device).expand(b, k, k)

    def sqrt_solve(self, outputs: Tensor, targets: Tensor, sqrt_h: Tensor, grad: Tensor) -> Tensor:
        return grad


def _check_label_range(labels: Tensor, k: int) -> None:
    """Raise ``ValueError`` unless the integer ``labels`` ``(b,)`` lie in ``[0, k)``."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        hint = "; ignore_index (torch's -100) is not supported: leave those samples out of the batch" if low < 0 else ""
        raise ValueError(f"labels must be in [0, {k}) for {k} classes, got values in [{low}, {high}]{hint}")


def _distributions(outputs: Tensor, targets: Tensor) -> Tensor:
    """Float targets ``(b, k)`` checked to be probability rows and normalised, in ``outputs``' dtype.

    A row is taken when its entries are ``>= 0`` and it sums to 1 within the rounding of a softmax
    in the coarser of the two dtypes (``64 (1 + log2 k) eps``, at most 1e-2; float32 and k = 10:
    3.3e-5), the sum taken in float64: a float32 teacher's softmax for a float64 model, or
    bfloat16 label-smoothed targets, pass; rows off by more (a bug in the targets) are refused.
    Each row is then divided by its sum: ``g = p - y`` and ``H = diag(p) - p p^T`` are the
    derivatives of ``-sum y log p`` only for rows summing to 1.
    """
    probs = _check_float_targets(outputs, targets, "target probabilities")
    sums = targets.detach().double().sum(1, keepdim=True)
    k = outputs.shape[1]
    eps = max(torch.finfo(targets.dtype).eps, torch.finfo(outputs.dtype).eps)
    tol = min(64 * (1 + math.log2(k)) * eps, 1e-2)
    if bool((probs < 0).any()) or bool(((sums - 1).abs() > tol).any()):
        raise ValueError(
            "target probabilities must be non-negative with rows summing to 1 "
            f"(to {tol:.2g}), got rows summing to [{float(sums.min()):.9g}, {float(sums.max()):.9g}] and "
            f"min entry {float(probs.min()):.3g}"
        )
    return (targets.detach().double() / sums).to(outputs.dtype)


def _probability_floor(dtype: torch.dtype) -> float:
    """Smallest probability whose square root enters ``B_i``: ``eps^2`` keeps ``u_i = O(1/eps)``
    finite (``y/sqrt(p)`` would overflow for a softmax that underflowed to 0). The curvature of a
    class below it is taken as ``eps^2`` (in float32 1.4e-14), far below any other error of the step."""
    return torch.finfo(dtype).eps ** 2


class CrossEntropy(Loss):
    r"""Softmax cross-entropy ``l_i = -sum_c y_ic log p_ic``, ``p_i = softmax(f_i)``.

    Targets: class indices ``(b,)`` of an integer dtype in ``[0, k)``, or probabilities ``(b, k)``
    (float, non-negative, rows summing to 1 to a softmax's rounding; each row is divided by its
    sum). No ``ignore_index`` and no class weights: leave such samples out of the batch.

    Derivatives (the issue's factorisation): ``g_i = p_i - y_i``,
    ``H_i = diag(p_i) - p_i p_i^T = B_i B_i^T`` with ``B_i = diag(s_i) - p_i s_i^T``,
    ``s_i = sqrt(p_i)``, and ``u_i = s_i - y_i / s_i`` solves ``B_i u_i = g_i``
    (``diag(s_i) u_i = p_i - y_i`` and ``s_i^T u_i = sum p_i - sum y_i = 0``).
    """

    name = "cross_entropy"

    def check(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_outputs(outputs, "logits")
        b, k = outputs.shape
        if k < 2:
            raise ValueError(f"cross_entropy needs logits (b, k) with k >= 2 classes, got {tuple(outputs.shape)}")
        if not isinstance(targets, Tensor):
            raise TypeError(f"labels must be a tensor, got {type(targets).__name__}")
        if targets.dim() == 1:
            if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
                raise TypeError(
                    f"class labels of shape (b,) must be an integer tensor (int64), got {targets.dtype}; "
                    "for soft targets pass probabilities of shape (b, k)"
                )
            if targets.shape[0] != b:
                raise ValueError(f"{targets.shape[0]} labels for {b} samples (logits {tuple(outputs.shape)})")
            _check_label_range(targets, k)
            return torch.nn.functional.one_hot(targets.long(), k).to(outputs.dtype)
        if targets.dim() != 2 or tuple(targets.shape) != (b, k):
            raise ValueError(
                f"cross_entropy targets must be labels (b,) = ({b},) or probabilities (b, k) = ({b}, {k}), "
                f"got shape {tuple(targets.shape)}"
            )
        if not targets.is_floating_point() and not targets.is_complex():
            raise TypeError(
                f"integer targets of shape (b, k) = ({b}, {k}) ({targets.dtype}) look like one-hot labels: pass "
                "the class indices labels.argmax(1) (int64, shape (b,)), or probabilities labels.float()"
            )
        return _distributions(outputs, targets)

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        # -sum y log p, with 0 * log p = 0 for classes the target does not use: log p is -inf there
        # when the logits' gap overflows (0 * -inf would be NaN)
        logp = torch.log_softmax(outputs, dim=1)
        return -torch.where(targets == 0, torch.zeros_like(logp), targets * logp).sum(1)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.softmax(outputs, dim=1) - targets

    def _sqrt_p(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.softmax(outputs, dim=1)
        return p, p.clamp_min(_probability_floor(p.dtype)).sqrt()

    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        p, s = self._sqrt_p(outputs)
        return torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)

    def sqrt_solve(self, outputs: Tensor, targets: Tensor, sqrt_h: Tensor, grad: Tensor) -> Tensor:
        _, s = self._sqrt_p(outputs)
        return s - targets / s


def smooth_targets(logits: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
    """Label-smoothed probability targets ``(b, k)``: ``(1 - eps) y_i + eps / k``, ``y_i`` the one-hot
    of a label (``targets`` ``(b,)`` int64) or a probability row (``(b, k)``), ``eps = label_smoothing``
    in ``[0, 1)``. These are the targets of ``F.cross_entropy(logits, targets, label_smoothing=eps)``,
    so :class:`CrossEntropy` with them is that loss (per sample, summed instead of averaged).

    ``logits`` ``(b, k)`` give the shape and dtype only (at least float32: bfloat16 targets of
    autocast's logits would not sum to 1); targets are checked as
    :meth:`CrossEntropy.check` does (a clear error for bad labels). A closure for
    ``GramGaussNewton(model, loss="cross_entropy")`` then returns ``logits, smooth_targets(logits,
    labels, eps)``. NaN or Inf logits are not refused here but by the optimizer: on a step's first
    evaluation with a clear error, at the re-evaluation after a step that blew the logits up as a
    gain ratio of ``-inf`` (the step is rejected), where a refusal inside the closure would stop the
    run instead (docs/classification.md, thirty-third session).
    """
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    # at least float32: bfloat16 targets (autocast's logits) would be rounded to 0.91015625 and
    # 0.010009765625 for eps = 0.1, k = 10, rows summing to 1.0002
    dtype = torch.promote_types(logits.dtype, torch.float32)
    zeros = torch.zeros(logits.shape, dtype=dtype, device=logits.device)  # the shape and dtype only
    probs = CrossEntropy().check(zeros, targets)
    return (1 - label_smoothing) * probs + label_smoothing / probs.shape[1]


class BinaryCrossEntropy(Loss):
    r"""Independent sigmoids (multi-label): ``l_i = sum_c softplus(f_ic) - y_ic f_ic``.

    Targets: floats in ``[0, 1]`` of the outputs' shape (``(b,)`` when ``k == 1``).
    ``g_i = sigma(f_i) - y_i``, ``H_i = diag(sigma (1 - sigma))``, ``B_i = diag(sqrt(sigma (1 - sigma)))``,
    ``u_i = g_i / sqrt(sigma (1 - sigma))``: an example of a diagonal output Hessian.
    """

    name = "binary_cross_entropy"

    def check(self, outputs: Tensor, targets: Tensor) -> Tensor:
        _check_outputs(outputs, "logits")
        targets = _check_float_targets(outputs, targets, "binary targets")
        if bool(((targets < 0) | (targets > 1)).any()):
            raise ValueError(
                f"binary targets must lie in [0, 1], got [{float(targets.min()):.6g}, {float(targets.max()):.6g}]"
            )
        return targets

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (torch.nn.functional.softplus(outputs) - targets * outputs).sum(1)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.sigmoid(outputs) - targets

    def _sqrt_curvature(self, outputs: Tensor) -> Tensor:
        sig = torch.sigmoid(outputs)
        return (sig * (1 - sig)).clamp_min(_probability_floor(sig.dtype)).sqrt()

    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.diag_embed(self._sqrt_curvature(outputs))

    def sqrt_solve(self, outputs: Tensor, targets: Tensor, sqrt_h: Tensor, grad: Tensor) -> Tensor:
        return grad / self._sqrt_curvature(outputs)


LOSSES: dict[str, type[Loss]] = {
    SquaredError.name: SquaredError,
    CrossEntropy.name: CrossEntropy,
    BinaryCrossEntropy.name: BinaryCrossEntropy,
}


def get_loss(loss: str | Loss) -> Loss:
    """The :class:`Loss` named ``loss`` (``"mse"``, ``"cross_entropy"``, ``"binary_cross_entropy"``),
    or ``loss`` itself when it is already a :class:`Loss` instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]()
    raise ValueError(f"Invalid loss: {loss!r}; expected one of {tuple(LOSSES)} or a gramnewton.losses.Loss instance")
