"""A GGN step on the models users write, against an SGD step and against the reference engine.

Not a test. Each model is stepped by ``GramGaussNewton(model, engine=E, momentum=0,
adaptive_damping=False)`` (a fixed step, so every step costs the same) and by SGD, interleaved,
on one batch; the median step time of each and the ratio to SGD are printed and appended to
``--out``. ``torch.set_num_threads(--threads)`` (default 2). The models:

- ``resnet8``: resnet8_fixup on ``(1, 28, 28)`` images, every layer with a handler (the baseline);
- ``resnet8_autocast``: the same closure under ``torch.autocast`` (bfloat16) on the device;
- ``learned_scale``, ``position_embedding``, ``channel_scale``: a module without a handler in
  front of resnet8 (``s * x``, ``x + p`` with ``p`` of one image's shape, a per-channel scale on
  the stem's 16 maps), whose rows the hooks engine takes through ``handlers.AUTOGRAD_ROWS``;
- ``raw_mlp``: an 8-96-96-1 tanh MLP written with raw ``nn.Parameter`` s in one module (b = 128);
- ``encoder``: two ``TransformerEncoderLayer(64, 4, 128, dropout=0, batch_first=True)`` on
  ``(16, 8)`` sequences (b = 64), a Linear embedding and head;
- ``encoder_sequence_first``: the same in PyTorch's default layout (``batch_first=False``: the
  layers see ``(T, b, 64)``);
- ``gru_state``, ``lstm_state``: ``GRU``/``LSTM(8, 64, batch_first=True)`` on ``(16, 8)``
  sequences (b = 64) and a Linear head on the final state ``h[-1]`` (``_, h = gru(x)``);
  ``gru_two_layers_bidirectional`` the same with a two-layer bidirectional GRU;
- ``gru_cell_loop``, ``lstm_cell_loop``: a ``GRUCell``/``LSTMCell(8, 64)`` stepped over the 16
  steps in a Python loop, a head on the last ``h``;
- ``text_embedding``: ``Embedding(30000, 64)`` of 16 tokens a sample (b = 128, drawn from the
  first 5,000), averaged, and a 64-64-1 tanh head (a batch uses at most 2,048 of the rows).

``--engines auto reference`` times both (the reference engine's step takes seconds on the
larger models; ``--reference-reps`` bounds its repetitions); ``parameters`` times
``GramGaussNewton(model.parameters())`` (torch.optim's idiom: the optimizer finds the modules at
its first step; before it did, that idiom always got the reference engine). ``--device cuda`` runs it on a GPU
(each step timed from a synchronised start to a synchronised end; ``cuda_check.sh`` does)::

    python benchmarks/user_models.py --out benchmarks/results/user_models.json
    python benchmarks/user_models.py --models learned_scale encoder --engines auto reference
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from results_log import append_record
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.lab.models import get_model

ROOT = Path(__file__).resolve().parents[1]


class LearnedScale(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s


class PositionEmbedding(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.p


class RawMLP(nn.Module):
    def __init__(self, d: int = 8, h: int = 96) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, h) / d**0.5), nn.Parameter(torch.zeros(h))
        self.w2, self.b2 = nn.Parameter(torch.randn(h, h) / h**0.5), nn.Parameter(torch.zeros(h))
        self.w3 = nn.Parameter(torch.randn(h, 1) / h**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return (torch.tanh(torch.tanh(x @ self.w1 + self.b1) @ self.w2 + self.b2) @ self.w3).squeeze(1)


class Encoder(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.embed, self.head, self.batch_first = nn.Linear(8, 64), nn.Linear(64, 1), batch_first
        self.layers = nn.Sequential(
            *(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first) for _ in range(2))
        )

    def forward(self, x: Tensor) -> Tensor:  # x (b, T, 8); without batch_first the layers see (T, b, 64)
        h = self.embed(x if self.batch_first else x.transpose(0, 1))
        return self.head(self.layers(h).mean(1 if self.batch_first else 0)).squeeze(1)


class RecurrentState(nn.Module):
    def __init__(self, kind: str, **options: Any) -> None:
        super().__init__()
        self.rnn, self.head = getattr(nn, kind)(8, 64, batch_first=True, **options), nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # (layers, b, hidden)
        return self.head(h[-1]).squeeze(1)


class CellLoop(nn.Module):
    """A recurrent cell stepped over the sequence in a Python loop (one call a step), a head on
    the last ``h``: how decoders and custom recurrences are written."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell, self.head = getattr(nn, kind)(8, 64), nn.Linear(64, 1)

    def forward(self, x: Tensor) -> Tensor:
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(h).squeeze(1)


def resnet8(front: nn.Module | None = None, after_stem: nn.Module | None = None) -> nn.Module:
    model = get_model("resnet8_fixup", in_channels=1, num_outputs=1)
    if after_stem is not None:
        model.bias1 = nn.Sequential(after_stem, model.bias1)
    return model if front is None else nn.Sequential(front, model)


# name -> (model builder, batch builder, whether the forward runs under autocast)
class TextEmbedding(nn.Module):
    def __init__(self, vocab: int = 30_000, dim: int = 64) -> None:
        super().__init__()
        self.embed, self.head = (
            nn.Embedding(vocab, dim),
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1)),
        )

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).mean(1)).squeeze(1)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor], bool]] = {
    "resnet8": (resnet8, lambda: torch.randn(128, 1, 28, 28), False),
    "resnet8_autocast": (resnet8, lambda: torch.randn(128, 1, 28, 28), True),
    "learned_scale": (lambda: resnet8(front=LearnedScale((1,))), lambda: torch.randn(128, 1, 28, 28), False),
    "position_embedding": (
        lambda: resnet8(front=PositionEmbedding((1, 28, 28))),
        lambda: torch.randn(128, 1, 28, 28),
        False,
    ),
    "channel_scale": (
        lambda: resnet8(after_stem=LearnedScale((1, 16, 1, 1))),
        lambda: torch.randn(128, 1, 28, 28),
        False,
    ),
    "raw_mlp": (RawMLP, lambda: torch.randn(128, 8), False),
    "encoder": (Encoder, lambda: torch.randn(64, 16, 8), False),
    "encoder_sequence_first": (lambda: Encoder(batch_first=False), lambda: torch.randn(64, 16, 8), False),
    "gru_state": (lambda: RecurrentState("GRU"), lambda: torch.randn(64, 16, 8), False),
    "lstm_state": (lambda: RecurrentState("LSTM"), lambda: torch.randn(64, 16, 8), False),
    "gru_two_layers_bidirectional": (
        lambda: RecurrentState("GRU", num_layers=2, bidirectional=True),
        lambda: torch.randn(64, 16, 8),
        False,
    ),
    "gru_cell_loop": (lambda: CellLoop("GRUCell"), lambda: torch.randn(64, 16, 8), False),
    "lstm_cell_loop": (lambda: CellLoop("LSTMCell"), lambda: torch.randn(64, 16, 8), False),
    "text_embedding": (TextEmbedding, lambda: torch.randint(0, 5000, (128, 16)), False),
}


def step_function(name: str, method: str, device: torch.device) -> tuple[Callable[[], None], list[str]]:
    """One step of ``method`` (``sgd`` or an engine name) on a fresh copy of model ``name`` on
    ``device``; the warnings of its first step that name the reference engine."""
    build, batch, amp = MODELS[name]
    torch.manual_seed(0)
    model, x = build().to(device), batch().to(device)
    y = torch.randn(x.shape[0], device=device)

    def residuals() -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        return out.float().reshape(-1) - y

    if method == "sgd":
        sgd = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

        def step() -> None:
            sgd.zero_grad()
            residuals().pow(2).mean().backward()
            sgd.step()

    else:
        given, engine = (model.parameters(), "auto") if method == "parameters" else (model, method)
        ggn = GramGaussNewton(given, engine=engine, momentum=0.0, alpha=1e6, adaptive_damping=False)

        def step() -> None:
            ggn.step(residuals)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    return step, sorted({str(w.message)[:160] for w in caught if "reference engine" in str(w.message)})


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, engines: list[str], reps: int, reference_reps: int, device: torch.device) -> list[dict]:
    steps, routed = {}, {}
    for method in ("sgd", *engines):
        steps[method], routed[method] = step_function(name, method, device)
    times: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(reps):
        for method in steps:
            if method == "reference" and r >= reference_reps:
                continue
            synchronize(device)
            start = time.perf_counter()
            steps[method]()
            synchronize(device)
            times[method].append(time.perf_counter() - start)
    sgd = statistics.median(times["sgd"])
    return [
        dict(
            model=name,
            method=method,
            median_s=statistics.median(seconds),
            ratio_to_sgd=statistics.median(seconds) / sgd,
            reps=len(seconds),
            routed=routed[method],
        )
        for method, seconds in times.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument(
        "--engines",
        nargs="+",
        default=["auto"],
        help="GGN engines to time (auto, hooks, reference; parameters: auto, given model.parameters())",
    )
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--reference-reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/user_models.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    device = torch.device(args.device)
    rows = [
        row for name in args.models for row in time_model(name, args.engines, args.reps, args.reference_reps, device)
    ]
    record = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=args.threads,
        load_average=[load, os.getloadavg()[0]],
        rows=rows,
    )
    append_record(args.out, record)
    print(f"threads {args.threads}, load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'model':20s} {'method':10s} {'step s':>9s} {'/SGD':>7s} routed")
    for row in rows:
        print(
            f"{row['model']:20s} {row['method']:10s} {row['median_s']:9.4f} {row['ratio_to_sgd']:7.2f} "
            f"{len(row['routed'])}"
        )


if __name__ == "__main__":
    main()
