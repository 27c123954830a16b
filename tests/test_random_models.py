"""Random networks built from the pieces users combine, the hooks engine against the reference.

Each seed draws a small network (float64): Linear layers, activations, LayerNorm, dropout at
work, a layer applied twice, weights in a ParameterList, and, nested up to two deep, modules without a handler that hold a
parameter of their own around hooked layers (a gate after them, a scale before them) and
gradient checkpointing; on sequences also a learned position embedding, recurrent layers (with or
without a learned initial state), cells stepped in a loop, attention and transformer encoder
layers. The Gram matrix and ``J^T v`` of the hooks engine must equal the reference engine's on the
same random draws. Twenty convolutional networks are drawn the same way (1x1 and 3x3
convolutions, grouped, dilated or weight-normed, GroupNorm, BatchNorm in eval mode, Fixup's
scalars, a learned channel scale, dropout, a shared convolution, residuals with or without a
learned gate, three poolings). Without the engine ignoring hooks while a handler runs a backward
pass of its own through the recorded graph, 4 of the 40 first networks fail; with the engine as it
was before the recurrent layers had a handler (whose pass runs on a graph of its own), 9 did: a
wrong Gram or ``J^T v`` without a warning, or a crash.

The optimizer's whole step is checked the same way: on 24 dense and 12 convolutional seeds (at
least two outputs under cross-entropy) with a random configuration (square loss, or cross-entropy
with the gradient or the exact curvature; momentum 0 or 0.9; ``lam`` 1 or 16; the default
gain-ratio damping or a fixed ``alpha``; bias correction; a sample- or parameter-space solve;
geodesic acceleration under the square loss), three ``GramGaussNewton`` steps with
``engine="hooks"`` and with ``engine="reference"``, from copies of one network, must reach the same
losses and parameters (to 1e-9 of each tensor's scale; over 150 configurations they differed by
at most 4e-12). That reaches what the Gram test does not: ``J v`` (momentum's, in sample space),
the dense ``J`` of a parameter-space solve, a general loss's pseudo-residuals and the state carried
between steps. With ``Dense.j_times`` or ``Factored.j_times`` off by a factor 1 + 1e-6, or the
hooks engine's ``J v`` assigning its pieces' parts instead of adding them, 8 of its 36 cases fail
and none of the Gram test's 60. Code both engines share (``update.py``) is not under this test:
``test_momentum.py`` checks the momentum term against the parameter-space solve.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

from gramnewton import GramGaussNewton
from gramnewton.engines import HooksEngine, ReferenceEngine
from gramnewton.nn import ScalarBias, ScalarScale

WIDTH, STEPS, BATCH = 6, 4, 5
CHANNELS, SIZE = 4, 6


class Gate(nn.Module):
    """``h + g * inner(h)``: a parameter of its own after hooked layers."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.g = inner, nn.Parameter(torch.full((WIDTH,), 0.4))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.g * self.inner(h)


class PreScale(nn.Module):
    """``inner(h * s)``: a parameter of its own before hooked layers (its rows pass through them)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.s = inner, nn.Parameter(torch.full((WIDTH,), 1.2))

    def forward(self, h: Tensor) -> Tensor:
        return self.inner(h * self.s)


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h: Tensor) -> Tensor:
        return checkpoint(self.inner, h, use_reentrant=False)


class Twice(nn.Module):
    """One Linear applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, h: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.lin(h)))


class ParameterListBlock(nn.Module):
    """``tanh(h W_0) W_1`` with the weights in an ``nn.ParameterList`` (used by this module)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(WIDTH, WIDTH) / 3) for _ in range(2)])

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(h @ self.weights[0]) @ self.weights[1]


class Dropout(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return F.dropout(h, 0.2, self.training)


class Position(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(0.1 * torch.randn(STEPS, WIDTH))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.p


class Recurrent(nn.Module):
    """A recurrent layer's output sequence, its initial state learned or zero."""

    def __init__(self, kind: str, learned_state: bool) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(WIDTH, WIDTH, batch_first=True)
        self.h0 = nn.Parameter(0.3 * torch.randn(1, 1, WIDTH)) if learned_state else None

    def forward(self, h: Tensor) -> Tensor:
        if self.h0 is None:
            return self.rnn(h)[0]
        h0 = self.h0.expand(1, h.shape[0], WIDTH).contiguous()
        return self.rnn(h, (h0, h0) if isinstance(self.rnn, nn.LSTM) else h0)[0]


class CellLoop(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell = getattr(nn, kind)(WIDTH, WIDTH)

    def forward(self, h: Tensor) -> Tensor:
        state, outputs = None, []
        for t in range(h.shape[1]):
            state = self.cell(h[:, t], state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outputs, 1)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)

    def forward(self, h: Tensor) -> Tensor:
        return self.attention(h, h, h, need_weights=False)[0]


def draw_block(rng: random.Random, sequences: bool, depth: int = 0) -> nn.Module:
    """One block: a plain layer (or weights in a ParameterList), or (above depth 2 not) a module
    around one or two blocks."""
    kinds = ["linear", "activation", "layer_norm", "dropout", "twice", "parameter_list"]
    if depth < 2:
        kinds += ["gate", "prescale", "checkpoint"]
    if sequences:
        kinds += ["position", "gru", "lstm", "rnn", "cells", "attention", "encoder"]
    kind = rng.choice(kinds)
    if kind in ("gate", "prescale", "checkpoint"):
        inner = nn.Sequential(*(draw_block(rng, sequences, depth + 1) for _ in range(rng.randint(1, 2))))
        return {"gate": Gate, "prescale": PreScale, "checkpoint": Checkpointed}[kind](inner)
    if kind in ("gru", "lstm", "rnn"):
        return Recurrent(kind.upper(), rng.random() < 0.5)
    simple = {
        "linear": lambda: nn.Linear(WIDTH, WIDTH),
        "activation": lambda: rng.choice([nn.Tanh(), nn.GELU(), nn.SiLU()]),
        "layer_norm": lambda: nn.LayerNorm(WIDTH),
        "dropout": Dropout,
        "twice": Twice,
        "parameter_list": ParameterListBlock,
        "position": Position,
        "cells": lambda: CellLoop(rng.choice(["RNNCell", "GRUCell", "LSTMCell"])),
        "attention": SelfAttention,
        "encoder": lambda: nn.TransformerEncoderLayer(WIDTH, 2, 8, dropout=0.1, batch_first=True),
    }
    return simple[kind]()


class RandomNetwork(nn.Module):
    def __init__(self, rng: random.Random, sequences: bool, outputs: int) -> None:
        super().__init__()
        self.embed = nn.Linear(3, WIDTH)
        self.body = nn.Sequential(*(draw_block(rng, sequences) for _ in range(rng.randint(2, 5))))
        self.head = nn.Linear(WIDTH, outputs)
        self.sequences = sequences

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.embed(x))
        return self.head(h.mean(1) if self.sequences else h)


class ChannelScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((1, CHANNELS, 1, 1), 1.1))

    def forward(self, h: Tensor) -> Tensor:
        return h * self.w


class Residual(nn.Module):
    """``h + inner(h)``, with a learned gate on the branch or without."""

    def __init__(self, inner: nn.Module, gated: bool) -> None:
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.tensor(0.5)) if gated else None

    def forward(self, h: Tensor) -> Tensor:
        branch = self.inner(h)
        return h + (branch if self.gate is None else self.gate * branch)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(torch.tanh(self.conv(h)))


def draw_conv_block(rng: random.Random, depth: int = 0) -> nn.Module:
    """A convolution (1x1 or 3x3, grouped or dilated, weight-normed or not), a norm layer, Fixup's
    scalars, a learned channel scale, dropout, a shared convolution or a residual around blocks."""
    kinds = ["conv", "activation", "group_norm", "batch_norm", "scalars", "channel_scale", "dropout", "shared"]
    kind = rng.choice(kinds + (["residual", "gated_residual"] if depth < 2 else []))
    if kind == "conv":
        kernel = rng.choice([1, 3])
        dilation = rng.choice([1, 2]) if kernel == 3 else 1
        conv = nn.Conv2d(
            CHANNELS,
            CHANNELS,
            kernel,
            padding=dilation * (kernel // 2),
            dilation=dilation,
            groups=rng.choice([1, 2]) if kernel == 3 else 1,
            bias=rng.random() < 0.7,
        )
        return parametrizations.weight_norm(conv) if rng.random() < 0.2 else conv
    if kind in ("residual", "gated_residual"):
        inner = nn.Sequential(*(draw_conv_block(rng, depth + 1) for _ in range(rng.randint(1, 2))))
        return Residual(inner, kind == "gated_residual")
    simple = {
        "activation": lambda: rng.choice([nn.ReLU(), nn.Tanh(), nn.GELU()]),
        "group_norm": lambda: nn.GroupNorm(2, CHANNELS),
        "batch_norm": lambda: nn.BatchNorm2d(CHANNELS),  # evaluated in eval mode (below)
        "scalars": lambda: nn.Sequential(ScalarBias(), ScalarScale()),
        "channel_scale": ChannelScale,
        "dropout": lambda: nn.Dropout2d(0.2),
        "shared": SharedConv,
    }
    return simple[kind]()


class RandomConvNetwork(nn.Module):
    def __init__(self, rng: random.Random, outputs: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.body = nn.Sequential(*(draw_conv_block(rng) for _ in range(rng.randint(2, 5))))
        self.pool = rng.choice(["mean", "max", "flatten"])
        self.head = nn.Linear(CHANNELS * SIZE * SIZE if self.pool == "flatten" else CHANNELS, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.stem(x))
        pooled = {"mean": lambda: h.mean((2, 3)), "max": lambda: h.amax((2, 3)), "flatten": lambda: h.flatten(1)}
        return self.head(pooled[self.pool]())


def without_cudnn_rnn_in_eval(model: nn.Module) -> contextlib.AbstractContextManager:
    """cuDNN refuses an RNN's backward pass in eval mode (a PyTorch limit, on a GPU only): a network
    with one there runs without cuDNN; any other (and every one on the CPU) as it is."""
    if any(isinstance(m, nn.RNNBase) and not m.training for m in model.modules()):
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


def draw_network(kind: str, seed: int, min_outputs: int = 1) -> tuple[nn.Module, Tensor]:
    """Seed ``seed``'s random network (``kind`` "dense" or "conv"; float64, in training mode or
    not, with ``min_outputs`` to 3 outputs) and a batch of inputs for it."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if kind == "conv":
        model = RandomConvNetwork(rng, outputs=rng.randint(min_outputs, 3)).double().train(rng.random() < 0.7)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # in training it couples the samples (refused)
        with torch.no_grad():  # away from the zero-initialised Fixup scalars
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(BATCH, 1, SIZE, SIZE, dtype=torch.float64)
    else:
        sequences = rng.random() < 0.6
        model = RandomNetwork(rng, sequences, outputs=rng.randint(min_outputs, 3)).double().train(rng.random() < 0.7)
        x = torch.randn(*((BATCH, STEPS, 3) if sequences else (BATCH, 3)), dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("kind, seed", [("dense", s) for s in range(40)] + [("conv", s) for s in range(20)])
def test_random_network_matches_the_reference_engine(kind: str, seed: int) -> None:
    model, x = draw_network(kind, seed)
    with warnings.catch_warnings(), without_cudnn_rnn_in_eval(model):
        warnings.simplefilter("ignore")  # routed parameters warn; they must be exact all the same
        torch.manual_seed(10_000 + seed)  # the same dropout masks in both engines' forward passes
        fast = HooksEngine(model).compute(lambda: model(x))
        torch.manual_seed(10_000 + seed)
        reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x))
    scale = reference.gram.abs().max()
    assert float((fast.gram - reference.gram).abs().max() / scale) < 1e-9, model.body
    v = torch.randn(fast.gram.shape[0], dtype=torch.float64)
    for got, want in zip(fast.jt_times(v), reference.jt_times(v)):
        assert float((got - want).abs().max()) <= 1e-9 * max(1.0, float(want.abs().max())), model.body


def draw_optimizer_options(rng: random.Random) -> dict[str, Any]:
    """``GramGaussNewton``'s keyword arguments other than the engine: the loss (with its
    curvature), momentum, ``lam``, the default damping rule or a fixed ``alpha``, bias correction,
    the solve space and (square loss only: refused otherwise) geodesic acceleration."""
    loss = rng.choice(["mse", "cross_entropy"])
    options: dict[str, Any] = dict(
        loss=loss,
        momentum=rng.choice([0.0, 0.9]),
        lam=rng.choice([1.0, 16.0]),
        # alpha > 0 always: with alpha = 0 and no momentum the reference engine, which holds J,
        # solves from J by SVD and the hooks engine from G, two different (both exact) solves
        alpha=rng.choice([0.05, 0.3]),
        adaptive_damping=rng.choice(["auto", False]),
        bias_correction=rng.random() < 0.5,
        solve_space=rng.choice(["sample", "parameter"]),
    )
    if loss == "mse":
        options["geodesic_acceleration"] = rng.random() < 0.5
    else:
        options["curvature"] = rng.choice(["gradient", "exact"])
    return options


@pytest.mark.parametrize("kind, seed", [("dense", s) for s in range(24)] + [("conv", s) for s in range(12)])
def test_random_optimizer_steps_match_the_reference_engine(kind: str, seed: int) -> None:
    """Three ``GramGaussNewton`` steps on a random network and a random configuration take the
    hooks engine and the reference engine to the same losses and parameters.

    The engine test above checks ``G`` and ``J^T v`` alone; the optimizer also uses ``J v``
    (momentum's ``J phi_{t-1}``, the gain ratio's predicted residuals), the dense ``J`` (the
    parameter-space solve), the engines through a general loss's pseudo-residuals, and the state
    carried from step to step (momentum, bias correction's count, the damping rule's ``alpha``
    and a rejected step's undoing), where a piece one engine gets wrong shows only from the
    second step on or under one option. Both optimizers start from copies of one network and see
    the same batches and dropout masks, so only the engines' rounding may separate them.
    """
    rng = random.Random(f"optimizer {kind} {seed}")
    options = draw_optimizer_options(rng)
    cross_entropy = options["loss"] == "cross_entropy"
    model, x = draw_network(kind, seed, min_outputs=2 if cross_entropy else 1)
    k = model.head.out_features
    targets = (
        (lambda: torch.randint(0, k, (BATCH,)))
        if cross_entropy
        else (lambda: torch.randn(BATCH, k, dtype=torch.float64))
    )
    batches = [(xt, targets()) for xt in (x, torch.randn_like(x), torch.randn_like(x))]
    runs: dict[str, tuple[list[float], list[dict[str, Tensor]]]] = {}
    for engine in ("hooks", "reference"):
        net = copy.deepcopy(model)
        opt = GramGaussNewton(net, engine=engine, **options)
        losses, params = [], []
        with warnings.catch_warnings(), without_cudnn_rnn_in_eval(net):
            warnings.simplefilter("ignore")  # routed parameters warn; they must be exact all the same
            for t, (xt, yt) in enumerate(batches):
                # the same dropout masks in step t of both runs, however often an engine ran the closure before
                torch.manual_seed(20_000 + 10 * seed + t)
                closure = (lambda: (net(xt), yt)) if cross_entropy else (lambda: net(xt) - yt)
                losses.append(float(opt.step(closure)))
                params.append({name: p.detach().clone() for name, p in net.named_parameters()})
        runs[engine] = losses, params
    (fast_losses, fast), (reference_losses, reference) = runs["hooks"], runs["reference"]
    context = f"{options}\n{model}"
    assert fast_losses == pytest.approx(reference_losses, rel=1e-9, abs=1e-12), context
    for t, (got, want) in enumerate(zip(fast, reference)):
        for name, p in want.items():
            error = float((got[name] - p).abs().max())
            # relative to the parameter's own scale: a step can send one tensor (a saturated
            # logit's weights under cross-entropy) far from the others
            assert error <= 1e-9 * max(1.0, float(p.abs().max())), f"step {t + 1}, {name}: {error:.3g}\n{context}"
