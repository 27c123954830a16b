"""Forward Laplacian: ``u``, ``grad u`` and ``Laplace u`` of an MLP in one forward pass (torch only).

A physics-informed residual needs input derivatives of the network. Taken with
``torch.autograd.grad(create_graph=True)`` they put double-backward nodes in the graph, which the
hooks engine cannot see through (:mod:`gramnewton.engines.locality` routes such parameters to
the slow reference engine); taken with ``torch.func`` they need the ``functional`` engine's
``vmap(jacrev(hessian))``. Propagating the derivatives *forward* (Taylor mode, the "forward
Laplacian" of Li et al. 2023) avoids both: every layer maps a stack of ``C = d + 2`` channels
per sample,

    channel 0: the value ``a``;  channels ``1..d``: ``d_k a = da/dx_k``;  channel ``d+1``: ``Lap a``,

and the residual's graph is made of the model's own ``nn.Linear`` calls (on ``(n, C, width)``
tensors: the channels are positions, as for a sequence) and elementwise operations. Row ``i`` of
every tensor is sample ``i``, and the residuals reach a weight only through its module's output,
so the hooks engine computes the exact per-sample Jacobian with its Linear handler
(per-sample weight gradient ``sum_c g_c a_c^T``), with no input derivative in the graph.

Per layer:

- ``z = W a + b``, ``d_k z = W d_k a``, ``Lap z = W Lap a`` (the bias on the value only). The
  module is called once on the stack ``[a, a + d_1 a, ..., a + d_d a, a + Lap a]`` and the value
  row subtracted from the others: ``W (a + D) + b - (W a + b) = W D``. This keeps the bias a
  parameter used only inside its module (subtracting ``b`` outside would be a foreign use); the
  rounding error is ``eps |W a + b|``, far below float64 tolerances.
- ``a' = s(z)``, ``d_k a' = s'(z) d_k z``, ``Lap a' = s'(z) Lap z + s''(z) sum_k (d_k z)^2``
  (the sum over the Laplacian's coordinates ``dims``).

Cost: ``C`` times the forward pass; for the Gram matrix the hooks engine's per-sample gradients
sum over the ``C`` channels (a batched ``(out, C) @ (C, in)`` product per sample and layer).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# activation -> (s'(z), s''(z)) as functions of z and t = s(z)
Derivatives = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _tanh(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    first = 1 - t * t
    return first, -2 * t * first


def _sigmoid(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    first = t * (1 - t)
    return first, first * (1 - 2 * t)


def _sin(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return torch.cos(z), -t


def _identity(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(z), torch.zeros_like(z)


def _silu(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig)), sig * (1 - sig) * (2 + z * (1 - 2 * sig))


def _softplus(layer: nn.Module) -> Derivatives:
    """``nn.Softplus(beta, threshold)``: ``log(1 + exp(beta z)) / beta``, and ``z`` itself where
    ``beta z > threshold`` (torch's linear zone, whose derivatives are 1 and 0: what autograd
    differentiates there, so the propagation stays exact on both sides)."""
    beta, threshold = float(layer.beta), float(layer.threshold)

    def derivatives(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        linear = beta * z > threshold
        sig = torch.sigmoid(beta * z)
        first = torch.where(linear, torch.ones_like(z), sig)
        second = torch.where(linear, torch.zeros_like(z), beta * sig * (1 - sig))
        return first, second

    return derivatives


def _linear(layer: nn.Linear, value: Tensor, derivatives: Tensor) -> tuple[Tensor, Tensor]:
    """``(W a + b, W D)`` for ``a`` ``(n, in)`` and ``D`` ``(n, d + 1, in)``: one call of ``layer``
    on ``[a, a + D]``, the value row subtracted from the others (see the module docstring)."""
    out = layer(torch.cat([value.unsqueeze(1), value.unsqueeze(1) + derivatives], 1))
    return out[:, 0], out[:, 1:] - out[:, :1]


class Sin(nn.Module):
    """``sin(x)`` elementwise (SIREN-style PINNs); supported by :class:`ForwardLaplacian`."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


ACTIVATIONS: dict[type, Derivatives] = {
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
    Sin: _sin,
    nn.Identity: _identity,
    nn.SiLU: _silu,
}
# activations whose derivatives depend on the module's settings: type -> (module -> derivatives)
CONFIGURED: dict[type, Callable[[nn.Module], Derivatives]] = {nn.Softplus: _softplus}


def _derivatives(layer: nn.Module) -> Derivatives:
    """``(s'(z), s''(z))`` of one supported activation module (its exact type, not a subclass,
    whose ``forward`` may differ)."""
    kind = type(layer)
    return CONFIGURED[kind](layer) if kind in CONFIGURED else ACTIVATIONS[kind]


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has a user's forward hook or pre-hook, which may change its input or output.

    The hooks engine's own (``gramnewton.engines``: they record, never change a value; it hooks a
    Sequential that holds a parameter of its own) do not count.
    """
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(not _from_engine(hook) for hook in hooks)


def _from_engine(hook: Callable) -> bool:
    """Whether ``hook`` (or the function a ``functools.partial`` wraps) is defined in gramnewton's engines."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__module__", "").startswith("gramnewton.engines.")


def check_model(model: nn.Module) -> None:
    """Raise a ``ValueError`` unless the layer-by-layer propagation computes ``model(x)``.

    That needs an ``nn.Sequential`` whose ``forward`` is the layers in turn (not a subclass with
    its own, e.g. one that rescales its input), starting with an ``nn.Linear``, whose layers are
    Linear modules with ``nn.Linear``'s affine ``forward`` and supported activations of exactly
    their types; and no forward hook on the model or an activation (the propagation calls the
    Linear modules, so their hooks run, but it does not call the model, and it reads an
    activation's derivatives from its type, not from what a hook makes of its output).
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0 or not isinstance(model[0], nn.Linear):
        raise ValueError("ForwardLaplacian needs an nn.Sequential that starts with an nn.Linear")
    if type(model).forward is not nn.Sequential.forward:
        raise ValueError(
            f"ForwardLaplacian: {type(model).__name__} overrides nn.Sequential.forward, which the layer-by-layer "
            "propagation would skip; move that computation into a layer of the Sequential or use pinn.residual "
            'with engine="functional"'
        )
    if _hooked(model):
        raise ValueError(
            "ForwardLaplacian: the model has a forward hook or pre-hook, which the layer-by-layer propagation "
            'would skip; remove it or use pinn.residual with engine="functional"'
        )
    supported = ", ".join(t.__name__ for t in (*ACTIVATIONS, *CONFIGURED))
    for index, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            if type(layer).forward is not nn.Linear.forward:
                raise ValueError(
                    f"ForwardLaplacian: layer {index} is a {type(layer).__name__}, an nn.Linear subclass with its own "
                    'forward, which need not be affine; use pinn.residual with engine="functional"'
                )
        elif type(layer) not in ACTIVATIONS and type(layer) not in CONFIGURED:
            raise ValueError(
                f"ForwardLaplacian: layer {index} is a {type(layer).__name__}; supported are nn.Linear "
                f"and the elementwise activations {supported}"
            )
        elif _hooked(layer):
            raise ValueError(
                f"ForwardLaplacian: layer {index} ({type(layer).__name__}) has a forward hook or pre-hook, which "
                "its derivatives would not follow; remove it"
            )


def check_dtype(model: nn.Module, x: Tensor) -> None:
    """Raise a ``ValueError`` unless the points ``x`` have the dtype of ``model``'s parameters."""
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1:
        names = sorted(str(t) for t in dtypes)
        raise ValueError(
            f"ForwardLaplacian: the model's parameters mix dtypes {names}; convert it, e.g. model.double()"
        )
    (dtype,) = dtypes
    if x.dtype != dtype:
        raise ValueError(
            f"ForwardLaplacian: the points are {x.dtype} but the model's parameters are {dtype}; convert one "
            f"(points.to({dtype}) or model.to({x.dtype}))"
        )


@dataclass(frozen=True)
class Taylor:
    """Value and input derivatives of a network with ``k`` outputs at ``n`` points in ``d`` dimensions.

    Attributes:
        value: ``(n, k)``, ``u(x_i)``.
        gradient: ``(n, d, k)``, ``du/dx_j`` at ``x_i``.
        laplacian: ``(n, k)``, ``sum_{j in dims} d^2 u / dx_j^2`` at ``x_i``.
    """

    value: Tensor
    gradient: Tensor
    laplacian: Tensor

    def rows(self, start: int, stop: int) -> Taylor:
        """The same quantities at points ``start:stop``."""
        return Taylor(self.value[start:stop], self.gradient[start:stop], self.laplacian[start:stop])


class ForwardLaplacian:
    """``u``, ``grad u`` and ``Laplace u`` of ``model`` by forward Taylor-mode propagation.

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations
            (``nn.Tanh``, ``nn.Sigmoid``, :class:`Sin`, ``nn.Identity``, ``nn.SiLU``,
            ``nn.Softplus`` with any ``beta`` and ``threshold``), starting with a Linear. Its own
            Linear modules are called, so hooks on them (the hooks engine's) see every call.
        dims: the coordinates the Laplacian sums over (default all ``d``), e.g. ``range(1, d)``
            for the spatial Laplacian of ``u(t, x)``; the gradient has every coordinate.

    Raises:
        ValueError: for any other layer (e.g. ReLU, whose second derivative is not a function),
            a model that does not start with a Linear, anything :func:`check_model` refuses (a
            ``forward`` of the model's or a Linear's own, a hook on the model or an activation),
            or ``dims`` outside ``0..d-1``; when called, also for points of another dtype than
            the model's parameters (and on any of those if the model changed since).
    """

    def __init__(self, model: nn.Sequential, dims: Sequence[int] | None = None):
        check_model(model)
        self.model = model
        self.d = model[0].in_features
        self.dims = list(range(self.d)) if dims is None else list(dims)
        if not self.dims or any(not 0 <= j < self.d for j in self.dims) or len(set(self.dims)) != len(self.dims):
            raise ValueError(f"dims must be distinct coordinates in 0..{self.d - 1}, got {list(dims or [])}")

    def __call__(self, x: Tensor) -> Taylor:
        """The network's value and derivatives at the points ``x`` of shape ``(n, d)``."""
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"points must have shape (n, {self.d}), got {tuple(x.shape)}")
        check_model(self.model)  # again: layers or hooks may have changed since construction
        check_dtype(self.model, x)
        n, d = x.shape
        # channels 1..d: d_k x = e_k; channel d+1: Lap x = 0
        derivatives = torch.cat([torch.eye(d, dtype=x.dtype, device=x.device), x.new_zeros(1, d)])
        value, derivatives = x, derivatives.expand(n, d + 1, d)
        for layer in self.model:
            if isinstance(layer, nn.Linear):
                value, derivatives = _linear(layer, value, derivatives)
            else:
                t = layer(value)
                first, second = _derivatives(layer)(value, t)
                grad, lap = derivatives[:, :d], derivatives[:, d]
                curvature = (grad[:, self.dims] ** 2).sum(1)
                lap = first * lap + second * curvature
                value, derivatives = t, torch.cat([first.unsqueeze(1) * grad, lap.unsqueeze(1)], 1)
        return Taylor(value, derivatives[:, :d], derivatives[:, d])
