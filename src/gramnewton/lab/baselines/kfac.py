"""K-FAC (Martens & Grosse, 2015) with the KFC factors for convolutions (Grosse & Martens, 2016).

The baseline of the paper's Fig. 4 (appendix D: lr 0.02, momentum 0.9, damping 0.1, inverses
every 100 steps). SGD and Adam are ``torch.optim``'s own; no maintained PyTorch K-FAC is on the
package index, so this module is a small self-contained one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

KFAC_LAYERS = (nn.Linear, nn.Conv2d)
KFAC_LOSSES = ("mse", "cross_entropy")


class KFAC(Optimizer):
    r"""K-FAC for ``nn.Linear`` and ``nn.Conv2d`` (``groups == 1``, ``padding_mode="zeros"``); every
    other parameter gets plain SGD with momentum on its gradient, and so do the parameters of such
    a layer that another module also holds (tied weights: their gradient is not the layer's alone).

    For a layer with weight matrix :math:`W` of shape ``(out, in)`` (a convolution's weight
    reshaped to ``(out, in_channels * kh * kw)``; the bias, if any, appended as the last column
    :math:`[W, b]`) the preconditioned gradient is, with factored Tikhonov damping and no
    :math:`\pi`-correction,

    .. math::
        V = (G + \sqrt{d}\, I)^{-1}\, \nabla_{[W,b]} L\, (A + \sqrt{d}\, I)^{-1},

    where :math:`d` is ``damping`` and :math:`A`, :math:`G` are running averages
    (``A <- decay * A + (1 - decay) * A_batch``, the first batch taken as is) of

    - :math:`A_\text{batch} = \frac{1}{bT} \sum_{i,t} \bar a_{it} \bar a_{it}^\top`: the layer's
      input (unfolded patches for a convolution) with a trailing 1 when the layer has a trainable
      bias, shape ``(in[+1], in[+1])``;
    - :math:`G_\text{batch} = \frac{1}{b} \sum_{i,t} g_{it} g_{it}^\top` with
      :math:`g_{it} = b\, \partial L / \partial s_{it}`, shape ``(out, out)``;

    the positions ``t`` (``T`` in all) are a convolution's output pixels, a Linear's leading
    dimensions after the batch (a sequence's tokens; ``T = 1`` for a ``(b, in)`` input) and, for a
    layer called several times (a shared layer, or forward and backward passes accumulated before
    one step), the positions of every call backpropagated through since the last :meth:`zero_grad`
    or step (K-FAC-expand; a ``torch.autograd.grad`` through the layer counts as a backward).
    Calls of different batch sizes (a last, smaller micro-batch) each bring
    :math:`\frac{1}{b} \sum_{i,t} g_{it} g_{it}^\top` with their own ``b``.

    **Loss scaling.** :math:`L` is the mini-batch MSE, ``mean_i mean_c (f_ic - y_ic)^2`` (what
    :func:`~gramnewton.lab.experiments.training.make_train_step` backpropagates), so
    :math:`b\, \partial L / \partial s_{it}` is the gradient of sample ``i``'s own loss
    ``mean_c r_ic^2`` with respect to the pre-activation ``s_it``: :math:`G` is the
    *empirical* Fisher factor of that per-sample loss (the gradients of the training backward,
    no sampled targets, no extra backward). For a convolution the sum over positions in
    :math:`G` and the mean in :math:`A` make :math:`A \otimes G` equal KFC's
    :math:`\Omega \otimes \Gamma`.

    **Cross-entropy** (``loss="cross_entropy"``): :math:`G` is the factor of the *true* Fisher
    (the cross-entropy's output Hessian ``diag(p) - p p^T``), estimated as in Martens & Grosse
    (2015, Section 5) by one sampled backward: after the forward, :meth:`backward_fisher` draws
    ``y_hat_i ~ softmax(f_i)`` and backpropagates ``sum_i CE(f_i, y_hat_i)`` to the layers' outputs
    only (no parameter gradient); :math:`g_{it}` is then sample ``i``'s gradient of that loss. It
    runs only at steps where the factors are updated.

    Factors are updated at a layer's first step and every ``factor_every`` steps after (the
    batch factors cost about a weight gradient per layer); the inverses
    :math:`(A + \sqrt{d} I)^{-1}`, :math:`(G + \sqrt{d} I)^{-1}` are recomputed (in float64)
    at the first step and every ``inverse_every`` steps after. Batch factors that are not finite
    (a diverged step: NaN gradients) are left out, so the factors keep their last values while the
    step itself, like SGD's, shows the divergence; a layer whose bias is frozen or unfrozen starts
    new factors of the new shape. With ``kl_clip`` set, all preconditioned gradients are scaled by
    :math:`\nu = \min(1, \sqrt{\text{kl\_clip} / (\text{lr}^2 \sum_l \langle V_l, \nabla_l \rangle)})`
    (Ba et al., 2017). Then, for every parameter with update direction :math:`v` (:math:`V` or
    the raw gradient), coupled weight decay and heavy-ball momentum as in ``torch.optim.SGD``:
    ``v <- v + weight_decay * w``, ``buf <- momentum * buf + v``, ``w <- w - lr * buf``.

    Args:
        model: the network; hooks on its Linear/Conv2d layers record inputs and output gradients
            of forward passes run in training mode with gradients enabled.
        lr, momentum, damping, weight_decay: as above (paper: 0.02, 0.9, 0.1, 1e-4). Every
            hyper-parameter is checked at construction and, when set in ``param_groups`` later
            (a scheduler), at each step before anything changes.
        factor_decay: running-average weight of the old factors.
        factor_every: steps between factor updates (10, as in the common PyTorch K-FAC).
        inverse_every: steps between inverse updates (paper: 100).
        kl_clip: trust-region bound on the step, or ``None`` for no clipping.
        loss: ``"mse"`` (empirical Fisher of the training backward) or ``"cross_entropy"``
            (sampled Fisher; call :meth:`backward_fisher` with the logits before each step).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        >>> opt = KFAC(model)
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> opt.zero_grad(); (model(x) - y).pow(2).mean().backward(); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float = 0.02,
        momentum: float = 0.9,
        damping: float = 0.1,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_every: int = 10,
        inverse_every: int = 100,
        kl_clip: float | None = 1e-3,
        loss: str = "mse",
    ):
        if loss not in KFAC_LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; expected one of {KFAC_LOSSES}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            factor_decay=factor_decay,
            factor_every=factor_every,
            inverse_every=inverse_every,
            kl_clip=kl_clip,
        )
        check_hyper_parameters(defaults)
        super().__init__(model.parameters(), defaults)
        self.loss = loss
        self.layers = kfac_layers(model)
        # Calls of each layer that may still be backpropagated, with their outputs (what
        # backward_fisher differentiates); forgotten at each forward of the model and each step.
        self._captured: dict[nn.Module, list[dict[str, Any]]] = {}
        # (call, dL/ds) of each call backpropagated through since the last zero_grad or step: the
        # factors' rows. The hooks append to these lists, so they are emptied in place.
        self._backpropagated: dict[nn.Module, list[tuple[dict[str, Any], Tensor]]] = {m: [] for m in self.layers}
        # on during backward_fisher: its gradients reach the hooks too, and are not ``.grad``'s
        self._fisher_pass = {"on": False}
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._forward_hook) for m in self.layers]
        self._handles.append(model.register_forward_pre_hook(self._forget_pending_calls))

    def _forget_pending_calls(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        # a new forward of the model: the outputs of the last one are no longer needed (a call of it
        # backpropagated later still reaches the factors through its hook)
        self._captured.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Only training forwards that will be backpropagated feed the factors (not evaluation).
        if not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()
        # an unbatched call (a Linear's (in,), a convolution's (C, H, W)) is a batch of one
        unbatched = x.dim() == (1 if isinstance(module, nn.Linear) else 3)
        call: dict[str, Any] = {"input": x.unsqueeze(0) if unbatched else x}
        self._captured.setdefault(module, []).append({"output": output, "call": call})
        backpropagated, fisher_pass = self._backpropagated[module], self._fisher_pass

        # The hook may reference ``call`` and the lists but not the optimizer or ``output``: a hook
        # that reaches ``output`` makes a cycle through autograd's C++ hook table that no garbage
        # collection breaks, and every step's output and graph (its saved activations) would be kept.
        def save_grad(grad: Tensor) -> None:
            if not fisher_pass["on"]:
                backpropagated.append((call, (grad.unsqueeze(0) if unbatched else grad).detach()))

        output.register_hook(save_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim``'s; the calls whose gradients it clears no longer count in the factors."""
        super().zero_grad(set_to_none)
        for calls in self._backpropagated.values():
            calls.clear()

    def backward_fisher(self, logits: Tensor) -> None:
        """Sampled-Fisher backward for ``loss="cross_entropy"`` (class docstring), from the logits
        ``(b, k)`` of this step's forward; call it before the training ``backward``. A no-op at
        steps where no factor is updated."""
        if self.loss != "cross_entropy":
            raise RuntimeError("backward_fisher is for KFAC(loss='cross_entropy')")
        due = [record for layer in self.layers if self._factors_due(layer) for record in self._captured.get(layer, [])]
        if not due:
            return
        with torch.no_grad():
            probabilities = torch.softmax(logits.detach().float(), 1)
        if not bool(torch.isfinite(probabilities).all()):
            # a diverged run: there is no distribution to sample (multinomial would raise and end
            # the run); the factors keep their last values and the NaN loss shows the divergence
            for record in due:
                record["call"]["fisher_grad"] = None
            return
        with torch.no_grad():
            sampled = torch.multinomial(probabilities, 1).squeeze(1)
        with torch.enable_grad():
            total = F.cross_entropy(logits, sampled, reduction="sum")
            self._fisher_pass["on"] = True
            try:
                outputs = [r["output"] for r in due]
                grads = torch.autograd.grad(total, outputs, retain_graph=True, allow_unused=True)
            finally:
                self._fisher_pass["on"] = False
        for record, grad in zip(due, grads):
            # a call the logits do not depend on has a zero Fisher gradient
            record["call"]["fisher_grad"] = torch.zeros_like(record["output"]) if grad is None else grad.detach()

    def _factors_due(self, layer: nn.Module) -> bool:
        """Whether this step updates ``layer``'s factors: every ``factor_every``-th step, and any step
        until it has finite factors of its current shape (first step, a bias frozen or unfrozen)."""
        state = self.state[layer.weight]
        if "A" not in state or state["A"].shape[0] != factor_width(layer):
            return True
        return int(state["kfac_steps"]) % self.param_groups[0]["factor_every"] == 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One K-FAC step from the gradients in ``.grad`` (``closure`` re-evaluates the loss)."""
        for group in self.param_groups:
            check_hyper_parameters(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        # every refusal before the first change: an error leaves parameters and state as they were
        rows = {
            layer: self._factor_rows(layer)
            for layer in self.layers
            if layer.weight.grad is not None and self._backpropagated[layer]
        }
        directions: dict[Tensor, Tensor] = {}
        for layer, layer_rows in rows.items():
            directions.update(self._precondition(layer, layer_rows, group))
        self._captured.clear()
        for calls in self._backpropagated.values():
            calls.clear()
        scale = self._kl_scale(directions, group)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                v = directions[p] * scale if p in directions else p.grad.clone()
                if group["weight_decay"]:
                    v.add_(p, alpha=group["weight_decay"])
                state = self.state[p]
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    state["momentum_buffer"] = v if buf is None else buf.mul_(group["momentum"]).add_(v)
                    v = state["momentum_buffer"]
                p.add_(v, alpha=-group["lr"])
        return loss

    def _factor_rows(self, layer: nn.Module) -> tuple[list[Tensor], list[Tensor]] | None:
        """Inputs and ``dL/ds`` of ``layer``'s backpropagated calls for this step's batch factors, or
        ``None`` when no factor update is due (or a diverged Fisher backward left none)."""
        if not self._factors_due(layer):
            return None
        calls = self._backpropagated[layer]
        inputs = [call["input"] for call, _ in calls]
        if self.loss == "mse":
            return inputs, [grad for _, grad in calls]
        if any("fisher_grad" not in call for call, _ in calls):
            raise RuntimeError("KFAC(loss='cross_entropy'): call backward_fisher(logits) before step()")
        if any(call["fisher_grad"] is None for call, _ in calls):
            return None  # a diverged step: the factors keep their values
        # per-sample gradients of the sampled loss; batch_factors expects dL/ds of a mean
        return inputs, [call["fisher_grad"].reshape(grad.shape) / grad.shape[0] for call, grad in calls]

    @staticmethod
    def _update_factors(
        state: dict[str, Any], layer: nn.Module, inputs: list[Tensor], grad_outputs: list[Tensor], decay: float
    ) -> None:
        """Running averages ``A``, ``G`` of this step's Kronecker factors (the step's own at first, and
        after the shape changed); factors that are not finite (NaN gradients) are left out."""
        a_batch, g_batch = batch_factors(layer, inputs, grad_outputs)
        if not bool(torch.isfinite(a_batch).all() and torch.isfinite(g_batch).all()):
            return
        if "A" not in state or state["A"].shape != a_batch.shape:
            state["A"], state["G"] = a_batch, g_batch
        else:
            state["A"].mul_(decay).add_(a_batch, alpha=1 - decay)
            state["G"].mul_(decay).add_(g_batch, alpha=1 - decay)

    def _precondition(
        self, layer: nn.Module, rows: tuple[list[Tensor], list[Tensor]] | None, group: dict[str, Any]
    ) -> dict[Tensor, Tensor]:
        """Update ``layer``'s factors from ``rows`` (if given) and the inverses when due (or out of
        date); return ``{param: V part}``."""
        state = self.state[layer.weight]
        steps = int(state.get("kfac_steps", 0))
        if rows is not None:
            self._update_factors(state, layer, *rows, group["factor_decay"])
        if "A" in state and (
            steps % group["inverse_every"] == 0 or "A_inv" not in state or state["A_inv"].shape != state["A"].shape
        ):
            shift = group["damping"] ** 0.5
            state["A_inv"] = damped_inverse(state["A"], shift)
            state["G_inv"] = damped_inverse(state["G"], shift)
        state["kfac_steps"] = torch.tensor(float(steps + 1))
        if "A_inv" not in state or state["A_inv"].shape[0] != factor_width(layer):
            # no finite factors of this shape yet (diverged from the start): nothing to precondition with
            return split_matrix(layer, gradient_matrix(layer))
        v = state["G_inv"] @ gradient_matrix(layer) @ state["A_inv"]
        return split_matrix(layer, v)

    def _kl_scale(self, directions: dict[Tensor, Tensor], group: dict[str, Any]) -> float:
        if group["kl_clip"] is None or not directions or group["lr"] == 0:
            return 1.0  # (a scheduler's lr of 0: the step moves nothing)
        vg = sum(float((v * p.grad).sum()) for p, v in directions.items() if p.grad is not None)
        if vg <= 0:
            return 1.0
        return min(1.0, (group["kl_clip"] / (group["lr"] ** 2 * vg)) ** 0.5)

    def remove_hooks(self) -> None:
        """Detach the hooks from the model (the optimizer then acts as SGD with momentum)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check_hyper_parameters(group: Mapping[str, Any]) -> None:
    """Refuse, with a ``ValueError`` naming it, a hyper-parameter of ``group`` the step cannot use."""
    ranges = {
        "lr": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
        "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "damping": (lambda v: 0 < v < math.inf, "finite and > 0"),
        "weight_decay": (lambda v: 0 <= v < math.inf, "finite and >= 0"),
        "factor_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "kl_clip": (lambda v: v is None or v > 0, "> 0, or None for no clipping"),
        "factor_every": (lambda v: isinstance(v, Integral) and v >= 1, "an integer >= 1"),
        "inverse_every": (lambda v: isinstance(v, Integral) and v >= 1, "an integer >= 1"),
    }
    for name, (valid, what) in ranges.items():
        value = group[name]
        number = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
        if not ((number or (value is None and name == "kl_clip")) and valid(value)):
            raise ValueError(f"Invalid {name} value: {value!r} (must be {what})")


def kfac_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` K-FAC preconditions: the supported layers none of whose parameters
    another module also holds (a tied weight's gradient has parts the layer's factors do not see)."""
    holders = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return [
        m for m in model.modules() if _supported(m) and all(holders[id(p)] == 1 for p in m.parameters(recurse=False))
    ]


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def bias_column(layer: nn.Module) -> bool:
    """Whether the factors carry the bias column: the layer has a bias that is trained."""
    return layer.bias is not None and layer.bias.requires_grad


def factor_width(layer: nn.Module) -> int:
    """``in[+1]``: the side of ``layer``'s factor ``A``."""
    return layer.weight[0].numel() + bias_column(layer)


def layer_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """Rows :math:`\\bar a_{it}` of shape ``(b*T, in[+1])``: the input, or its unfolded patches."""
    if isinstance(layer, nn.Conv2d):
        # im2col as a convolution with one-hot kernels: F.unfold was ~10x slower than the
        # equivalent convolution on our CPU. Channel c, offset (i, j) lands in row
        # c*kh*kw + i*kw + j, the order of F.unfold and of the flattened weight. The layer's own
        # padding (a "same" string included) pads the patches as it pads the input.
        k = x.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
        eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, x.shape[1], *layer.kernel_size)
        patches = F.conv2d(x, eye, None, layer.stride, layer.padding, layer.dilation)  # (b, in, Ho, Wo)
        rows = patches.movedim(1, -1).reshape(-1, k)
    else:
        rows = x.reshape(-1, x.shape[-1])
    if bias_column(layer):
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def batch_factors(layer: nn.Module, inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(A_batch, G_batch)`` of the class docstring from the inputs ``x`` of the layer's calls and
    their ``dL/ds``, every call's positions counted, each call's ``g`` scaled by its own batch size.

    ``x``: ``(b, ..., in)`` or ``(b, C, H, W)``; ``dL/ds``: ``(b, ..., out)`` or ``(b, out, Ho, Wo)``.
    """
    a = torch.cat([layer_inputs(layer, x) for x in inputs])
    g_factor = 0
    for x, grad_output in zip(inputs, grad_outputs):
        # output channels last: a convolution's are dimension 1, a Linear's the last
        channels_last = grad_output.movedim(1, -1) if isinstance(layer, nn.Conv2d) else grad_output
        b = x.shape[0]
        g = channels_last.reshape(-1, channels_last.shape[-1]) * b  # (b*T, out)
        g_factor = g_factor + g.T @ g / b
    return a.T @ a / a.shape[0], g_factor


def damped_inverse(factor: Tensor, shift: float) -> Tensor:
    """``(factor + shift * I)^{-1}``, computed in float64, returned in the factor's dtype."""
    eye = torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
    return torch.linalg.inv(factor.double() + shift * eye).to(factor.dtype)


def gradient_matrix(layer: nn.Module) -> Tensor:
    """``[grad W, grad b]`` of shape ``(out, in[+1])`` (a trained bias without a gradient: zeros)."""
    grad = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if bias_column(layer):
        bias_grad = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(layer.bias)
        grad = torch.cat([grad, bias_grad.unsqueeze(1)], dim=1)
    return grad


def split_matrix(layer: nn.Module, v: Tensor) -> dict[Tensor, Tensor]:
    """Inverse of :func:`gradient_matrix`: ``{weight: (out, ...) part, bias: last column}``."""
    parts = {layer.weight: v[:, : layer.weight[0].numel()].reshape(layer.weight.shape)}
    if bias_column(layer):
        parts[layer.bias] = v[:, -1].contiguous()
    return parts
