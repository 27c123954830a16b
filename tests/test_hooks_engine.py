"""The hooks engine against the reference engine and a dense ``torch.func.jacrev`` Jacobian.

Every case runs in float64 under five cost-model settings: as chosen (``auto``), every weight
materialised (``dense``), every weight that can be factorised factorised (``factored``, a
convolution's ``A A^T`` from its patches), the same with every factorised convolution's ``A A^T``
from its input positions (``overlap``, :class:`InputOverlap`) and every convolution weight kept
as its input and output gradient (``kept``, :class:`KeptConv`),
so every code path of each layer is checked; the convolution cases also run with each per-sample
weight-gradient path forced (``grouped``, ``patches``, ``correlate``). Agreement is required to 1e-10 relative.
In the ``factored`` mode every Gram product of at least ``SYRK_MIN_ROWS`` rows is the symmetric
(lower-triangle) update, whatever its size (``SYRK_MIN_MULTIPLY_ADDS = 0``); in the others only
the large ones are, as in use.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from dense import DEVICE
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import gramnewton
from gramnewton.engines import HooksEngine, ReferenceEngine, handlers, recurrent
from gramnewton.engines import choice as choice_module
from gramnewton.engines.select import select_engine
from gramnewton.engines.workspace import Workspace, activated
from gramnewton.lab.models import ScalarBias, ScalarScale, TwoLayerNet, get_model

RTOL = 1e-10


class Tied(nn.Module):
    """Embedding whose weight is shared with the output layer (two supported modules)."""

    def __init__(self, vocab: int = 7, dim: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx).mean(1)))


class Reused(nn.Module):
    """One Linear called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Foreign(nn.Module):
    """A parameter used outside its module (``x @ emb.weight.T``): the hooks cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.emb(idx).mean(1))
        return h @ self.emb.weight.T


def weight_norm_head() -> nn.Module:
    """``weight_norm``'s pre-hook forms a Linear's ``weight`` from its parameters ``weight_g`` and
    ``weight_v`` before each call: the graph reaches them inside the Linear's own region, and the
    Linear's handler computes neither (``parameter_names``): the Linear's rows come through its
    graph, the formed weight included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the pre-hook form is deprecated, not gone
        hidden = nn.utils.weight_norm(nn.Linear(4, 5))
    return seq(hidden, nn.Tanh(), nn.Linear(5, 2))


class SpectralNormAttention(nn.Module):
    """``spectral_norm``'s pre-hook (the old form) forms an attention's ``in_proj_weight`` from
    ``in_proj_weight_orig`` (in eval mode, with its stored power-iteration vectors): the attention's
    handler computes the usual names only, so its rows come through its graph; ``out_proj``'s
    parameters, which the attention uses without calling ``out_proj``, are adopted there."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.attn = nn.utils.spectral_norm(attention, "in_proj_weight")
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:  # x (b, T, 3)
        h = torch.tanh(self.inp(x))
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


def pruned_conv() -> nn.Module:
    """``prune``'s pre-hook forms a convolution's ``weight`` as ``weight_orig * weight_mask``."""
    conv = nn.Conv2d(2, 3, 3, padding=1)
    nn.utils.prune.random_unstructured(conv, "weight", amount=0.5)
    return seq(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 1))


def output_changed_by_a_forward_hook(change: str) -> Callable[[], nn.Module]:
    """A user's forward hook on a Linear that replaces its output (``3 tanh(out)``), changes it in
    place (``out *= 2``) or adds the Linear's bias once more: the engine records the module's own
    output, before the user's hooks change it (recorded after them, each gave a wrong Gram), and
    the bias is then used outside its module."""
    hooks = {
        "replaced": lambda module, args, out: 3 * torch.tanh(out),
        "in_place": lambda module, args, out: out.mul_(2),
        "bias_again": lambda module, args, out: out + module.bias,
    }

    def build() -> nn.Module:
        hidden = nn.Linear(4, 5)
        hidden.register_forward_hook(hooks[change])
        return seq(hidden, nn.Tanh(), nn.Linear(5, 2))

    return build


def forward_replaced_on_the_instance() -> nn.Module:
    """A Linear whose ``forward`` is replaced on the instance (here it doubles the weight): its
    handler knows ``nn.Linear.forward``, so its parameters go to the reference engine."""
    hidden = nn.Linear(4, 5)
    hidden.forward = lambda x: F.linear(x, 2 * hidden.weight, hidden.bias)
    return seq(hidden, nn.Tanh(), nn.Linear(5, 2))


class Unknown(nn.Module):
    """A module with a raw parameter and no handler (its rows come through its own graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x)) @ self.w


class LearnedScale(nn.Module):
    """``s * x`` with a learnable scalar ``s``: a module no handler knows (its rows come from
    its own graph, ``handlers.AUTOGRAD_ROWS``)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class PositionEmbedding(nn.Module):
    """``x + p`` with a learnable ``p`` of one sample's shape."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.p


class GatedBlock(nn.Module):
    """``x + gamma * lin2(tanh(lin1(x)))``: a parameter of its own around two hooked Linears
    (regions nest: the block's region holds the Linears')."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(width, width), nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.lin2(torch.tanh(self.lin1(x)))


class FiLM(nn.Module):
    """Two inputs: ``h * (1 + c a) + c b`` with ``c`` a per-sample condition."""

    def __init__(self, width: int, conditions: int) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(conditions, width)), nn.Parameter(torch.randn(conditions, width))

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        return h * (1 + c @ self.a) + c @ self.b


class Conditioned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.film, self.head = nn.Linear(4, 5), FiLM(5, 2), nn.Linear(5, 2)

    def forward(self, z: Tensor) -> Tensor:
        return self.head(torch.tanh(self.film(self.lin(z[:, :4]), z[:, 4:])))


class Cube(torch.autograd.Function):
    """``x^3``, an autograd Function whose backward reads its gradient's values (a finiteness
    check), which batched backward passes refuse (data-dependent control flow under vmap)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("non-finite gradient")
        return 3 * x**2 * grad


class CubedScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> Tensor:
        return Cube.apply(x * self.w)


class PairOutput(nn.Module):
    """Returns ``(h, h^2)``: its second output is computed from its first inside it, so the
    gradient reaching ``h`` holds ``h^2``'s already (routed: rows through both would count it
    twice)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x * self.w
        return h, h * h


class PairUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.pair, self.head = nn.Linear(3, 4), PairOutput(4), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat(self.pair(torch.tanh(self.lin(x))), 1))


class PairAdopter(nn.Module):
    """Applies its child ``proj``'s parameters without calling ``proj`` (adopted, as an attention
    takes its ``out_proj``'s) and returns ``(h, h^2)``: entangled, so its adopted parameters are
    routed with its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.proj = nn.Parameter(torch.ones(4)), nn.Linear(3, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(F.linear(x, self.proj.weight, self.proj.bias)) * self.scale
        return h, h * h


class Concatenate(nn.Module):
    def forward(self, pair: tuple[Tensor, Tensor]) -> Tensor:
        return torch.cat(pair, 1)


class Encoder(nn.Module):
    """``TransformerEncoderLayer(batch_first=True)``: its attention (``MultiheadAttention``, no
    handler) returns ``(out, None)`` and uses ``out_proj``'s parameters without calling it."""

    def __init__(self, norm_first: bool = False, batch_first: bool = True) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=6, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.head, self.batch_first = nn.Linear(4, 2), batch_first

    def forward(self, x: Tensor) -> Tensor:  # x (b, T, 4) either way
        if self.batch_first:
            return self.head(self.layer(x).mean(1))
        return self.head(self.layer(x.transpose(0, 1)).mean(0))  # PyTorch's default (T, b, E) layout


class Decoder(nn.Module):
    """``TransformerDecoderLayer(batch_first=True)``: a causal self-attention on 3 target positions
    and a cross-attention to a memory of 5 (queries and keys of two lengths)."""

    def __init__(self) -> None:
        super().__init__()
        self.memory, self.target = nn.Linear(4, 4), nn.Linear(4, 4)
        self.layer = nn.TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x (b, 8, 4): 5 memory positions, then 3 target ones
        mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=x.dtype, device=x.device)
        out = self.layer(self.target(x[:, 5:]), torch.tanh(self.memory(x[:, :5])), tgt_mask=mask, tgt_is_causal=True)
        return self.head(out.mean(1))


class SequenceFirstLinear(nn.Module):
    """A Linear on ``(T, b, 4)``: its samples in dimension 1 (routed when ``T == b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:  # x (b, T, 4)
        return self.head(torch.tanh(self.norm(self.lin(x.transpose(0, 1)))).mean(0))


class Attention(nn.Module):
    """``MultiheadAttention`` called directly; with ``need_weights`` it returns two
    differentiable tensors, both followed; ``use_weights``: the residuals use the weights too."""

    def __init__(
        self, need_weights: bool, causal: bool = False, use_weights: bool = False, padding: bool = False
    ) -> None:
        super().__init__()
        self.inp, self.attn = nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(9 if use_weights else 4, 1)  # the weights (b, 5, 5) averaged over the queries
        self.need_weights, self.causal, self.use_weights, self.padding = need_weights, causal, use_weights, padding

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        mask = (
            nn.Transformer.generate_square_subsequent_mask(h.shape[1], device=h.device, dtype=h.dtype)
            if self.causal
            else None
        )
        pad = None
        if self.padding:  # every other sample's last two positions are padding
            pad = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
            pad[::2, -2:] = True
        out, weights = self.attn(h, h, h, need_weights=self.need_weights, attn_mask=mask, key_padding_mask=pad)
        return self.out(torch.cat([out.mean(1), weights.mean(1)], 1) if self.use_weights else out.mean(1))


class ScaledInPlaceAfter(nn.Module):
    """A learned scale whose output the caller then doubles in place (``h.mul_(2)``): its rows
    come through the graph edge of the module's own output (the tensor then stands for the
    doubled values and their graph, which raised "backward through the graph a second time")."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale, self.head = nn.Linear(3, 4), LearnedScale(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.tanh(self.lin(x)))
        h.mul_(2)
        return self.head(h)


class GatedTied(nn.Module):
    """A gate of its own, and its inner Linear's weight used again directly (``h @ lin.weight``:
    adopted) or registered on it too (``tied``): rows through its output would count the
    Linear's own use of the weight a second time, so the weight is routed."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        if tied:
            self.w = self.lin.weight
        self.tied = tied

    def forward(self, x: Tensor) -> Tensor:
        return (torch.tanh(self.lin(x)) * self.gate) @ (self.w if self.tied else self.lin.weight)


class Recurrent(nn.Module):
    """``RNN``/``LSTM``/``GRU`` (``layers`` deep) and a head on the last output (``output``),
    the last layer's final state ``h[-1]`` (``state``; the states are ``(layers, b, hidden)``:
    the batch in dimension 1), every output (``all``: the mean output and each final state), or
    the final state with the samples mixed after it (``mixed``: ``h - h.mean(0)``, whose rows are
    not the samples). ``batch_first=False`` runs it on the transposed ``(T, b, 3)`` input, whose
    output has the batch in dimension 1 too."""

    def __init__(
        self, kind: str, use: str, layers: int = 1, batch_first: bool = True, initial: bool = False, **options: Any
    ) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 5, num_layers=layers, batch_first=batch_first, **options)
        directions, state = 2 if options.get("bidirectional") else 1, options.get("proj_size") or 5
        width = state * directions
        self.head = nn.Linear(width + state + 5 * (kind == "LSTM") if use == "all" else width, 2)
        self.use, self.batch_first = use, batch_first
        # initial states computed from each sequence's first step: they depend on the parameters
        self.initial = nn.Linear(3, 5 * layers * directions) if initial else None

    def forward(self, x: Tensor) -> Tensor:
        args = []
        if self.initial is not None:
            h0 = torch.tanh(self.initial(x[:, 0])).view(x.shape[0], -1, 5).transpose(0, 1).contiguous()
            args = [(h0, 0.5 * h0) if isinstance(self.rnn, nn.LSTM) else h0]
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1), *args)
        out = out if self.batch_first else out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        if self.use == "all":
            return self.head(torch.cat([out.mean(1), *(s[-1] for s in states)], 1))
        h = states[0][-1]
        return self.head({"output": out[:, -1], "state": h, "mixed": h - h.mean(0)}[self.use])


class ParameterContainers(nn.Module):
    """A network written with ``nn.ParameterList`` and ``nn.ParameterDict``: their parameters are
    used by this module's forward (the containers are never called)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(3, 6) / 2), nn.Parameter(torch.randn(6, 6) / 3)])
        self.biases = nn.ParameterDict({"first": nn.Parameter(0.1 * torch.randn(6))})
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.weights[0] + self.biases["first"])
        return self.head(torch.tanh(h @ self.weights[1]))


class CellLoop(nn.Module):
    """An ``RNNCell``/``GRUCell``/``LSTMCell`` stepped over ``T`` inputs in a loop, a head on the
    last ``h`` (``c`` too for the LSTM with ``use="both"``); ``initial``: the first state from a
    Linear on the first input (a state that depends on parameters)."""

    def __init__(self, kind: str, use: str = "h", initial: bool = False, **options: Any) -> None:
        super().__init__()
        self.cell = getattr(nn, kind)(3, 5, **options)
        self.head = nn.Linear(10 if use == "both" else 5, 2)
        self.initial = nn.Linear(3, 5) if initial else None
        self.use = use

    def forward(self, x: Tensor) -> Tensor:
        state = None
        if self.initial is not None:
            h0 = torch.tanh(self.initial(x[:, 0]))
            state = (h0, -h0) if isinstance(self.cell, nn.LSTMCell) else h0
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        if isinstance(state, tuple):
            return self.head(torch.cat(state, 1) if self.use == "both" else state[0])
        return self.head(state)


class Split(nn.Module):
    """Returns ``(tanh(x) w, x^2 V)``: two batch-first tensors from two autograd nodes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.v = nn.Parameter(torch.randn(width, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(x) * self.w, (x * x) @ self.v


class WithPenalty(nn.Module):
    """Returns ``(tanh(x) w, sum(w^2))``: an output and a scalar auxiliary loss (no batch
    dimension), which the residuals do not use."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(x) * self.w, (self.w**2).sum()


class SplitDict(Split):
    """:class:`Split`'s two tensors in a dict (``{"main": ..., "aux": ...}``, as a Hugging Face
    ``ModelOutput`` is one)."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        main, aux = super().forward(x)
        return {"main": main, "aux": aux}


class SplitUser(nn.Module):
    """A head on both outputs of :class:`Split` (or of :class:`SplitDict`), or on its first (the
    second reaches nothing)."""

    def __init__(self, use: str, as_dict: bool = False) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(7 if use == "both" else 4, 2)
        self.split, self.use = (SplitDict if as_dict else Split)(4), use

    def forward(self, x: Tensor) -> Tensor:
        out = self.split(torch.tanh(self.lin(x)))
        a, c = (out["main"], out["aux"]) if isinstance(out, dict) else out
        return self.head(torch.cat([a, c], 1) if self.use == "both" else a)


class Index(nn.Module):
    """``x[i]``: one entry of the previous module's tuple."""

    def __init__(self, i: int) -> None:
        super().__init__()
        self.i = i

    def forward(self, x: tuple) -> Tensor:
        return x[self.i]


def seq(*mods: nn.Module) -> nn.Module:
    return nn.Sequential(*mods)


def images(c: int, h: int, w: int | None = None) -> Callable[[int], Tensor]:
    return lambda b: torch.randn(b, c, h, h if w is None else w)


def tokens(vocab: int, length: int) -> Callable[[int], Tensor]:
    return lambda b: torch.randint(0, vocab, (b, length))


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int], Tensor]
    batch: int = 4
    eval_mode: bool = False
    reference_params: int = 0  # parameter tensors expected to go to the reference engine
    extra: dict = field(default_factory=dict)


CASES = [
    Case("linear", lambda: seq(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)), lambda b: torch.randn(b, 5)),
    Case(
        "linear_nobias_k3",
        lambda: seq(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)),
        lambda b: torch.randn(b, 5),
    ),
    Case(
        "linear_sequence",
        lambda: seq(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2), nn.Flatten()),
        lambda b: torch.randn(b, 16, 2),
    ),
    Case(
        "linear_2_leading_dims",
        lambda: seq(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten()),
        lambda b: torch.randn(b, 2, 3, 6),
    ),
    Case(
        "conv1d",
        lambda: seq(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Conv1d(4, 2, 2, dilation=2), nn.Flatten()),
        lambda b: torch.randn(b, 3, 11),
    ),
    Case(
        "conv1d_groups_same",
        lambda: seq(nn.Conv1d(4, 6, 4, padding="same", groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(54, 1)),
        lambda b: torch.randn(b, 4, 9),
    ),
    Case(
        "conv2d_stride_pad",
        lambda: seq(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2)),
        images(3, 8),
    ),
    Case(
        "conv2d_dilation_nobias",
        lambda: seq(nn.Conv2d(2, 3, 3, dilation=2, padding=2, bias=False), nn.Tanh(), nn.Conv2d(3, 1, 2, stride=3)),
        images(2, 8, 7),
    ),
    Case(
        "conv2d_groups",
        lambda: seq(
            nn.Conv2d(4, 6, 3, groups=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(6, 6, 1, groups=3),
            nn.Flatten(),
            nn.Linear(6 * 25, 1),
        ),
        images(4, 5),
    ),
    Case(  # 14 rows: the patches path's chunks of samples (4, 4, 4, 2) are uneven
        "conv2d_b7_k2",
        lambda: seq(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 2)),
        images(3, 5),
        batch=7,
    ),
    Case(
        "conv2d_same_even_kernel",
        lambda: seq(nn.Conv2d(2, 3, (4, 2), padding="same"), nn.Tanh(), nn.Conv2d(3, 1, 3, padding="valid")),
        images(2, 6),
    ),
    Case(
        "conv2d_reflect_circular",
        lambda: seq(
            nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(3, 1, 3, padding=2, padding_mode="circular", stride=2),
        ),
        images(2, 6),
    ),
    Case(
        "conv2d_1x1_wide", lambda: seq(nn.Conv2d(32, 32, 1), nn.Tanh(), nn.Flatten(), nn.Linear(128, 1)), images(32, 2)
    ),
    Case(
        "conv3d",
        lambda: seq(
            nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 3 * 5, 1)
        ),
        lambda b: torch.randn(b, 2, 4, 4, 4),
    ),
    Case(
        "groupnorm",
        lambda: seq(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 1)),
        images(2, 5),
    ),
    Case(
        "layernorm",
        lambda: seq(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.LayerNorm((3, 6)), nn.Flatten(), nn.Linear(18, 2)),
        lambda b: torch.randn(b, 3, 5),
    ),
    Case(
        "batchnorm_eval",
        lambda: seq(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.BatchNorm1d(27), nn.Linear(27, 1)
        ),
        images(2, 5),
        eval_mode=True,
    ),
    Case(
        "scalar_bias_scale",
        lambda: seq(ScalarBias(), nn.Linear(4, 5), ScalarScale(), nn.Tanh(), ScalarBias(), nn.Linear(5, 1)),
        lambda b: torch.randn(b, 4),
    ),
    Case(
        "conv2d_b36_syrk",
        lambda: seq(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False),
            nn.Flatten(),
            nn.Linear(27, 1),
        ),
        images(2, 6),
        batch=36,
    ),
    Case(
        "conv2d_k2_odd_rows_syrk",
        lambda: seq(
            nn.Conv2d(3, 5, (3, 2), dilation=(1, 2), padding=(2, 1)), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 7 * 5, 2)
        ),
        images(3, 5),
        batch=17,
    ),
    Case("embedding", lambda: seq(nn.Embedding(9, 3, padding_idx=0), nn.Flatten(), nn.Linear(12, 2)), tokens(9, 4)),
    # a batch uses a few of 60 rows (handlers.UsedRows), padding among them; sparse gradients too
    Case(
        "embedding_used_rows",
        lambda: seq(nn.Embedding(60, 3, padding_idx=5), nn.Flatten(), nn.Linear(12, 2)),
        lambda b: torch.randint(0, 12, (b, 4)),
    ),
    # two tokens a sample of 60: more distinct tokens than 2^2, the factored form (handlers.TokenRows)
    Case(
        "embedding_token_rows",
        lambda: seq(nn.Embedding(60, 3, padding_idx=5), nn.Flatten(), nn.Linear(6, 2)),
        lambda b: torch.randint(0, 60, (b, 2)),
    ),
    Case("resnet8_fixup", lambda: get_model("resnet8_fixup"), images(3, 8)),
    Case("resnet8_gn", lambda: get_model("resnet8_gn", groups=4), images(3, 8)),
    Case("resnet8_gn_k3", lambda: get_model("resnet8_gn", num_outputs=3), images(3, 8)),
    Case(
        "wide_mlp",
        lambda: get_model("mlp", in_channels=6, hidden=(512,), act="tanh"),
        lambda b: torch.randn(b, 6),
        batch=8,
    ),
    Case("two_layer_k2", lambda: TwoLayerNet(5, width=64, num_outputs=2), lambda b: torch.randn(b, 5)),
    Case("reused_module", Reused, lambda b: torch.randn(b, 4)),
    Case("tied_embedding_output", Tied, tokens(7, 3)),
    Case("foreign_use", Foreign, tokens(6, 2), reference_params=1),
    Case("weight_norm_prehook", weight_norm_head, lambda b: torch.randn(b, 4)),
    # torch.nn.utils.parametrize: the module's rows through its own graph, for the originals
    Case(
        "weight_norm_parametrization",
        lambda: seq(nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 2)),
        lambda b: torch.randn(b, 4),
    ),
    Case(
        "weight_norm_conv_orthogonal_linear",
        lambda: seq(
            nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3, padding=1)),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 4),
            nn.Tanh(),
            nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)),
            nn.Linear(4, 2),
        ),
        images(2, 4),
    ),
    Case("pruned_prehook", pruned_conv, images(2, 3)),
    Case("spectral_norm_attention_prehook", SpectralNormAttention, lambda b: torch.randn(b, 5, 3), eval_mode=True),
    *(
        Case(f"forward_hook_{change}", output_changed_by_a_forward_hook(change), lambda b: torch.randn(b, 4), **kw)
        for change, kw in (("replaced", {}), ("in_place", {}), ("bias_again", {"reference_params": 1}))
    ),
    Case("unknown_module", Unknown, lambda b: torch.randn(b, 3)),
    Case(
        "learned_scale_first",
        lambda: seq(LearnedScale(), nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2)),
        images(2, 3),
    ),
    Case(
        "position_embedding",
        lambda: seq(
            PositionEmbedding(2, 3, 3), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 1)
        ),
        images(2, 3),
    ),
    Case("prelu_k2", lambda: seq(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 2)), lambda b: torch.randn(b, 4)),
    Case(
        "gated_block",
        lambda: seq(nn.Linear(3, 4), GatedBlock(4), nn.Tanh(), nn.Linear(4, 1)),
        lambda b: torch.randn(b, 3),
    ),
    Case("film_two_inputs", Conditioned, lambda b: torch.randn(b, 6)),
    # (h, h^2): one output computed from the other inside the module
    Case("tuple_output", PairUser, lambda b: torch.randn(b, 3), reference_params=1),
    Case(
        "tuple_output_adopted",
        lambda: nn.Sequential(PairAdopter(), Concatenate(), nn.Linear(8, 1)),
        lambda b: torch.randn(b, 3),
        reference_params=3,
    ),
    Case("two_outputs_both_used", lambda: SplitUser("both"), lambda b: torch.randn(b, 3)),
    Case("two_outputs_one_used", lambda: SplitUser("first"), lambda b: torch.randn(b, 3)),
    Case("two_outputs_in_a_dict", lambda: SplitUser("both", as_dict=True), lambda b: torch.randn(b, 3)),
    Case(
        "unused_scalar_second_output",
        lambda: seq(nn.Linear(3, 4), WithPenalty(4), Index(0), nn.Linear(4, 2)),
        lambda b: torch.randn(b, 3),
    ),
    # one autograd node's two outputs (y, [z]) in a nested list: both used, or y alone (z's hook sees None)
    Case("same_node_two_outputs", lambda: UsesBoth("both"), lambda b: torch.randn(b, 3)),
    Case("same_node_first_output_used", lambda: UsesBoth("first"), lambda b: torch.randn(b, 3)),
    Case("output_changed_in_place_after", ScaledInPlaceAfter, lambda b: torch.randn(b, 3)),
    # recurrent layers return (out, h) or (out, (h, c)), every one followed; h and c (layers, b, hidden)
    # have the batch in dimension 1 (a head on h[-1] read rows of h as samples: wrong or routed)
    Case("lstm_output", lambda: Recurrent("LSTM", "output"), lambda b: torch.randn(b, 4, 3)),
    Case("lstm_state", lambda: Recurrent("LSTM", "state"), lambda b: torch.randn(b, 4, 3)),
    Case("lstm_all_outputs", lambda: Recurrent("LSTM", "all"), lambda b: torch.randn(b, 4, 3)),
    Case("gru", lambda: Recurrent("GRU", "output"), lambda b: torch.randn(b, 4, 3)),
    Case("gru_state", lambda: Recurrent("GRU", "state"), lambda b: torch.randn(b, 4, 3)),
    Case("gru_2_layers_state", lambda: Recurrent("GRU", "state", layers=2), lambda b: torch.randn(b, 4, 3)),
    # sequence-first: the output (T, b, hidden) with T == b, the batch in dimension 1 known from the type
    Case("gru_sequence_first", lambda: Recurrent("GRU", "all", batch_first=False), lambda b: torch.randn(b, 4, 3)),
    Case("rnn_tanh_output", lambda: Recurrent("RNN", "output"), lambda b: torch.randn(b, 4, 3)),
    Case("gru_state_mixed", lambda: Recurrent("GRU", "mixed"), lambda b: torch.randn(b, 4, 3), reference_params=4),
    # the recurrent handler's options: two directions (the second runs backwards in time), ReLU,
    # no biases, initial states computed from the input, a projected LSTM (taken the general way)
    Case(
        "gru_bidirectional_2_layers",
        lambda: Recurrent("GRU", "all", layers=2, bidirectional=True),
        lambda b: torch.randn(b, 4, 3),
    ),
    Case(
        "lstm_bidirectional_sequence_first",
        lambda: Recurrent("LSTM", "all", batch_first=False, bidirectional=True),
        lambda b: torch.randn(b, 4, 3),
    ),
    Case(
        "rnn_relu_no_bias",
        lambda: Recurrent("RNN", "all", nonlinearity="relu", bias=False),
        lambda b: torch.randn(b, 4, 3),
    ),
    Case("gru_initial_state", lambda: Recurrent("GRU", "all", layers=2, initial=True), lambda b: torch.randn(b, 4, 3)),
    Case("lstm_initial_state", lambda: Recurrent("LSTM", "all", initial=True), lambda b: torch.randn(b, 4, 3)),
    Case("lstm_projection", lambda: Recurrent("LSTM", "all", proj_size=4), lambda b: torch.randn(b, 4, 3)),
    # parameters held in a ParameterList / ParameterDict and used by the module around them (they
    # were routed: "used outside its own module")
    Case("parameter_containers", ParameterContainers, lambda b: torch.randn(b, 3)),
    # cells stepped in a loop: one call a step, the rows summed over the calls; an LSTMCell's h' is
    # computed from its c' (the gradient at c' holds that path: each counted once)
    Case("rnn_cell_loop", lambda: CellLoop("RNNCell", nonlinearity="relu"), lambda b: torch.randn(b, 4, 3)),
    Case("gru_cell_loop", lambda: CellLoop("GRUCell", initial=True), lambda b: torch.randn(b, 4, 3)),
    Case("lstm_cell_loop", lambda: CellLoop("LSTMCell"), lambda b: torch.randn(b, 4, 3)),
    Case(
        "lstm_cell_loop_both_states", lambda: CellLoop("LSTMCell", "both", initial=True), lambda b: torch.randn(b, 4, 3)
    ),
    Case("lstm_cell_no_bias", lambda: CellLoop("LSTMCell", bias=False), lambda b: torch.randn(b, 4, 3)),
    Case(
        "inner_weight_used_again",
        lambda: seq(GatedTied(tied=False), nn.Linear(4, 2)),
        lambda b: torch.randn(b, 4),
        reference_params=1,
    ),
    Case(
        "inner_weight_registered_again",
        lambda: seq(GatedTied(tied=True), nn.Linear(4, 2)),
        lambda b: torch.randn(b, 4),
        reference_params=1,
    ),
    Case("transformer_encoder", Encoder, lambda b: torch.randn(b, 5, 4)),
    Case("transformer_encoder_norm_first", lambda: Encoder(norm_first=True), lambda b: torch.randn(b, 5, 4)),
    # PyTorch's default layout, (T, b, E): Linear, LayerNorm and the attention take dimension 1 as the batch
    Case("transformer_encoder_sequence_first", lambda: Encoder(batch_first=False), lambda b: torch.randn(b, 5, 4)),
    Case("linear_sequence_first", SequenceFirstLinear, lambda b: torch.randn(b, 5, 4)),
    # T == b: dimension 0 is taken, and the row check finds its rows are not the samples
    Case("linear_sequence_first_t_equals_b", SequenceFirstLinear, lambda b: torch.randn(b, b, 4), reference_params=4),
    Case("attention_without_weights", lambda: Attention(False), lambda b: torch.randn(b, 5, 3)),
    Case("attention_with_weights", lambda: Attention(True), lambda b: torch.randn(b, 5, 3)),
    Case("attention_weights_used", lambda: Attention(True, use_weights=True), lambda b: torch.randn(b, 5, 3)),
    # masks: the attention handler's factors with its additive mask (handlers._attention_mask)
    Case("attention_causal_mask", lambda: Attention(False, causal=True), lambda b: torch.randn(b, 5, 3)),
    Case("attention_padding_mask", lambda: Attention(False, padding=True), lambda b: torch.randn(b, 5, 3)),
    Case(
        "attention_causal_and_padding",
        lambda: Attention(False, causal=True, padding=True),
        lambda b: torch.randn(b, 5, 3),
    ),
    Case("transformer_decoder_cross_attention", Decoder, lambda b: torch.randn(b, 8, 4)),
    Case("forward_replaced", forward_replaced_on_the_instance, lambda b: torch.randn(b, 4), reference_params=2),
]

MODES = ("auto", "dense", "factored", "overlap", "kept")


def build(case: Case, channels_last: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    """The case's float64 model (perturbed), its inputs and random targets; ``channels_last``:
    the model converted with ``.to(memory_format=torch.channels_last)`` and its image batch too."""
    torch.manual_seed(0)
    model = case.model().double()
    # random perturbation: Fixup zero-initialises layers, which would hide most of the Jacobian
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.train(not case.eval_mode).to(DEVICE)
    x = case.inputs(case.batch).to(DEVICE)
    x = x.double() if x.is_floating_point() else x
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        k = model(x).reshape(case.batch, -1).shape[1]
    return model, x, torch.randn(case.batch, k, dtype=torch.float64, device=DEVICE)


def dense_jacobian(model: nn.Module, x: Tensor, params: list[Tensor]) -> Tensor:
    """``(b*k, m)`` Jacobian of the flattened outputs by ``torch.func.jacrev``."""
    names = {id(p): n for n, p in model.named_parameters()}
    values = {names[id(p)]: p.detach() for p in params}
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN refuses functorch's tensors
        jac = jacrev(lambda v: functional_call(model, v, (x,)).reshape(-1))(values)
    return torch.cat([jac[names[id(p)]].reshape(jac[names[id(p)]].shape[0], -1) for p in params], 1)


def assert_close(name: str, got: Tensor, want: Tensor) -> None:
    scale = want.abs().max().clamp_min(1e-300)
    err = (got - want).abs()
    if float(err.max() / scale) > RTOL:
        bad = (err > RTOL * scale).nonzero()[:10]
        rows = [
            f"  {tuple(i.tolist())}: got {float(got[tuple(i)]):.12g}, want {float(want[tuple(i)]):.12g}" for i in bad
        ]
        pytest.fail(f"{name}: max relative error {float(err.max() / scale):.3g} > {RTOL}\n" + "\n".join(rows))


@pytest.fixture
def cost_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "dense":
        monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    elif request.param in ("factored", "overlap"):
        monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: True)
        if request.param == "factored":
            monkeypatch.setattr(handlers, "SYRK_MIN_MULTIPLY_ADDS", 0)
        monkeypatch.setattr(handlers, "overlap_is_cheaper", lambda *a, **k: request.param == "overlap")
    elif request.param == "kept":
        monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
        monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", 0)
    return request.param


def check_against_reference(case: Case, channels_last: bool = False) -> None:
    model, x, y = build(case, channels_last)
    params = list(model.parameters())
    closure = lambda: model(x).reshape(case.batch, -1) - y  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = HooksEngine(model, params)
        fast = engine.compute(closure)
    routed = [w for w in caught if "reference engine" in str(w.message)]
    assert bool(routed) == bool(case.reference_params), [str(w.message) for w in caught]
    reference = ReferenceEngine(params).compute(closure)
    jac = dense_jacobian(model, x, params)
    v = torch.randn(fast.gram.shape[0], dtype=torch.float64, device=DEVICE)
    jt_fast = torch.cat([t.reshape(-1) for t in fast.jt_times(v)])
    assert [t.shape for t in fast.jt_times(v)] == [p.shape for p in params]
    assert_close("residuals", fast.residuals, reference.residuals)
    assert_close("gram vs reference", fast.gram, reference.gram)
    assert_close("gram vs jacrev", fast.gram, jac @ jac.T)
    assert_close("J^T v vs reference", jt_fast, torch.cat([t.reshape(-1) for t in reference.jt_times(v)]))
    assert_close("J^T v vs jacrev", jt_fast, jac.T @ v)
    u = [torch.randn_like(p) for p in params]  # a direction in parameter space
    u_flat = torch.cat([t.reshape(-1) for t in u])
    assert_close("J u vs jacrev", fast.j_times(u), jac @ u_flat)
    assert_close("J u vs reference", fast.j_times(u), reference.j_times(u))
    m = jac.shape[1]
    for start, stop in ((0, m), (m // 3, m - m // 4)):  # the whole J and a range across parameters
        assert_close(f"J[:, {start}:{stop}] vs jacrev", fast.jacobian_columns(start, stop), jac[:, start:stop])
        assert_close("reference J columns", reference.jacobian_columns(start, stop), jac[:, start:stop])
    check_weighted_gram(engine, closure, params, jac, fast.gram)


def check_weighted_gram(
    engine: HooksEngine, closure: Callable[[], Tensor], params: list[Tensor], jac: Tensor, gram: Tensor
) -> None:
    """``weighted_gram`` (a per-parameter diagonal metric's Gram ``sum_p w_p J_p J_p^T``) against
    the dense ``J``, from a system whose plain Gram was skipped (the metric's way): weights that
    differ between every two neighbouring parameters (a bias folded into its weight's factors is
    then added on its own), and weights shared by each pair (the factors keep it folded)."""
    skipped = engine.compute(closure, form_gram=lambda rows: False)
    assert skipped.gram is None
    sizes = [p.numel() for p in params]
    for label, weights in (
        ("distinct", [0.1 * 3.0 ** (i % 5) for i in range(len(params))]),
        ("pairs", [0.5 * 4.0 ** (i // 2 % 3) for i in range(len(params))]),
    ):
        columns = torch.cat([jac.new_full((n,), w) for n, w in zip(sizes, weights)])
        assert_close(f"weighted Gram ({label}) vs jacrev", skipped.weighted_gram(weights), (jac * columns) @ jac.T)
    assert_close("weighted Gram of ones vs the Gram", skipped.weighted_gram([1.0] * len(params)), gram)


@pytest.mark.parametrize("cost_mode", MODES, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_reference_and_jacrev(case: Case, cost_mode: str) -> None:
    check_against_reference(case)


RECURRENT_CASES = [c for c in CASES if c.name.startswith(("lstm", "gru", "rnn")) and c.name != "lstm_projection"]


@pytest.mark.parametrize("cost_mode", ["dense", "factored"], indirect=True)
@pytest.mark.parametrize("case", RECURRENT_CASES, ids=[c.name for c in RECURRENT_CASES])
def test_recurrent_rows_come_from_the_recurrence_run_again(
    case: Case, cost_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RNN, GRU and LSTM rows from the factors of their time steps, exact (float64, against the
    reference engine and jacrev) without the general way through the recorded graph, which a
    run that did not reproduce the layer's outputs would fall back on (and stay exact: the
    comparison alone could not tell)."""

    def general_way(module: nn.Module, *args: Any) -> None:
        raise AssertionError(f"{type(module).__name__}'s rows were taken through the recorded graph")

    monkeypatch.setattr(recurrent, "_autograd_rows", general_way)
    check_against_reference(case)


def test_lstm_cell_output_changed_in_place_is_refused() -> None:
    """An LSTMCell's rows need its call run again (through the recorded graph the path from h'
    to c' would count twice): an output changed in place after the call is refused, not guessed."""

    class Scaled(CellLoop):
        def forward(self, x: Tensor) -> Tensor:
            h, c = self.cell(x[:, 0])
            h.mul_(2.0)  # the returned h' is not the module's any more
            return self.head(h)

    torch.manual_seed(0)
    model = Scaled("LSTMCell").double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="LSTMCell's input or output was changed in place"):
        HooksEngine(model).compute(lambda: model(x))


def test_recurrent_dropout_in_training_takes_the_general_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout between a GRU's layers draws inside the fused kernel, which a run again cannot
    replay: those rows come through the recorded graph, exact for the masks drawn."""
    torch.manual_seed(0)
    model = Recurrent("GRU", "output", layers=2, dropout=0.5).double().train()
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    general = []
    taken = recurrent._autograd_rows
    monkeypatch.setattr(recurrent, "_autograd_rows", lambda *a: general.append(a[0]) or taken(*a))
    params = list(model.parameters())
    torch.manual_seed(1)  # the same masks in both engines' forward passes
    fast = HooksEngine(model, params).compute(lambda: model(x))
    torch.manual_seed(1)
    reference = ReferenceEngine(params).compute(lambda: model(x))
    assert [type(m) for m in general] == [nn.GRU]
    assert_close("gram vs reference", fast.gram, reference.gram)


CONV2D_CASES = [c for c in CASES if c.name.startswith(("conv2d", "resnet8", "groupnorm", "batchnorm"))]


@pytest.mark.parametrize("path", ["grouped", "grouped_chunks", "patches", "correlate"])
@pytest.mark.parametrize("case", CONV2D_CASES, ids=[c.name for c in CONV2D_CASES])
def test_conv_weight_paths(case: Case, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = handlers.CONV_WEIGHT_PATHS
    if path == "grouped_chunks":  # one sample per grouped convolution (conv2d_b7_k2: 14 of them)
        path = "grouped"
        monkeypatch.setattr(handlers, "GROUPED_CHUNK_BYTES", 1)
    monkeypatch.setattr(paths, "forced", path)
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))  # offer it for every shape
    monkeypatch.setattr(handlers, "MAX_CORRELATE_CHANNELS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    before = paths.used[path]
    check_against_reference(case)
    if path == "grouped" or any(isinstance(m, nn.Conv2d) and m.groups == 1 for m in case.model().modules()):
        assert paths.used[path] > before, f"the {path} path did not run"


# the cases in which a convolution's output gradient comes back channels-last (a layer after it
# that keeps the format; before a Flatten, or a convolution to one channel, autograd hands it back
# contiguous)
CHANNELS_LAST_CASES = [
    c
    for c in CONV2D_CASES
    if c.name in ("conv2d_groups", "groupnorm", "batchnorm_eval", "conv2d_b36_syrk", "resnet8_fixup", "resnet8_gn")
]


@pytest.mark.parametrize("path", ["factored", "overlap", "kept", "grouped", "patches", "correlate"])
@pytest.mark.parametrize("case", CHANNELS_LAST_CASES, ids=[c.name for c in CHANNELS_LAST_CASES])
def test_channels_last_models_match_jacrev(case: Case, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model in the channels-last memory format fed channels-last batches (a user's switch for
    faster convolutions on the CPU): its convolutions' inputs and output gradients reach the
    handlers with channels-last strides. Every path, float64, against the reference engine and
    ``jacrev``."""
    if path in ("factored", "overlap"):
        monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: True)
        monkeypatch.setattr(handlers, "overlap_is_cheaper", lambda *a, **k: path == "overlap")
    else:
        monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
        if path == "kept":
            monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", 0)
        else:
            monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", path)
            monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
            monkeypatch.setattr(handlers, "MAX_CORRELATE_CHANNELS", float("inf"))
    gradients = []  # whether each convolution's output gradient was channels-last and not contiguous
    conv = handlers.HANDLERS[nn.Conv2d]

    def spy(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict:
        gradients.append(not g.is_contiguous() and g.is_contiguous(memory_format=torch.channels_last))
        return conv.contributions(module, a, g, names)

    monkeypatch.setitem(handlers.HANDLERS, nn.Conv2d, replace(conv, contributions=spy))
    check_against_reference(case, channels_last=True)
    # cuDNN hands the gradients back contiguous: the case is the CPU's
    assert any(gradients) or DEVICE.type != "cpu", "no channels-last output gradient reached the convolutions' handler"


CONV_LAYERS = [
    (nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), (6, 3, 7, 7)),
    (nn.Conv2d(2, 3, (3, 2), dilation=(2, 1), padding=(1, 2), bias=False), (5, 2, 6, 5)),
    # stride and dilation both > 1, rows and columns left over at the end of the padded input
    (nn.Conv2d(2, 3, 3, stride=(2, 3), dilation=(2, 1), padding=(2, 1)), (4, 2, 10, 9)),
    (nn.Conv1d(4, 6, 3, groups=2, padding=1), (5, 4, 9)),
    (nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (3, 2, 4, 4, 3)),
]


@pytest.mark.parametrize("path", ["grouped", "grouped_chunks", "patches", "correlate"])
@pytest.mark.parametrize("layer", range(len(CONV_LAYERS)))
def test_conv_pieces_multiply_like_their_dense_form(layer: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``J^T v`` and ``J v`` of every conv weight piece against its materialised ``J`` (float64)."""
    module, shape = CONV_LAYERS[layer]
    torch.manual_seed(layer)
    module = module.double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        g = torch.randn_like(module(x))
    if path == "grouped_chunks":  # two samples per grouped convolution (5 and 3 samples: the last one short)
        path = "grouped"
        row = max(x[0].numel(), g[0].numel(), module.weight.numel())  # the largest of a sample's blocks
        monkeypatch.setattr(handlers, "GROUPED_CHUNK_BYTES", 2 * 8 * row)
    monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", path)
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "MAX_CORRELATE_CHANNELS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    handler = handlers.handler_for(module)
    pieces = [handler.contributions(module, x, g, frozenset({"weight"}))["weight"]]
    monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", 0)
    pieces.append(handler.contributions(module, x, g, frozenset({"weight"}))["weight"])
    assert isinstance(pieces[1], handlers.KeptConv)
    n = shape[0]
    # the reference: per-sample gradients by autograd, one sample at a time
    rows = []
    for i in range(n):
        (grad,) = torch.autograd.grad((module(x[i : i + 1]) * g[i : i + 1]).sum(), module.weight)
        rows.append(grad.reshape(-1))
    jac = torch.stack(rows)
    v, w = torch.randn(n, dtype=torch.float64), torch.randn(jac.shape[1], dtype=torch.float64)
    for piece in pieces:
        assert_close(f"{type(piece).__name__} dense", piece.dense().jac, jac)
        assert_close(f"{type(piece).__name__} J^T v", piece.jt_times(v), jac.T @ v)
        assert_close(f"{type(piece).__name__} J v", piece.j_times(w), jac @ w)
        gram = torch.zeros(n, n, dtype=torch.float64)
        piece.add_gram_lower(gram)
        handlers.mirror_lower(gram)
        assert_close(f"{type(piece).__name__} Gram", gram, jac @ jac.T)


@pytest.mark.parametrize("transient", [False, True], ids=["kept", "transient"])
def test_grouped_chunks_are_bounded_by_the_gradients_too(transient: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose per-sample gradients are larger than its input and output gradients (deep
    layers on small maps: 19 MB a layer against 8 MiB at ResNet-32's third stage at 64x64) runs
    the grouped path in chunks whose gradients fit ``GROUPED_CHUNK_BYTES`` too, inside an
    engine's workspace as outside; the gradients are exact (float64, autograd sample by sample)."""
    torch.manual_seed(0)
    module = nn.Conv2d(8, 8, 3, padding=1).double()  # 576 weights per sample against x's and g's 128
    x = torch.randn(5, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        g = torch.randn_like(module(x))
    monkeypatch.setattr(handlers, "GROUPED_CHUNK_BYTES", 2 * 8 * 576)  # two samples' gradients
    calls: list[int] = []
    grouped = handlers._grouped_weight_gradients

    def spy(module: nn.Module, x: Tensor, g: Tensor, padding: tuple[int, ...]) -> Tensor:
        out = grouped(module, x, g, padding)
        calls.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(handlers, "_grouped_weight_gradients", spy)
    rows = []
    for i in range(5):
        (grad,) = torch.autograd.grad((module(x[i : i + 1]) * g[i : i + 1]).sum(), module.weight)
        rows.append(grad.reshape(-1))
    for work in (None, Workspace()):  # activated(None): no workspace
        calls.clear()
        with activated(work):
            if work is not None:
                work.new_step()
            piece = handlers._conv_weight_per_sample(module, x, g, (1, 1), transient)
        assert calls == [2 * 8 * 576, 2 * 8 * 576, 8 * 576]  # 2 + 2 + 1 samples
        assert_close("per-sample gradients", piece.dense().jac, torch.stack(rows))


@pytest.mark.parametrize("halves_from", [None, 0], ids=["as_in_use", "always_halves"])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 128])
def test_symmetric_update_then_mirror_equals_full_product(
    n: int, halves_from: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if halves_from is not None:
        monkeypatch.setattr(handlers, "SYRK_MIN_MULTIPLY_ADDS", halves_from)
    torch.manual_seed(n)
    jacs = [torch.randn(n, m, dtype=torch.float64) for m in (1, 7, 300, 5000)]
    gram = torch.zeros(n, n, dtype=torch.float64)
    for jac in jacs:
        handlers.add_gram_lower(gram, jac)
    halves = [handlers.halves_pay(*jac.shape) for jac in jacs]
    assert any(halves) == (n >= handlers.SYRK_MIN_ROWS and (halves_from == 0 or n == 128))
    if any(halves):  # the upper-right block is not computed before mirroring
        assert float((gram - gram.T).abs().max()) > 1.0
    handlers.mirror_lower(gram)
    assert_close("mirrored lower update", gram, sum(j @ j.T for j in jacs))


class FakeMachine:
    """A fake clock and candidates whose run ``i`` (counted over all runs) takes ``base[name]``
    seconds, times ``slowdown`` while ``i`` is in ``slow`` (a busy phase of the machine)."""

    def __init__(self, base: dict[str, float], slow: Iterable[int] = (), slowdown: float = 10.0):
        self.base, self.slow, self.slowdown = base, set(slow), slowdown
        self.now, self.runs = 0.0, []

    def clock(self) -> float:
        return self.now

    def candidates(self) -> dict[str, Callable[[], str]]:
        def run(name: str) -> str:
            factor = self.slowdown if len(self.runs) in self.slow else 1.0
            self.runs.append(name)
            self.now += self.base[name] * factor
            return name

        return {name: functools.partial(run, name) for name in self.base}


def test_measured_choice_keeps_the_fastest_and_caches_it() -> None:
    machine = FakeMachine({"slow": 2.0, "fast": 1.0})
    choice = handlers.MeasuredChoice(clock=machine.clock, rounds=3, recheck_after=0)
    assert choice("k", machine.candidates()) == ("fast", "fast")
    assert choice("k", machine.candidates()) == ("fast", "fast")
    assert machine.runs == ["slow", "fast", "fast", "slow", "slow", "fast", "fast", "fast"]  # interleaved, then used
    assert choice.choices == {"k": "fast"} and choice.used == {"fast": 2} and choice.trials == {"k": 1}
    choice.forced = "slow"
    assert choice("k", machine.candidates()) == ("slow", "slow")


def test_measured_choice_runs_an_untimed_candidate_without_a_trial() -> None:
    """``untimed`` runs at once, no trial and no choice recorded; a forced candidate overrides it."""
    machine = FakeMachine({"slow": 2.0, "fast": 1.0})
    choice = handlers.MeasuredChoice(clock=machine.clock, rounds=3, recheck_after=0)
    assert choice("k", machine.candidates(), untimed="slow") == ("slow", "slow")
    assert machine.runs == ["slow"] and not choice.trials and not choice.choices
    choice.forced = "fast"
    assert choice("k", machine.candidates(), untimed="slow") == ("fast", "fast")


@pytest.fixture
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for one test, the previous setting restored."""
    from gramnewton.lab.experiments.runner import deterministic_algorithms as enabled

    with enabled(True):
        yield


@pytest.mark.usefixtures("deterministic_algorithms")
def test_measured_choice_under_deterministic_algorithms_runs_the_first_candidate_untimed() -> None:
    """No timing decides anything (it could differ between processes, and so could the rounding
    of a run); ``forced`` and ``untimed`` still take precedence."""
    machine = FakeMachine({"slow": 2.0, "fast": 1.0})
    choice = handlers.MeasuredChoice(clock=machine.clock, rounds=3, recheck_after=2)
    assert [choice("k", machine.candidates())[0] for _ in range(4)] == ["slow"] * 4
    assert machine.runs == ["slow"] * 4 and not choice.trials and not choice.choices
    assert choice("k", machine.candidates(), untimed="fast") == ("fast", "fast")
    choice.forced = "fast"
    assert choice("k", machine.candidates()) == ("fast", "fast")


@pytest.mark.usefixtures("deterministic_algorithms")
def test_convolutions_under_deterministic_algorithms_run_their_preferred_path_untimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stem (one input channel) runs the correlation, the convolution of more channels than
    ``MAX_CORRELATE_CHANNELS`` the patches path, neither timed; the Gram is exact (float64, against the reference engine)."""
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    monkeypatch.setattr(handlers, "UNTIMED_PATCHES_BELOW", 0)  # both layers would be timed otherwise
    model = seq(
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 1)
    ).double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    fast = HooksEngine(model).compute(lambda: model(x).squeeze(1))
    reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x).squeeze(1))
    assert_close("gram vs reference", fast.gram, reference.gram)
    paths = handlers.CONV_WEIGHT_PATHS
    assert not paths.trials and paths.used == {"correlate": 1, "patches": 1}


def test_small_convolutions_run_the_patches_path_untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A convolution whose patches copy is below ``UNTIMED_PATCHES_BELOW`` entries gets no timing
    trial (resnet8's stem on 8x8 images: the trial's oneDNN compiles cost 40-54 ms); above it the
    trial runs. Exact either way (float64, against the reference engine)."""
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    model = seq(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 1)).double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)  # patches: 6 * 16 * 9 entries
    for below, trials in ((6 * 16 * 9 + 1, 0), (6 * 16 * 9, 1)):
        monkeypatch.setattr(handlers, "UNTIMED_PATCHES_BELOW", below)
        monkeypatch.setattr(handlers, "CONV_WEIGHT_PATHS", handlers.MeasuredChoice())
        fast = HooksEngine(model).compute(lambda: model(x).squeeze(1))
        reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x).squeeze(1))
        assert_close("gram vs reference", fast.gram, reference.gram)
        paths = handlers.CONV_WEIGHT_PATHS
        assert sum(paths.trials.values()) == trials and sum(paths.used.values()) == 1
        assert trials or paths.used["patches"] == 1


def test_channels_last_layers_get_their_own_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conv paths are timed per memory layout: a channels-last copy of a model on a
    channels-last batch, its shapes the same, runs its own trial instead of taking the choice timed
    on the usual layout (the paths' costs differ between layouts: the grouped path copies
    channels-last inputs). Exact either way. Failed before the strides were in the choice's key."""
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    monkeypatch.setattr(handlers, "UNTIMED_PATCHES_BELOW", 0)
    monkeypatch.setattr(handlers, "CONV_WEIGHT_PATHS", handlers.MeasuredChoice())
    usual = seq(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 1)).double()
    last = copy.deepcopy(usual).to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    for model, batch in ((usual, x), (last, x.contiguous(memory_format=torch.channels_last))):
        fast = HooksEngine(model).compute(lambda: model(batch).squeeze(1))
        reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(batch).squeeze(1))
        assert_close("gram vs reference", fast.gram, reference.gram)
    assert len(handlers.CONV_WEIGHT_PATHS.choices) == 2
    assert list(handlers.CONV_WEIGHT_PATHS.trials.values()) == [1, 1]


def test_trial_order_spreads_every_candidates_runs() -> None:
    assert choice_module.trial_order(["a", "b", "c"], 3) == list("abcbcacab")
    assert choice_module.trial_order(["a", "b"], 2) == list("abba")


@pytest.mark.parametrize("count", [2, 3])
def test_measured_choice_survives_a_slow_phase_of_the_machine(count: int) -> None:
    """A busy phase of up to ``count + 1`` consecutive runs, wherever it falls in the trial, never
    makes the fastest candidate lose (perf4's outlier: best of two runs per candidate, one
    candidate after the other, let one phase slow both runs of one candidate)."""
    base = {name: 1.0 + 0.1 * i for i, name in enumerate("abc"[:count])}  # "a" is the fastest
    runs = count * choice_module.TRIAL_ROUNDS
    for fastest in base:  # the fastest candidate at every position of the order
        speeds = {name: base["a"] if name == fastest else base[name] + 0.5 for name in base}
        for start in range(runs):
            machine = FakeMachine(speeds, slow=range(start, start + count + 1))
            choice = handlers.MeasuredChoice(clock=machine.clock, recheck_after=0)
            assert choice("k", machine.candidates())[0] == fastest, (fastest, start)


def test_measured_choice_is_timed_again_once_and_then_kept() -> None:
    """A first trial run entirely in a busy phase for the fastest candidate is corrected by the
    second trial after ``recheck_after`` uses; no third trial follows."""
    rounds, recheck = 3, 4
    first_trial = [i for i, name in enumerate(choice_module.trial_order(["a", "b"], rounds)) if name == "b"]
    machine = FakeMachine({"a": 1.5, "b": 1.0}, slow=first_trial)
    choice = handlers.MeasuredChoice(clock=machine.clock, rounds=rounds, recheck_after=recheck)
    picked = [choice("k", machine.candidates())[0] for _ in range(3 * recheck)]
    assert picked == ["a"] * recheck + ["b"] * (2 * recheck)
    assert choice.trials == {"k": 2} and len(machine.runs) == 2 * 2 * rounds + 3 * recheck
    assert choice.best["k"] == {"a": 1.5, "b": 1.0}


def test_cost_model_picks_factors_for_the_wide_two_layer_net() -> None:
    # Linear(10 -> 4096) at b=128: factorised b^2 (in + out) is far below b^2 in out.
    assert handlers.factored_is_cheaper(128, 1, 10, 4096)
    # a 3x3 convolution of a ResNet at 32x32: materialised per-sample gradients win
    assert not handlers.factored_is_cheaper(128, 1024, 16 * 9, 16, unfold=True)


def test_cost_model_takes_small_maps_from_their_input_positions() -> None:
    # resnet8 on 8x8 images, b = 128: the 64-channel 3x3 convolution at 2x2 (T = S = 4) takes A A^T
    # from its input positions (1.28 against 2.56 ms, benchmarks/kernels.py), the stride-2 one reading a 4x4 map
    # (T = 16, S = 4) from its patches, the 32-channel one at 4x4 (T = S = 16) materialises
    assert handlers.overlap_is_cheaper(128, 4, 64, 4, 64 * 9, 64)
    assert not handlers.overlap_is_cheaper(128, 16, 32, 4, 32 * 9, 64)
    assert not handlers.factored_is_cheaper(128, 16, 32 * 9, 32, unfold=True, overlap=(16, 32))
    # at 3x3 the input positions make factorising pay where the patches would not
    assert not handlers.factored_is_cheaper(128, 9, 64 * 9, 64, unfold=True)
    assert handlers.factored_is_cheaper(128, 9, 64 * 9, 64, unfold=True, overlap=(9, 64))


@pytest.mark.parametrize(
    "conv, in_size",
    [
        (nn.Conv2d(3, 2, 3, padding=1), (2, 2)),
        (nn.Conv2d(3, 2, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(1, 2)), (5, 4)),
        (nn.Conv2d(3, 2, 2, stride=3), (7, 6)),
    ],
)
def test_patch_pairs_count_the_kernel_offsets_two_positions_share(conv: nn.Conv2d, in_size: tuple[int, int]) -> None:
    # M[(s, s'), (t, t')] against the patches of an input whose positions are one-hot: the patch of
    # output position s holds input position t at offset o iff unfold's (o, s) entry of e_t is 1
    x = torch.eye(in_size[0] * in_size[1], dtype=torch.float64).reshape(-1, 1, *in_size)
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (T, offsets, S)
    out_size = conv(torch.zeros(1, 3, *in_size)).shape[2:]
    reads = patches.permute(1, 2, 0)  # (offset, s, t)
    want = torch.einsum("ost,oru->srtu", reads, reads).reshape(reads.shape[1] ** 2, -1)
    got = handlers.patch_pairs(
        in_size, tuple(out_size), conv.kernel_size, conv.dilation, conv.padding, conv.stride, torch.float64, x.device
    )
    assert torch.equal(got, want)


def test_a_global_forward_hook_routes_every_parameter() -> None:
    # torch runs global forward hooks before the engine's: one that scales a Linear's output would
    # hand the engine the scaled output (a Gram wrong by up to 60 before it was routed)
    torch.manual_seed(0)
    model = seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    closure = lambda: model(x).squeeze(1)  # noqa: E731
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 3 * out if isinstance(module, nn.Linear) else None
    )
    try:
        with pytest.warns(UserWarning, match="global forward hook"):
            fast = HooksEngine(model).compute(closure)
        reference = ReferenceEngine(list(model.parameters())).compute(closure)
        jac = dense_jacobian(model, x, list(model.parameters()))
    finally:
        handle.remove()
    assert_close("gram", fast.gram, reference.gram)
    assert_close("gram vs jacrev", fast.gram, jac @ jac.T)


def test_closure_calling_the_model_twice() -> None:
    torch.manual_seed(0)
    model = seq(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    closure = lambda: (model(x1) - model(x2)).squeeze(1)  # noqa: E731
    fast, ref = HooksEngine(model).compute(closure), ReferenceEngine(list(model.parameters())).compute(closure)
    assert_close("gram", fast.gram, ref.gram)


def test_parameters_the_residuals_do_not_use_get_zeros() -> None:
    model = seq(nn.Linear(3, 1), nn.Linear(3, 1)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    system = HooksEngine(model).compute(lambda: model[0](x).squeeze(1))
    update = system.jt_times(torch.ones(4, dtype=torch.float64))
    assert all(bool((u == 0).all()) for u in update[2:])


def test_frozen_parameters_are_left_out() -> None:
    model = seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = [model[0].weight, model[2].bias]
    x = torch.randn(5, 3, dtype=torch.float64)
    closure = lambda: model(x)  # noqa: E731  (the residuals are the last Linear's own output)
    fast, ref = HooksEngine(model, params).compute(closure), ReferenceEngine(params).compute(closure)
    assert_close("gram", fast.gram, ref.gram)


@pytest.mark.parametrize("trained", ["weights_and_biases", "weights", "biases", "one_layer_each"])
@pytest.mark.parametrize("rows", [5, 33], ids=["full_products", "symmetric_updates"])
def test_a_bias_folded_into_its_factored_weight_adds_its_gram_part_once(
    trained: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Factored Linear and Conv weights add their bias's Gram part as (A A^T + 1) * (G G^T)
    # (handlers.FoldedBias); a bias without its weight, or a weight without its bias, must not.
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: True)
    monkeypatch.setattr(handlers, "SYRK_MIN_MULTIPLY_ADDS", 0)  # 33 rows: the symmetric updates
    torch.manual_seed(0)
    model = seq(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 9, 6), nn.Tanh(), nn.Linear(6, 2)
    ).double()
    layers = [model[0], model[3], model[5]]
    params = {
        "weights_and_biases": [p for layer in layers for p in (layer.weight, layer.bias)],
        "weights": [layer.weight for layer in layers],
        "biases": [layer.bias for layer in layers],
        "one_layer_each": [model[0].bias, model[3].weight, model[5].weight, model[5].bias],
    }[trained]
    x = torch.randn(rows, 2, 3, 3, dtype=torch.float64)
    y = torch.randn(rows, 2, dtype=torch.float64)
    closure = lambda: model(x) - y  # noqa: E731
    fast = HooksEngine(model, params).compute(closure)
    jac = dense_jacobian(model, x, params)
    assert_close("gram vs jacrev", fast.gram, jac @ jac.T)
    v = torch.randn(2 * rows, dtype=torch.float64)
    assert_close("J^T v vs jacrev", torch.cat([t.reshape(-1) for t in fast.jt_times(v)]), jac.T @ v)


def test_rows_through_a_module_that_vmap_refuses_are_taken_one_by_one() -> None:
    """A backward that reads its gradient's values fails the batched backward pass (and
    ``torch.func.jacrev``): the module's rows are then taken one backward pass each, through the
    same recorded graph; the Gram and ``J^T v`` equal the reference engine's (row-by-row autograd)."""
    torch.manual_seed(0)
    model = seq(nn.Linear(3, 4), CubedScale(4), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    out = model[1](torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError):  # so the fallback below is what runs
        torch.autograd.grad(out, model[1].w, torch.ones(5, *out.shape, dtype=torch.float64), is_grads_batched=True)
    closure = lambda: model(x)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing routed
        fast = HooksEngine(model).compute(closure)
    reference = ReferenceEngine(list(model.parameters())).compute(closure)
    assert_close("gram vs reference", fast.gram, reference.gram)
    v = torch.randn(10, dtype=torch.float64)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    assert_close("J^T v vs reference", flat(fast.jt_times(v)), flat(reference.jt_times(v)))


AUTOGRAD_ROWS_CASES = [
    c
    for c in CASES
    if c.name
    in (
        "unknown_module",
        "learned_scale_first",
        "position_embedding",
        "prelu_k2",
        "gated_block",
        "film_two_inputs",
        "two_outputs_both_used",
        "two_outputs_one_used",
        "two_outputs_in_a_dict",
        "same_node_two_outputs",
        "same_node_first_output_used",
        "attention_weights_used",
    )  # not output_changed_in_place_after: its output's values changed, only the graph's way applies
    # (nor the encoder: its attention has a handler of its own)
]


@pytest.mark.parametrize("path", ["recomputation", "graph"])
@pytest.mark.parametrize("case", AUTOGRAD_ROWS_CASES, ids=[c.name for c in AUTOGRAD_ROWS_CASES])
def test_each_way_to_a_handlerless_modules_rows(case: Case, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``handlers.AUTOGRAD_ROWS`` with the other way disabled: the recomputation (``vmap`` of the
    module's ``vjp``, taken on these modules: the recorded graph's way raises here) and the
    recorded graph's batched vector-Jacobian products each give the exact Gram, ``J^T v`` and
    ``J v``."""

    def refuse(*args: Any) -> None:
        raise AssertionError("the other way was expected")

    if path == "recomputation":
        monkeypatch.setattr(handlers, "_rows_through_graph", refuse)
    else:
        monkeypatch.setattr(handlers, "_rows_by_recomputation", lambda *args: None)
    check_against_reference(case)


class CountingScale(nn.Module):
    """A learned scale whose forward counts its calls in a buffer (a side effect)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([1.5]))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * self.s


class DroppedScale(nn.Module):
    """A learned scale followed by dropout inside the module (random draws)."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x * self.s, 0.5, self.training)


@pytest.mark.parametrize("kind", ["buffer_side_effect", "dropout_inside", "user_forward_hook"])
def test_a_handlerless_module_that_cannot_simply_be_run_again(kind: str) -> None:
    """The recomputation must not change what the step sees: a module counting its calls in a
    buffer, one drawing random numbers (``torch.func`` refuses both) and one with a user's
    forward hook (which would run again) take the recorded graph's way, the count and the hook
    seeing the step's one forward; every Gram equals the reference engine's on the same draws."""
    torch.manual_seed(0)
    middle = {"buffer_side_effect": CountingScale, "dropout_inside": DroppedScale, "user_forward_hook": LearnedScale}
    model = seq(nn.Linear(3, 4), middle[kind](), nn.Tanh(), nn.Linear(4, 2)).double()
    hook_calls = []
    if kind == "user_forward_hook":
        model[1].register_forward_hook(lambda *args: hook_calls.append(1))
    x = torch.randn(5, 3, dtype=torch.float64)
    closure = lambda: model(x)  # noqa: E731
    torch.manual_seed(1)
    fast = HooksEngine(model).compute(closure)
    if kind == "buffer_side_effect":
        assert float(model[1].calls) == 1.0  # the step's forward alone
    if kind == "user_forward_hook":
        assert hook_calls == [1]
    torch.manual_seed(1)
    reference = ReferenceEngine(list(model.parameters())).compute(closure)
    assert_close("gram vs reference", fast.gram, reference.gram)


class PositionEmbedded(nn.Module):
    """A learned position embedding added inside the model, before hooked layers and dropout
    (as a ViT's top-level module holds it): its own parameter reaches the residuals through the
    inner Linears' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(4, 6))
        self.embed, self.block, self.head = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(self.embed(x) + self.pos, 0.1, self.training)
        return self.head(torch.tanh(self.block(h)).mean(1))


class LearnedInitialState(nn.Module):
    """A GRU whose initial state is a parameter of the enclosing module."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 2)
        self.h0 = nn.Parameter(torch.randn(1, 1, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gru(x, self.h0.expand(1, x.shape[0], 5).contiguous())[0][:, -1])


@pytest.mark.parametrize("model_class", [PositionEmbedded, LearnedInitialState])
def test_rows_through_a_modules_graph_leave_the_modules_inside_alone(
    model_class: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handlerless module's parameter that reaches the residuals through hooked modules inside
    it: its rows through the recorded graph run those modules' output hooks in a backward pass of
    their own, whose gradients are not the step's. They were taken as the step's: the position
    embedding's step crashed (the inner handlers ran under that pass's vmap), the GRU's Gram was
    39% off, silently. The inner modules' rows must come from the step's pass alone."""
    monkeypatch.setattr(handlers, "_rows_by_recomputation", lambda *args: None)
    torch.manual_seed(0)
    model = model_class().double().train()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.manual_seed(1)  # the same dropout masks in both engines' forward passes
    fast = HooksEngine(model).compute(lambda: model(x))
    torch.manual_seed(1)
    reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x))
    assert_close("gram vs reference", fast.gram, reference.gram)
    v = torch.randn(fast.gram.shape[0], dtype=torch.float64)
    got, want = (torch.cat([t.reshape(-1) for t in s.jt_times(v)]) for s in (fast, reference))
    assert_close("J^T v vs reference", got, want)


@pytest.mark.parametrize("model_name", ["gated", "lstm_all_outputs"])
@pytest.mark.parametrize("entries", [1, 40])
def test_rows_through_a_modules_own_graph_in_chunks(
    entries: int, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched backward passes of ``handlers.AUTOGRAD_ROWS``'s recorded-graph way bounded to
    a few cotangent entries: one row per pass (``entries=1``) or several, over two outputs per
    sample; for an LSTM, each pass from its three outputs at once (two with the batch in
    dimension 1)."""
    monkeypatch.setattr(handlers, "AUTOGRAD_ROWS_ENTRIES", entries)
    monkeypatch.setattr(handlers, "_rows_by_recomputation", lambda *args: None)
    torch.manual_seed(0)
    if model_name == "gated":
        model = seq(nn.Linear(4, 6), nn.PReLU(6), GatedBlock(6), nn.Linear(6, 2)).double()
        x = torch.randn(7, 4, dtype=torch.float64)
    else:
        model = Recurrent("LSTM", "all").double()
        x = torch.randn(7, 3, 3, dtype=torch.float64)
    fast = HooksEngine(model).compute(lambda: model(x))
    jac = dense_jacobian(model, x, list(model.parameters()))
    assert_close("gram vs jacrev", fast.gram, jac @ jac.T)


class ScaleAndSquare(torch.autograd.Function):
    """``(x w, x w^2)`` from one autograd node with two outputs (``torch.func`` transforms it:
    ``jacrev`` checks it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        return x * w, x * w * w

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, gy: Tensor, gz: Tensor) -> tuple[Tensor, Tensor]:
        x, w = ctx.saved_tensors
        return gy * w + gz * w * w, (gy * x + 2 * gz * x * w).sum(0)


class TwoOutputs(nn.Module):
    """Returns ``(y, [z])``, two outputs of one autograd node, both followed; with ``stash`` it
    returns ``y`` alone and keeps ``z`` on itself (``self.z``): not an output of the module."""

    def __init__(self, width: int, stash: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.stash = stash

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        y, z = ScaleAndSquare.apply(x, self.w)
        if self.stash:
            self.z = z
            return y
        return y, [z]


class UsesBoth(nn.Module):
    """A head on ``y`` and ``z`` of :class:`TwoOutputs` (``both``, or ``stashed``: ``z`` taken
    from the module's attribute), or on ``y`` alone (``first``)."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.lin, self.pair = nn.Linear(3, 4), TwoOutputs(4, stash=use == "stashed")
        self.head, self.use = nn.Linear(4 if use == "first" else 8, 2), use

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        if self.use == "stashed":
            y, z = self.pair(h), self.pair.z
        else:
            y, (z,) = self.pair(h)
        return self.head(y if self.use == "first" else torch.cat([y, z], 1))


@pytest.mark.parametrize(
    "build,reason",
    [
        (lambda: UsesBoth("stashed"), "bypasses its module's output"),
        (PairUser, "computes one of its outputs from another"),
    ],
    ids=["second_output_kept_on_the_module", "output_computed_from_another"],
)
def test_outputs_the_engine_cannot_follow_are_routed(build: Callable[[], nn.Module], reason: str) -> None:
    """Two modules whose rows through their outputs would be wrong, routed with the reason and
    exact. ``UsesBoth("stashed")``: the residuals reach the module's parameter through ``z``, its
    autograd node's second output, which the module keeps instead of returning, beside ``y``, the
    output it returns; the locality walk enters a region through the edges of its outputs only
    (entering through any edge of the node, it took the rows through ``y`` alone: a wrong Gram).
    ``PairUser``'s module returns ``(h, h^2)``: the gradient at ``h`` holds the path through
    ``h^2``, so rows through both outputs would count it twice; the walk finds ``h``'s edge inside
    the module's own region."""
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    closure = lambda: model(x)  # noqa: E731
    with pytest.warns(UserWarning, match=reason):
        fast = HooksEngine(model).compute(closure)
    reference = ReferenceEngine(list(model.parameters())).compute(closure)
    assert_close("gram vs reference", fast.gram, reference.gram)


def test_the_engines_own_vmap_attempts_warn_nothing() -> None:
    """An LSTM's rows are first tried by ``torch.func`` (it has no batching rule for the fused
    kernel and says so with "There is a performance drop ..." before the engine takes the graph
    way): a warning about the engine's own call, at every step, that no user can act on. Steps
    warn nothing now (an LSTM using its final state, whose rows the engine takes itself)."""
    torch.manual_seed(0)
    model = Recurrent("LSTM", "state")
    x, y = torch.randn(6, 4, 3), torch.randn(6, 2)
    opt = gramnewton.GramGaussNewton(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.step(lambda: model(x) - y)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("vocab,n,positions", [(5, 6, 8), (1000, 7, 3), (3, 1, 5), (50, 9, 1)])
def test_token_rows_gram_is_the_dense_rows_gram(vocab: int, n: int, positions: int) -> None:
    """:class:`handlers.TokenRows`' Gram, summed token by token over the pairs of samples that
    share it, against its dense rows' ``J J^T`` (float64): tokens repeated within a sample and
    across samples (5 tokens, 8 positions), mostly distinct ones, one sample, one position."""
    torch.manual_seed(vocab + n)
    tokens = torch.randint(0, vocab, (n, positions))
    piece = handlers.TokenRows(tokens, torch.randn(n, positions, 4, dtype=torch.float64), (vocab, 4))
    gram = torch.zeros(n, n, dtype=torch.float64)
    piece.add_gram_lower(gram)
    jac = piece.dense().jac
    assert_close("gram", gram, jac @ jac.T)


@pytest.mark.parametrize("positions,tokens,kind", [(5, 8, "UsedRows"), (2, 40, "TokenRows")])
def test_an_embeddings_rows_are_those_of_the_tokens_a_batch_uses(positions: int, tokens: int, kind: str) -> None:
    """An embedding's per-sample gradients were the whole table's, ``(n, vocab * dim)``: at 30,000
    tokens of 64 a 128-sample batch's rows took 1 GB and their Gram 32 G multiply-adds, though a
    sample touches the rows of its own tokens only. The piece holds the rows of the ``u`` tokens
    the batch uses (:class:`handlers.UsedRows`), or, with more than ``T^2`` of them, the tokens and
    their output gradients (:class:`handlers.TokenRows`, a Gram masked by token equality); its
    Gram part, ``J^T v``, ``J v`` and dense ``J`` equal the whole table's (float64, padding among
    the tokens; sparse gradients too)."""
    torch.manual_seed(0)
    for sparse in (False, True):
        emb = nn.Embedding(1000, 4, padding_idx=7, sparse=sparse).double()
        a = torch.randint(0, tokens, (6, positions))
        a[0, 0] = 7
        g = torch.randn(6, positions, 4, dtype=torch.float64)
        piece = handlers.handler_for(emb).contributions(emb, a, g, frozenset({"weight"}))["weight"]
        assert type(piece).__name__ == kind
        whole = torch.zeros(6, 1000, 4, dtype=torch.float64)  # the table's rows, sample by sample
        for i in range(6):
            for t in range(positions):
                if a[i, t] != 7:
                    whole[i, a[i, t]] += g[i, t]
        whole = whole.reshape(6, -1)
        gram = torch.zeros(6, 6, dtype=torch.float64)
        piece.add_gram_lower(gram)
        handlers.mirror_lower(gram)
        v, w = torch.randn(6, dtype=torch.float64), torch.randn(4000, dtype=torch.float64)
        assert_close("gram", gram, whole @ whole.T)
        assert_close("J^T v", piece.jt_times(v), whole.T @ v)
        assert_close("J v", piece.j_times(w), whole @ w)
        assert_close("J", piece.dense().jac, whole)


@pytest.mark.parametrize(
    "name",
    [
        "attention_causal_mask",
        "attention_padding_mask",
        "attention_causal_and_padding",
        "transformer_decoder_cross_attention",
    ],
)
def test_masked_attention_takes_the_attention_handlers_factors(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A causal ``attn_mask`` and a ``key_padding_mask`` (a GPT-like or a padded batch), and a
    decoder's cross-attention (queries and keys of two lengths) sent the attention to the general
    way (its rows through its own graph, a backward of the attention a row); masks are now run
    again with the attention, as the additive mask MultiheadAttention applies, and the three
    projections of a cross-attention are dense blocks: no fallback (exactness: the case table)."""
    fallbacks = []
    general = handlers._autograd_rows
    monkeypatch.setattr(handlers, "_autograd_rows", lambda *a, **k: fallbacks.append(1) or general(*a, **k))
    model, x, _ = build(next(c for c in CASES if c.name == name))
    HooksEngine(model).compute(lambda: model(x))
    assert not fallbacks


class WeightAndGain(nn.Module):
    """``F.linear(x, weight) * gain``, given (below) a handler that computes ``weight`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.gain = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) * self.gain


def test_a_handler_that_leaves_out_a_parameter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler registered without ``parameter_names`` and asked for a parameter it does not
    compute (``gain``): the step raises and changes nothing, where the parameter's rows would have
    been zero (a wrong Gram). The same handler declaring its names has the module's rows taken
    through its graph, equal to the dense ``J``."""

    def weight_only(module: nn.Module, a: Tensor, g: Tensor, names: frozenset) -> dict:
        return {"weight": handlers.Dense(torch.einsum("no,ni->noi", g, a).reshape(g.shape[0], -1))}

    torch.manual_seed(0)
    model = seq(WeightAndGain(), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    monkeypatch.setitem(handlers.HANDLERS, WeightAndGain, handlers.LayerHandler(weight_only))
    before = copy.deepcopy(model.state_dict())
    opt = gramnewton.GramGaussNewton(model, engine="hooks")
    with pytest.raises(RuntimeError, match=r"WeightAndGain computed no rows for its parameter\(s\) \['gain'\]"):
        opt.step(lambda: model(x) - y)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    declared = handlers.LayerHandler(weight_only, parameter_names=handlers.fixed_names("weight"))
    monkeypatch.setitem(handlers.HANDLERS, WeightAndGain, declared)
    params = list(model.parameters())
    gram = HooksEngine(model, params).compute(lambda: model(x) - y).gram
    jac = dense_jacobian(model, x, params)
    assert_close("gram vs jacrev", gram, jac @ jac.T)


def test_residuals_independent_of_hooked_parameters() -> None:
    model = Unknown().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    engine = HooksEngine(model, [model.w, model.lin.bias])
    closure = lambda: torch.tanh(x[:, :2] * 1.0) @ model.w[:2]  # noqa: E731
    with pytest.warns(UserWarning, match="used outside its own module"):  # w, outside Unknown's forward
        fast = engine.compute(closure)
    ref = ReferenceEngine([model.w, model.lin.bias]).compute(closure)
    assert_close("gram", fast.gram, ref.gram)


@pytest.mark.parametrize(
    "norm", [nn.BatchNorm2d(2), nn.BatchNorm2d(2, affine=False), nn.SyncBatchNorm(2, affine=False)]
)
def test_batchnorm_in_training_mode_raises(norm: nn.Module) -> None:
    model = seq(nn.Conv2d(1, 2, 3), norm, nn.Flatten(), nn.Linear(18, 1))
    with pytest.raises(ValueError, match="BatchNorm.* in training mode"):
        HooksEngine(model).compute(lambda: model(torch.randn(4, 1, 5, 5)).squeeze(1))


def test_routing_warns_once_per_engine() -> None:
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 1))
    x = torch.randint(0, 5, (4, 2))
    with pytest.warns(UserWarning, match="scale_grad_by_freq"):
        engine = HooksEngine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.compute(lambda: model(x)[:, 0])
    assert list(engine.reference_reasons) == [0]  # the embedding's weight, the first parameter


def test_batch_not_in_dimension_zero_is_routed() -> None:
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 4, 3, dtype=torch.float64)  # Linear sees (b*4, 3) after the reshape below
    closure = lambda: model(x.reshape(-1, 3)).reshape(5, -1)  # noqa: E731
    engine = HooksEngine(model)
    with pytest.warns(UserWarning, match="batch"):
        fast = engine.compute(closure)
    assert_close("gram", fast.gram, ReferenceEngine(list(model.parameters())).compute(closure).gram)


def test_input_modified_in_place_raises() -> None:
    lin = nn.Linear(3, 3)

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: Tensor) -> Tensor:
            h = x * 1.0
            out = self.lin(h)
            h.mul_(2.0)  # Linear does not save its input for the input gradient: autograd is silent
            return out.sum(1) + h.sum(1)

    model = InPlace()
    with pytest.raises(RuntimeError, match="modified in place"):
        HooksEngine(model).compute(lambda: model(torch.randn(4, 3)))


def test_hooks_are_removed_and_do_not_fire_later() -> None:
    model = seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(4, 3)
    HooksEngine(model).compute(lambda: model(x).squeeze(1))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model(x).sum().backward()  # an ordinary backward afterwards is unaffected
    assert model[0].weight.grad is not None


def test_select_engine_and_optimizer_default() -> None:
    model = get_model("resnet8_fixup")
    params = list(model.parameters())
    assert isinstance(select_engine(params, model, "auto"), HooksEngine)
    assert isinstance(select_engine(params, model, "hooks"), HooksEngine)
    assert isinstance(select_engine(params, None, "auto"), ReferenceEngine)
    assert isinstance(
        gramnewton.GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).engine, HooksEngine
    )
    with pytest.raises(ValueError, match="needs the model"):
        select_engine(params, None, "hooks")
    raw = Unknown()  # a module without a handler: taken by the hooks engine (AUTOGRAD_ROWS)
    assert isinstance(select_engine([raw.w], raw, "auto"), HooksEngine)
    counted = nn.Embedding(5, 3, scale_grad_by_freq=True)  # a handler that refuses the instance
    assert isinstance(select_engine(list(counted.parameters()), counted, "auto"), ReferenceEngine)


def test_optimizer_step_matches_reference_engine() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    results = []
    for engine in ("auto", "reference"):
        torch.manual_seed(2)
        model = get_model("resnet8_gn", groups=4).double()
        opt = gramnewton.GramGaussNewton(
            model, alpha=0.1, weight_decay=1e-3, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0
        )
        opt.step(lambda: model(x).squeeze(1) - y)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert_close("parameters after one step", results[0], results[1])


@pytest.mark.parametrize(
    ("channels", "groups", "expected"),
    [(16, 8, 8), (6, 4, 3), (7, 8, 7), (7, 4, 1), (12, 5, 4), (3, 8, 3), (64, 32, 32)],
)
def test_group_count(channels: int, groups: int, expected: int) -> None:
    from gramnewton.convert import group_count

    assert group_count(channels, groups) == expected


def test_convert_batchnorm_replaces_every_batchnorm() -> None:
    torch.manual_seed(0)
    model = get_model("resnet8_bn")
    bn = model.norm1
    with torch.no_grad():
        bn.weight.uniform_()
    out = gramnewton.convert_batchnorm(model, groups=8)
    assert out is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.norm1, nn.GroupNorm) and model.norm1.num_groups == 8
    assert torch.equal(model.norm1.weight, bn.weight)
    engine = gramnewton.GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).engine
    assert isinstance(engine, HooksEngine) and not engine.reference_reasons


def test_convert_batchnorm_bare_module_and_odd_channels() -> None:
    gn = gramnewton.convert_batchnorm(nn.BatchNorm1d(6, affine=False), groups=4)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 3 and not gn.affine
    with pytest.raises(ValueError, match="positive"):
        gramnewton.convert_batchnorm(nn.BatchNorm2d(4), groups=0)


# the patches path is the CPU's; and on a GPU the hooks of the backward pass run in autograd's
# device thread, where the engine's workspace (a context variable) is not active, so no buffer is
# kept (the CUDA caching allocator reuses the blocks instead; the results are the same)
ON_THE_CPU = pytest.mark.skipif(DEVICE.type != "cpu", reason="the engine's workspace is used on the CPU only")


@ON_THE_CPU
@pytest.mark.parametrize(
    ("path", "keep_above"),
    [("patches", 0), ("patches", float("inf")), ("grouped", float("inf"))],
    ids=["patches_kept_conv_scratch", "patches_kept_buffers", "grouped_kept_buffers"],
)
def test_workspace_buffers_are_reused_and_stale_systems_raise(
    path: str, keep_above: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steady state: the second step reuses every workspace buffer (same storage), its results
    are exact, and a system of the first step, whose buffers were written over, refuses to run."""
    monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", path)
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", keep_above)
    case = next(c for c in CASES if c.name == "conv2d_b36_syrk")
    model, x, y = build(case)
    params = list(model.parameters())
    closure = lambda: model(x).reshape(case.batch, -1) - y  # noqa: E731
    engine = HooksEngine(model, params)
    first = engine.compute(closure)
    storages = {k: b.untyped_storage().data_ptr() for k, b in engine.workspace._buffers.items()}
    assert storages and engine.workspace.nbytes > 0
    with torch.no_grad():
        for p in params:
            p.mul_(1.1)
    second = engine.compute(closure)
    assert {k: b.untyped_storage().data_ptr() for k, b in engine.workspace._buffers.items()} == storages
    reference = ReferenceEngine(params).compute(closure)
    v = torch.randn(second.gram.shape[0], dtype=torch.float64)
    assert_close("gram, second step", second.gram, reference.gram)
    assert_close(
        "J^T v, second step",
        torch.cat([t.reshape(-1) for t in second.jt_times(v)]),
        torch.cat([t.reshape(-1) for t in reference.jt_times(v)]),
    )
    if keep_above == float("inf"):  # per-sample gradients kept in the workspace until J^T v
        with pytest.raises(RuntimeError, match="later step"):
            first.jt_times(v)


def test_a_conv_keeps_its_factors_when_its_gradients_are_much_larger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default rule: a weight whose per-sample gradients are more than ``KEEP_FACTORS_ABOVE`` (4)
    times ``x`` and ``g`` together keeps ``(x, g)`` (576 entries per sample against 32 + 32); at
    2.25 times (against 128 + 128) its gradients are kept."""
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    module, handler = nn.Conv2d(8, 8, 3, padding=1), handlers.handler_for(nn.Conv2d(1, 1, 1))
    small, large = torch.randn(5, 8, 2, 2), torch.randn(5, 8, 4, 4)
    piece = handler.contributions(module, small, torch.randn_like(small), frozenset({"weight"}))["weight"]
    assert isinstance(piece, handlers.KeptConv)
    piece = handler.contributions(module, large, torch.randn_like(large), frozenset({"weight"}))["weight"]
    assert not isinstance(piece, handlers.KeptConv)


@pytest.mark.parametrize("path", ["patches", "grouped_chunks"])
def test_kept_convs_multiply_with_their_scratch_while_it_is_intact(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two kept convolutions of one shape form their per-sample gradients in one scratch: the one
    formed last (nearest the input) gets ``J^T v`` and ``J u`` from them, the other by
    convolutions; both exact (float64, jacrev). A system whose scratch the next step wrote over
    (the parameters changed in between) falls back to convolutions, exact still."""
    monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", "grouped" if path == "grouped_chunks" else path)
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", 0)
    # two samples per chunk: their gradients (81 entries each) are larger than their x or g (48)
    monkeypatch.setattr(handlers, "GROUPED_CHUNK_BYTES", 2 * 8 * 81)
    intact: list[bool] = []
    formed = handlers.KeptConv._intact

    def spy(self: handlers.KeptConv) -> handlers.Dense | handlers.PermutedDense | None:
        out = formed(self)
        intact.append(out is not None)
        return out

    monkeypatch.setattr(handlers.KeptConv, "_intact", spy)
    torch.manual_seed(0)
    conv = functools.partial(nn.Conv2d, 3, 3, 3, padding=1)
    model = seq(conv(), nn.Tanh(), conv(), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)).double()
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    params = list(model.parameters())
    closure = lambda: model(x) - y  # noqa: E731
    jac = dense_jacobian(model, x, params)
    v = torch.randn(12, dtype=torch.float64)
    u = [torch.randn_like(p) for p in params]
    engine = HooksEngine(model, params)
    first = engine.compute(closure)
    assert_close("gram", first.gram, jac @ jac.T)
    for when in ("first step", "after the next step"):
        assert_close(f"J^T v, {when}", torch.cat([t.reshape(-1) for t in first.jt_times(v)]), jac.T @ v)
        assert_close(f"J u, {when}", first.j_times(u), jac @ torch.cat([t.reshape(-1) for t in u]))
        if when == "first step":
            assert intact == [True, False, True, False]  # per product, the convolutions in order
            intact.clear()
            with torch.no_grad():
                for p in params:
                    p.mul_(1.1)
            engine.compute(closure)
    assert intact == [False] * 4


def test_a_scratch_stamp_gives_the_hand_out_back_until_the_slot_or_step_moves_on() -> None:
    """``Workspace.scratch_stamp``: only for the slot's own hand-out; ``tensor()`` returns it
    until the slot is handed out again or another step starts (whose start may cut the buffer)."""
    work, like = Workspace(), torch.zeros(1, dtype=torch.float64)
    work.new_step()
    work.scratch("slot", (4, 3), like)
    work.new_step()  # a step asking for less: the start of the step after it cuts the buffer to that
    handed = work.scratch("slot", (2, 3), like)
    handed.copy_(torch.arange(6.0).view(2, 3))
    assert work.scratch_stamp("slot", torch.zeros(2, 3, dtype=torch.float64)) is None
    assert work.scratch_stamp("other", handed) is None
    stamp = work.scratch_stamp("slot", handed)
    assert torch.equal(stamp.tensor(), torch.arange(6.0).view(2, 3))
    work.scratch("slot", (1,), like)
    assert stamp.tensor() is None
    stamp = work.scratch_stamp("slot", work.scratch("slot", (2, 3), like))
    work.new_step()
    assert stamp.tensor() is None


@ON_THE_CPU
def test_patches_are_gathered_in_chunks_of_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside an engine the patches scratch holds ``ceil(n / PATCH_CHUNKS)`` samples' patches, not
    all ``n`` (the Gram and ``J^T v`` of every chunk, the last one short, are checked exactly by
    ``test_conv_weight_paths`` on ``conv2d_b7_k2``)."""
    monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", "patches")
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    case = next(c for c in CASES if c.name == "conv2d_b7_k2")
    model, x, y = build(case)
    engine = HooksEngine(model)
    system = engine.compute(lambda: model(x).reshape(case.batch, -1) - y)
    reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x).reshape(case.batch, -1) - y)
    assert_close("gram", system.gram, reference.gram)
    rows, per_sample = 14, 5 * 5 * 3 * 3 * 3  # (b * k) rows; (ho, wo, kh, kw, kin) patches per sample
    chunk = -(-rows // handlers.PATCH_CHUNKS)
    assert engine.workspace._buffers[("scratch", "conv_patches")].numel() == chunk * per_sample < rows * per_sample


def test_workspace_frees_kept_buffers_a_step_did_not_use() -> None:
    from gramnewton.engines.workspace import Workspace

    work, like = Workspace(), torch.zeros(1)
    work.new_step()
    for _ in range(3):  # e.g. a first step's timing trials
        work.keep("jac", (4, 5), like)
    work.new_step()
    first, _ = work.keep("jac", (4, 5), like)
    assert work.nbytes == 3 * 20 * 4
    work.new_step()  # the step above used one buffer of the slot: the other two go
    again, _ = work.keep("jac", (4, 5), like)
    assert again.data_ptr() == first.data_ptr() and work.nbytes == 20 * 4
    grown = work.scratch("patches", (10,), like)
    assert work.scratch("patches", (2, 3), like).data_ptr() == grown.data_ptr()  # a smaller view, no new buffer


def test_a_step_leaves_no_hooked_call_or_autograd_graph_behind() -> None:
    """Each output's autograd node holds its hook and the hook its call: a call still holding the
    node would form a cycle through C++ that Python's collector cannot free, leaking every step's
    graph nodes (which fragmented glibc's heap: docs/performance.md)."""
    import gc

    from gramnewton.engines import hooks

    case = next(c for c in CASES if c.name == "conv2d_b36_syrk")
    model, x, y = build(case)
    engine = HooksEngine(model)
    for _ in range(2):
        engine.compute(lambda: model(x).reshape(case.batch, -1) - y).jt_times(torch.ones(y.numel(), device=DEVICE))
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, hooks._Call)]


@pytest.mark.parametrize("failure", ["nan residuals", "closure raises mid-forward"])
def test_a_refused_step_leaves_no_hooked_call_behind(failure: str) -> None:
    """A step refused after (NaN residuals) or during (the closure raises) the hooked forward pass
    drops its calls' autograd nodes, so they are freed once the caller drops the exception (the
    exception's frames hold them until then)."""
    import gc

    from gramnewton.engines import hooks

    case = next(c for c in CASES if c.name == "conv2d_b36_syrk")
    model, x, y = build(case)
    engine = HooksEngine(model)

    def closure() -> Tensor:
        out = model(x).reshape(case.batch, -1)
        if failure == "closure raises mid-forward":
            raise RuntimeError("data loader broke")
        return out * float("nan") - y

    with pytest.raises((ValueError, RuntimeError)) as kept:
        engine.compute(closure)
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, hooks._Call)]  # held by the traceback's frames
    assert alive and all(not call.edges and not call.input_nodes for call in alive)
    del kept, alive
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, hooks._Call)]


def test_workspace_cuts_scratch_to_what_the_last_step_used() -> None:
    """Scratch grown by a step of larger shapes (or a slot a step no longer uses) is not held on."""
    from gramnewton.engines.workspace import Workspace

    work, like = Workspace(), torch.zeros(1)
    work.new_step()
    work.scratch("patches", (100,), like)  # e.g. a first step at a larger batch
    work.scratch("jac", (7,), like)
    work.new_step()
    work.scratch("patches", (3, 4), like)  # this step uses 12 entries and no "jac"
    assert work.nbytes == (100 + 7) * 4  # nothing is freed in the middle of a step
    work.new_step()
    assert work.nbytes == 12 * 4
    kept = work.scratch("patches", (12,), like)
    work.new_step()  # a step that used all of it keeps the same storage
    assert work.scratch("patches", (2, 6), like).data_ptr() == kept.data_ptr() and work.nbytes == 12 * 4


def test_timing_trials_leave_no_workspace_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A path that loses the first-step timing must not keep its buffers in the workspace."""
    monkeypatch.setattr(handlers, "CONV_WEIGHT_PATHS", handlers.MeasuredChoice())
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "MAX_CORRELATE_CHANNELS", 0)  # two candidates: grouped wins by construction
    monkeypatch.setattr(handlers, "UNTIMED_PATCHES_BELOW", 0)  # timed at this size too
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    slow_patches = handlers._conv2d_weight_per_sample_patches

    def patches_that_lose(*args: object) -> handlers.PermutedDense:
        time.sleep(0.05)
        return slow_patches(*args)

    monkeypatch.setattr(handlers, "_conv2d_weight_per_sample_patches", patches_that_lose)
    model = seq(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 1)).double()
    engine = HooksEngine(model)
    engine.compute(lambda: model(torch.randn(4, 2, 4, 4, dtype=torch.float64)).squeeze(1))
    assert set(handlers.CONV_WEIGHT_PATHS.choices.values()) == {"grouped"}
    # only the winner's kept per-sample gradients, (4, 3 * 2 * 3 * 3) float64: no patches scratch
    assert list(engine.workspace._buffers) == [("keep", "conv_jac", 0)] and engine.workspace.nbytes == 4 * 54 * 8


def test_compute_under_no_grad_is_the_same_system() -> None:
    """An engine called inside ``torch.no_grad()`` (e.g. by ``full_batch_step``) gives the same
    system: the hooks engine's operations on the residuals (a reshape, a column's sum) ran under
    the caller's no_grad, which cut their graph (``'NoneType' object has no attribute
    'next_functions'``)."""
    case = next(c for c in CASES if c.name == "conv2d_b36_syrk")
    model, x, y = build(case)
    params = list(model.parameters())
    closure = lambda: model(x).reshape(case.batch, -1) - y  # noqa: E731
    for make in (lambda: HooksEngine(model, params), lambda: ReferenceEngine(params)):
        plain = make().compute(closure)
        with torch.no_grad():
            quiet = make().compute(closure)
        if DEVICE.type == "cpu":
            assert torch.equal(plain.gram, quiet.gram) and torch.equal(plain.residuals, quiet.residuals)
        else:  # cuDNN's weight gradients may sum in another order from one call to the next
            assert_close("gram under no_grad", quiet.gram, plain.gram)
            assert_close("residuals under no_grad", quiet.residuals, plain.residuals)


class ReadsMetadata(nn.Module):
    """A forward that reads its layers' parameters' metadata outside them (``shape``, ``grad``,
    ``requires_grad``), as shape checks and ``torch.profiler(with_stack=True)`` do."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        assert self.first.weight.shape[1] == x.shape[1] and self.first.weight.requires_grad
        _ = self.last.weight.grad
        return self.last(torch.tanh(self.first(x)))


@pytest.mark.parametrize("where", ["forward", "profiler"])
def test_reading_a_parameters_metadata_is_no_use_of_it(where: str) -> None:
    """Reading a parameter's ``shape``, ``grad`` or ``requires_grad`` outside its module uses none
    of its values: nothing is routed (under ``torch.profiler(with_stack=True)``, which reads every
    parameter's ``grad``, every parameter went to the reference engine), and the Gram is exact.
    A use of its values outside (``x @ emb.weight.T``, the ``Foreign`` case) is still routed."""
    torch.manual_seed(0)
    model = ReadsMetadata() if where == "forward" else nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    model = model.double().to(DEVICE)
    x, y = torch.randn(6, 3, dtype=torch.float64, device=DEVICE), torch.randn(6, 2, dtype=torch.float64, device=DEVICE)
    params = list(model.parameters())
    closure = lambda: model(x) - y  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if where == "profiler":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True):
                fast = HooksEngine(model, params).compute(closure)
        else:
            fast = HooksEngine(model, params).compute(closure)
    assert not [w for w in caught if "reference engine" in str(w.message)]
    jac = dense_jacobian(model, x, params)
    assert_close("gram vs jacrev", fast.gram, jac @ jac.T)
