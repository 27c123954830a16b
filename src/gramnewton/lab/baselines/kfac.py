"""K-FAC (Martens & Grosse, 2015) with the KFC factors for convolutions (Grosse & Martens, 2016).

The baseline of the paper's Fig. 4 (appendix D: lr 0.02, momentum 0.9, damping 0.1, inverses
every 100 steps). SGD and Adam are ``torch.optim``'s own; no maintained PyTorch K-FAC is on the
package index, so this module is a small self-contained one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

KFAC_LAYERS = (nn.Linear, nn.Conv2d)
KFAC_LOSSES = ("mse", "cross_entropy")


class KFAC(Optimizer):
    r"""K-FAC for ``nn.Linear`` and ``nn.Conv2d`` (``groups == 1``, zero padding); every other
    parameter gets plain SGD with momentum on its gradient.

    For a layer with weight matrix :math:`W` of shape ``(out, in)`` (a convolution's weight
    reshaped to ``(out, in_channels * kh * kw)``; the bias, if any, appended as the last column
    :math:`[W, b]`) the preconditioned gradient is, with factored Tikhonov damping and no
    :math:`\pi`-correction,

    .. math::
        V = (G + \sqrt{d}\, I)^{-1}\, \nabla_{[W,b]} L\, (A + \sqrt{d}\, I)^{-1},

    where :math:`d` is ``damping`` and :math:`A`, :math:`G` are running averages
    (``A <- decay * A + (1 - decay) * A_batch``, the first batch taken as is) of

    - :math:`A_\text{batch} = \frac{1}{bT} \sum_{i,t} \bar a_{it} \bar a_{it}^\top`: the layer's
      input (unfolded patches for a convolution, ``T`` output positions; ``T = 1`` for Linear)
      with a trailing 1 when the layer has a bias, shape ``(in[+1], in[+1])``;
    - :math:`G_\text{batch} = \frac{1}{b} \sum_{i,t} g_{it} g_{it}^\top` with
      :math:`g_{it} = b\, \partial L / \partial s_{it}`, shape ``(out, out)``.

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
    at the first step and every ``inverse_every`` steps after. With ``kl_clip`` set, all preconditioned gradients are scaled by
    :math:`\nu = \min(1, \sqrt{\text{kl\_clip} / (\text{lr}^2 \sum_l \langle V_l, \nabla_l \rangle)})`
    (Ba et al., 2017). Then, for every parameter with update direction :math:`v` (:math:`V` or
    the raw gradient), coupled weight decay and heavy-ball momentum as in ``torch.optim.SGD``:
    ``v <- v + weight_decay * w``, ``buf <- momentum * buf + v``, ``w <- w - lr * buf``.

    Args:
        model: the network; hooks on its Linear/Conv2d layers record inputs and output gradients
            of forward passes run in training mode with gradients enabled.
        lr, momentum, damping, weight_decay: as above (paper: 0.02, 0.9, 0.1, 1e-4).
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
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not damping > 0:
            raise ValueError(f"Invalid damping value: {damping}")
        if not 0 <= factor_decay < 1:
            raise ValueError(f"Invalid factor_decay value: {factor_decay}")
        if inverse_every < 1 or factor_every < 1:
            raise ValueError(f"Invalid inverse_every / factor_every value: {inverse_every} / {factor_every}")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"Invalid kl_clip value: {kl_clip}")
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
        super().__init__(model.parameters(), defaults)
        self.loss = loss
        self.layers = [m for m in model.modules() if _supported(m)]
        self._captured: dict[nn.Module, dict[str, Tensor]] = {}
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._forward_hook) for m in self.layers]

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        # Only training forwards that will be backpropagated feed the factors (not evaluation).
        if not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return
        grads: dict[str, Tensor] = {}
        self._captured[module] = {"input": inputs[0].detach(), "output": output, "grads": grads}

        # The hook may reference ``grads`` but not the record: a hook that reaches ``output``
        # makes a cycle through autograd's C++ hook table that no garbage collection breaks,
        # and every step's output and graph (its saved activations) would be kept for good.
        def save_grad(grad: Tensor) -> None:
            grads["grad_output"] = grad.detach()

        output.register_hook(save_grad)

    def backward_fisher(self, logits: Tensor) -> None:
        """Sampled-Fisher backward for ``loss="cross_entropy"`` (class docstring), from the logits
        ``(b, k)`` of this step's forward; call it before the training ``backward``. A no-op at
        steps where no factor is updated."""
        if self.loss != "cross_entropy":
            raise RuntimeError("backward_fisher is for KFAC(loss='cross_entropy')")
        records = [(layer, self._captured[layer]) for layer in self.layers if layer in self._captured]
        due = [r for layer, r in records if self._factors_due(layer)]
        if not due:
            return
        with torch.no_grad():
            probabilities = torch.softmax(logits.detach().float(), 1)
        if not bool(torch.isfinite(probabilities).all()):
            # a diverged run: there is no distribution to sample (multinomial would raise and end
            # the run); the factors keep their last values and the NaN loss shows the divergence
            for record in due:
                record["fisher_grad"] = None
            return
        with torch.no_grad():
            sampled = torch.multinomial(probabilities, 1).squeeze(1)
        with torch.enable_grad():
            total = F.cross_entropy(logits, sampled, reduction="sum")
            grads = torch.autograd.grad(total, [r["output"] for r in due], retain_graph=True, allow_unused=True)
        for record, grad in zip(due, grads):
            if grad is not None:
                record["fisher_grad"] = grad.detach()

    def _factors_due(self, layer: nn.Module) -> bool:
        steps = int(self.state[layer.weight].get("kfac_steps", 0))
        return steps % self.param_groups[0]["factor_every"] == 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """One K-FAC step from the gradients in ``.grad`` (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        directions: dict[Tensor, Tensor] = {}
        for layer in self.layers:
            record = self._captured.get(layer)
            if record is None or "grad_output" not in record["grads"] or layer.weight.grad is None:
                continue
            directions.update(self._precondition(layer, record, group))
        self._captured.clear()
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

    @staticmethod
    def _update_factors(
        state: dict[str, Any], layer: nn.Module, inputs: Tensor, grad_output: Tensor, decay: float
    ) -> None:
        """Running averages ``A``, ``G`` of this batch's Kronecker factors (the batch's own at first)."""
        a_batch, g_batch = batch_factors(layer, inputs, grad_output)
        if "A" not in state:
            state["A"], state["G"] = a_batch, g_batch
        else:
            state["A"].mul_(decay).add_(a_batch, alpha=1 - decay)
            state["G"].mul_(decay).add_(g_batch, alpha=1 - decay)

    def _precondition(self, layer: nn.Module, record: dict[str, Tensor], group: dict[str, Any]) -> dict[Tensor, Tensor]:
        """Update ``layer``'s factors (and inverses when due); return ``{param: V part}``."""
        state = self.state[layer.weight]
        steps = int(state.get("kfac_steps", 0))
        if steps % group["factor_every"] == 0:
            grad_output = record["grads"]["grad_output"]
            if self.loss == "cross_entropy":
                if "fisher_grad" not in record:
                    raise RuntimeError("KFAC(loss='cross_entropy'): call backward_fisher(logits) before step()")
                fisher = record["fisher_grad"]  # None: a diverged step, the factors keep their values
                # per-sample gradients of the sampled loss; batch_factors expects dL/ds of a mean
                grad_output = None if fisher is None else fisher / record["input"].shape[0]
            if grad_output is not None:
                self._update_factors(state, layer, record["input"], grad_output, group["factor_decay"])
        if steps % group["inverse_every"] == 0 and "A" in state:
            shift = group["damping"] ** 0.5
            state["A_inv"] = damped_inverse(state["A"], shift)
            state["G_inv"] = damped_inverse(state["G"], shift)
        state["kfac_steps"] = torch.tensor(float(steps + 1))
        if "A_inv" not in state:  # diverged before the first factors: nothing to precondition with
            return split_matrix(layer, gradient_matrix(layer))
        v = state["G_inv"] @ gradient_matrix(layer) @ state["A_inv"]
        return split_matrix(layer, v)

    def _kl_scale(self, directions: dict[Tensor, Tensor], group: dict[str, Any]) -> float:
        if group["kl_clip"] is None or not directions:
            return 1.0
        vg = sum(float((v * p.grad).sum()) for p, v in directions.items())
        if vg <= 0:
            return 1.0
        return min(1.0, (group["kl_clip"] / (group["lr"] ** 2 * vg)) ** 0.5)

    def remove_hooks(self) -> None:
        """Detach the hooks from the model (the optimizer then acts as SGD with momentum)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return isinstance(module, nn.Linear)


def layer_inputs(layer: nn.Module, x: Tensor) -> Tensor:
    """Rows :math:`\\bar a_{it}` of shape ``(b*T, in[+1])``: the input, or its unfolded patches."""
    if isinstance(layer, nn.Conv2d):
        # im2col as a convolution with one-hot kernels: F.unfold was ~10x slower than the
        # equivalent convolution on our CPU. Channel c, offset (i, j) lands in row
        # c*kh*kw + i*kw + j, the order of F.unfold and of the flattened weight.
        k = x.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
        eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, x.shape[1], *layer.kernel_size)
        patches = F.conv2d(x, eye, None, layer.stride, layer.padding, layer.dilation)  # (b, in, Ho, Wo)
        rows = patches.movedim(1, -1).reshape(-1, k)
    else:
        rows = x.reshape(-1, x.shape[-1])
    if layer.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def batch_factors(layer: nn.Module, x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """``(A_batch, G_batch)`` of the class docstring from the layer input ``x`` and ``dL/ds``.

    ``x``: ``(b, in)`` or ``(b, C, H, W)``; ``grad_output``: ``(b, out)`` or ``(b, out, Ho, Wo)``.
    """
    b = x.shape[0]
    a = layer_inputs(layer, x)
    g = grad_output.movedim(1, -1).reshape(-1, grad_output.shape[1]) * b  # (b*T, out)
    return a.T @ a / a.shape[0], g.T @ g / b


def damped_inverse(factor: Tensor, shift: float) -> Tensor:
    """``(factor + shift * I)^{-1}``, computed in float64, returned in the factor's dtype."""
    eye = torch.eye(factor.shape[0], dtype=torch.float64, device=factor.device)
    return torch.linalg.inv(factor.double() + shift * eye).to(factor.dtype)


def gradient_matrix(layer: nn.Module) -> Tensor:
    """``[grad W, grad b]`` of shape ``(out, in[+1])``."""
    grad = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        grad = torch.cat([grad, layer.bias.grad.unsqueeze(1)], dim=1)
    return grad


def split_matrix(layer: nn.Module, v: Tensor) -> dict[Tensor, Tensor]:
    """Inverse of :func:`gradient_matrix`: ``{weight: (out, ...) part, bias: last column}``."""
    parts = {layer.weight: v[:, : layer.weight[0].numel()].reshape(layer.weight.shape)}
    if layer.bias is not None:
        parts[layer.bias] = v[:, -1].contiguous()
    return parts
