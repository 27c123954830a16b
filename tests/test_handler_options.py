"""Module options a user sets that a handler of the hooks engine might ignore.

Each test compares the hooks engine (float64) with the exact reference: a dense Jacobian by
``torch.func.jacrev`` or row-by-row autograd, the reference engine, or a plain forward's side
effects. The options probed and found exact are listed in the session's report; the tests here
are for the defects found (each failed before its fix).
"""

from __future__ import annotations

import copy
import warnings

import torch
from dense import assert_same_run
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from gramnewton import GramGaussNewton
from gramnewton.engines import HooksEngine

RTOL = 1e-10


def rel_err(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def spectral_model() -> nn.Module:
    """A spectral-normalised Linear (``torch.nn.utils.parametrizations.spectral_norm``) in training
    mode, whose forward advances the power iteration's ``_u``, ``_v`` buffers (``out=`` writes)."""
    torch.manual_seed(0)
    return nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 6)), nn.Tanh(), nn.Linear(6, 2)).double().train()


class OutWrite(nn.Module):
    """A handlerless module that keeps a running count in a buffer with an ``out=`` write (the
    form ``spectral_norm``'s power iteration uses), and a learned scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            torch.add(self.calls, 1.0, out=self.calls)
        return x * self.scale


def test_rows_run_again_leave_the_buffers_as_one_forward_does() -> None:
    """A handlerless module's rows run again sample by sample (``_rows_by_recomputation``) must
    not write its buffers a second time: a step's forward is one forward. Before, ``torch.func``
    let the ``out=`` writes through, so every hooks step ran spectral_norm's power iteration twice
    (``_u`` 7e-4 off a plain forward's after one step) and OutWrite counted two calls."""
    x = torch.randn(4, 5, dtype=torch.float64)
    for model in (spectral_model(), nn.Sequential(nn.Linear(5, 5), OutWrite(), nn.Linear(5, 2)).double()):
        plain = copy.deepcopy(model)
        plain(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            HooksEngine(model).compute(lambda: model(x))
        after, expected = buffers(model), buffers(plain)
        for name in expected:
            assert_same_run(after[name], expected[name], (type(model[0]).__name__, name))


def test_spectral_norm_in_training_steps_as_the_reference_engine() -> None:
    """Three optimizer steps of a spectral-normalised network in training mode: the hooks engine's
    parameters and power-iteration buffers as the reference engine's (before: 5.6e-3 relative
    apart in the parameters, 0.18 in ``_u``, silently)."""
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    states = {}
    for engine in ("hooks", "reference"):
        model = spectral_model()
        opt = GramGaussNewton(model, engine=engine, adaptive_damping=False, momentum=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                opt.step(lambda: model(x) - y)  # noqa: B023
        states[engine] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, want in states["reference"].items():
        assert rel_err(states["hooks"][name], want) < RTOL, name


def autograd_gram(model: nn.Module, x: Tensor, params: list[Tensor]) -> Tensor:
    """``J J^T`` of ``model(x)`` flattened, ``J`` row by row by autograd (exact for any forward)."""
    out = model(x).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i], params, retain_graph=True)])
        for i in range(out.numel())
    ]
    jac = torch.stack(rows)
    return jac @ jac.T


def routed_messages(caught: list) -> list[str]:
    return [str(w.message) for w in caught if "reference engine" in str(w.message)]


def test_embedding_scale_grad_by_freq_set_after_the_engine_was_built_is_routed() -> None:
    """``scale_grad_by_freq`` scales a token's gradient by its count in the whole batch, which the
    embedding handler does not do: refused where the engine is built, and also where it is set on
    the module afterwards (before: read once at construction, so the Gram was 2% off, silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 3), nn.Flatten(), nn.Linear(12, 2)).double()
    tokens = torch.randint(0, 9, (4, 4))
    tokens[:, 1] = tokens[:, 0]  # repeated tokens: counts above one
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = HooksEngine(model, params)
        model[0].scale_grad_by_freq = True
        gram = engine.compute(lambda: model(tokens)).gram
    assert rel_err(gram, autograd_gram(model, tokens, params)) < RTOL
    assert any("scale_grad_by_freq" in m for m in routed_messages(caught)), routed_messages(caught)


def test_batchnorm_without_running_statistics_in_eval_is_routed() -> None:
    """A BatchNorm in eval mode whose running statistics are ``None`` (built with
    ``track_running_stats=False``, or set to ``None`` afterwards, as test-time adaptation does)
    normalises with the batch's statistics: routed, exact (before, set after the engine was
    built: ``RuntimeError: running_mean must be defined in evaluation mode`` from the handler)."""
    x = torch.randn(5, 4, dtype=torch.float64)
    for when in ("built", "set after"):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=when != "built"), nn.Tanh(), nn.Linear(6, 2)
        )
        model = model.double().eval()
        params = list(model.parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = HooksEngine(model, params)
            if when == "set after":
                model[1].running_mean = model[1].running_var = None
            gram = engine.compute(lambda: model(x)).gram  # noqa: B023
        assert rel_err(gram, autograd_gram(model, x, params)) < RTOL, when
        assert any("batch statistics" in m for m in routed_messages(caught)), (when, routed_messages(caught))


def test_batchnorm_with_running_statistics_and_the_flag_off_in_eval_stays_on_the_hooks() -> None:
    """``track_running_stats`` switched off on a BatchNorm built with running statistics: in eval
    mode it still normalises with them (PyTorch passes them whatever the flag), which the handler
    does exactly, so nothing is routed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[1].running_mean.add_(0.3)
        model[1].running_var.mul_(1.7)
    model[1].track_running_stats = False
    x = torch.randn(5, 4, dtype=torch.float64)
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gram = HooksEngine(model, params).compute(lambda: model(x)).gram
    assert rel_err(gram, autograd_gram(model, x, params)) < RTOL
    assert not routed_messages(caught), routed_messages(caught)
