"""Bad input to the optimizer core: a clear error and nothing changed, or the right result.

Each test is a row of the "Optimizer core" table of docs/reliability.md. "Nothing changed" is
checked on the parameters, the optimizer state and ``param_groups``.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dense import assert_close, assert_same_run, cpu_only, dense_jacobian, dense_step, flat_params, seeded
from torch import Tensor, nn

from gramnewton import GramGaussNewton, SingularGramError, damped_solve, full_batch_step
from gramnewton.damping import GainRatioDamping
from gramnewton.engines import GramSystem
from gramnewton.update import gram_gauss_newton_direction

ENGINES = ["auto", "reference"]


def _mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _snapshot(opt: GramGaussNewton) -> tuple[list[Tensor], dict, list[dict]]:
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {i: copy.deepcopy(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state}
    params = [p.detach().clone() for p in params]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return params, state, groups


def _assert_unchanged(opt: GramGaussNewton, before: tuple[list[Tensor], dict, list[dict]]) -> None:
    params, state, groups = _snapshot(opt)
    assert all(torch.equal(a, b) for a, b in zip(params, before[0])), "parameters changed"
    assert state.keys() == before[1].keys(), "optimizer state changed"
    for key in state:
        assert all(torch.equal(torch.as_tensor(state[key][s]), torch.as_tensor(before[1][key][s])) for s in state[key])
    assert groups == before[2], "param_groups changed"


# --- item 3: broadcast residuals, (outputs, targets) closures -------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_broadcast_residual_is_refused_with_the_fix(engine: str) -> None:
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    opt = GramGaussNewton(model, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"broadcast.*\(outputs, targets\)"):
        opt.step(lambda: model(x) - y)  # (6, 1) - (6,) -> (6, 6)
    _assert_unchanged(opt, before)


def test_genuine_square_outputs_are_not_taken_for_a_broadcast() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    expected = flat_params(model) + dense_step(model, x, y, 1.0, 0.1)
    GramGaussNewton(model, alpha=0.1, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: model(x) - y)
    assert_close(flat_params(model), expected, 1e-10, "(b, b) outputs")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("out_shape,target_shape", [((6, 1), (6,)), ((6,), (6,)), ((6,), (6, 1)), ((6, 1), (6, 1))])
def test_outputs_targets_tuple_is_the_square_loss(engine: str, out_shape: tuple, target_shape: tuple) -> None:
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = flat_params(model) + dense_step(model, x, y, 1.0, 0.1)
    opt = GramGaussNewton(model, alpha=0.1, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    loss = opt.step(lambda: (model(x).reshape(out_shape), y.reshape(target_shape)))
    assert_close(flat_params(model), expected, 1e-10, f"{out_shape} outputs, {target_shape} targets")
    assert math.isclose(float(loss), float(opt.last_step.residuals.pow(2).mean()))


@pytest.mark.parametrize(
    "outputs,targets,match",
    [
        ((6, 2), (6,), r"targets of shape \(6,\) do not match outputs of shape \(6, 2\)"),
        ((6, 1), (5,), r"targets of shape \(5,\) do not match"),
        ((6, 1), (1, 6), r"targets of shape \(1, 6\) do not match"),
        ((6, 2, 2), (6, 4), r"targets of shape \(6, 4\) do not match outputs of shape \(6, 2, 2\)"),
    ],
)
def test_outputs_targets_shapes_are_checked(outputs: tuple, targets: tuple, match: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, math.prod(outputs[1:])).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: (model(x).reshape(outputs), torch.zeros(targets, dtype=torch.float64)))
    _assert_unchanged(opt, before)


@pytest.mark.parametrize(
    "returned,match",
    [
        (lambda out, y, labels: F.mse_loss(out, y, reduction="none"), r"squared errors .*return model\(x\) - y"),
        (lambda out, y, labels: nn.MSELoss(reduction="none")(out, y).reshape(-1), "squared errors"),
        (lambda out, y, labels: F.huber_loss(out, y, reduction="none"), "Huber"),
        (lambda out, y, labels: F.cross_entropy(out, labels, reduction="none"), "loss='cross_entropy'"),
        (
            lambda out, y, labels: F.binary_cross_entropy_with_logits(out, y.sigmoid(), reduction="none"),
            "loss='binary_cross_entropy'",
        ),
    ],
)
def test_per_sample_losses_returned_as_residuals_are_refused_with_the_fix(returned, match: str) -> None:
    """A closure returning ``F.mse_loss(..., reduction="none")`` (or another per-sample loss) where
    residuals are expected was taken as residuals: Gauss-Newton then minimised the squares of the
    squared errors, silently. Refused with what to return instead, nothing changed."""
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    out_layer = nn.Linear(1, 2).double()
    opt = GramGaussNewton(model)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: returned(out_layer(model(x)), y.expand(6, 2), labels))
    _assert_unchanged(opt, before)


def test_a_lazy_modules_first_step_is_the_hooks_engines() -> None:
    """A lazy module (``nn.LazyLinear``) initialises its parameters in its first forward, in a
    pre-hook that uses them outside the module, under ``no_grad``: its first step went to the
    reference engine with "used outside its own module". Nothing done without grad mode can put a
    parameter in the graph, so such a use is no use: no routing, and the step is Eq. 11 at the
    parameters the initialisation drew (float64, against the dense formula on a twin initialised
    with the same draws)."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)

    def lazy() -> nn.Module:
        return nn.Sequential(nn.LazyLinear(5, dtype=torch.float64), nn.Tanh(), nn.Linear(5, 1, dtype=torch.float64))

    torch.manual_seed(0)
    model, twin = lazy(), lazy()
    twin[2].load_state_dict(model[2].state_dict())
    opt = GramGaussNewton(model, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False)
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(lambda: model(x) - y)
    torch.manual_seed(1)
    twin(x)  # the same draws initialise the twin
    assert not [w for w in caught if "reference engine" in str(w.message)], [str(w.message) for w in caught]
    before = flat_params(twin)
    assert_close(flat_params(model), before + dense_step(twin, x, y, 0.7, 0.2), 1e-10, "lazy module's first step")


def test_a_torchscript_module_steps_on_the_reference_engine() -> None:
    """A ``torch.jit.script`` module (the whole model, or a block inside an ``nn.Module``) runs as
    TorchScript, without Python forward hooks: the hooks engine's first step raised ``RuntimeError:
    register_forward_pre_hook is not supported on ScriptModules``. Its parameters go to the
    reference engine (``"auto"`` picks it for a scripted model; a scripted block's are routed
    with the reason), and the step is Eq. 11 (float64)."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    torch.manual_seed(0)
    scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double())
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    expected = flat_params(plain) + dense_step(plain, x, y, 0.7, 0.2)
    opt = GramGaussNewton(scripted, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False)
    opt.step(lambda: scripted(x) - y)
    assert type(opt.engine).__name__ == "ReferenceEngine"
    assert_close(torch.cat([p.detach().reshape(-1) for p in scripted.parameters()]), expected, 1e-10, "scripted")

    torch.manual_seed(0)
    mixed = nn.Sequential(torch.jit.script(nn.Sequential(nn.Linear(3, 5), nn.Tanh())), nn.Linear(5, 1)).double()
    expected = flat_params(mixed) + dense_step(mixed, x, y, 0.7, 0.2)
    with pytest.warns(UserWarning, match="TorchScript module"):
        opt = GramGaussNewton(mixed, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False)
    opt.step(lambda: mixed(x) - y)
    assert_close(flat_params(mixed), expected, 1e-10, "a scripted block")


@pytest.mark.parametrize("given", ["model", "parameters"])
def test_a_compiled_model_steps_eagerly_without_recompiling(given: str) -> None:
    """A ``torch.compile``'d model: dynamo traced the engine's hooks and mode, which are new at every
    step, and recompiled at every step until its limit (a 2 ms step of a small MLP took 110 ms).
    The engine's forward runs the model eagerly (``torch.compiler.set_stance("force_eager")``):
    no compilation at all over four steps, and the steps are those of the plain model bit for bit
    (float64)."""
    compiled_graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled_graphs.append(graph)
        return graph.forward

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend=counting_backend)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    # given its parameters, the first step finds the compiled model, also eagerly
    opt = GramGaussNewton(compiled if given == "model" else compiled.parameters(), adaptive_damping=False)
    reference = GramGaussNewton(twin, adaptive_damping=False)
    for _ in range(4):
        assert_same_run(opt.step(lambda: compiled(x) - y), reference.step(lambda: twin(x) - y))
        assert_same_run(flat_params(model), flat_params(twin))
    assert not compiled_graphs


@pytest.mark.parametrize("engine,what", [("auto", "Gram matrix"), ("reference", "dense Jacobian")])
def test_a_system_larger_than_the_machine_is_refused_before_it_is_allocated(
    engine: str, what: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A field per sample makes ``b*k`` rows: ``(b, 1, 64, 64)`` residuals at ``b = 64`` are 262,144
    rows, whose Gram takes 275 GB; the allocation then failed with the allocator's message, or the
    process was killed for memory. The engines compare the Gram (and the reference engine's dense
    ``J``) with the device's memory first and refuse with its size and what to change, nothing
    changed. Here the machine is made 8 KiB small; its real size is read from the system."""
    import gramnewton.engines.base as base

    assert base.device_memory(torch.device("cpu")) > 2**30
    with monkeypatch.context() as patch:  # a container's limit, where lower than the machine's memory
        limited, unlimited = tmp_path / "limited", tmp_path / "unlimited"
        limited.write_text("1073741824\n")
        unlimited.write_text("max\n")  # cgroup v2's "no limit"
        patch.setattr(base, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(limited)))
        assert base.device_memory(torch.device("cpu")) == 2**30
        patch.setattr(base, "_CGROUP_LIMITS", (str(tmp_path / "absent"), str(unlimited)))
        assert base.device_memory(torch.device("cpu")) > 2**30
    monkeypatch.setattr(base, "device_memory", lambda device: 8 * 1024)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1)).double()
    x, y = torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randn(8, 1, 6, 6, dtype=torch.float64)
    opt = GramGaussNewton(model, engine=engine, solve_space="sample")
    before = _snapshot(opt)
    with pytest.raises(
        ValueError, match=rf"the {what} of 288 x .* \(b = 8 samples x k = 36 residuals each\) would take"
    ):
        opt.step(lambda: model(x) - y)
    _assert_unchanged(opt, before)


def test_a_step_without_a_closure_says_how_to_call_it() -> None:
    """torch.optim's habit, ``loss.backward(); opt.step()``, gave Python's ``TypeError: step()
    missing 1 required positional argument: 'closure'``; it now says what the closure returns and
    that no backward pass is needed, nothing changed."""
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(model)
    before = _snapshot(opt)
    ((model(x) - y) ** 2).mean().backward()
    with pytest.raises(ValueError, match=r"opt.step\(lambda: model\(x\) - y\).*no loss.backward\(\) needed"):
        opt.step()
    _assert_unchanged(opt, before)


def test_closure_returning_a_bad_tuple_is_refused() -> None:
    model = _mlp()
    x = torch.randn(6, 3, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0)
    with pytest.raises(TypeError, match=r"\(outputs, targets\)"):
        opt.step(lambda: (model(x), model(x), model(x)))


# --- item 4: overflow ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_overflowing_loss_is_refused(engine: str) -> None:
    model = _mlp(torch.float32)
    x, y = torch.randn(6, 3), 1e30 * torch.randn(6)  # finite residuals whose squares overflow float32
    opt = GramGaussNewton(model, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = _snapshot(opt)
    with pytest.raises(SingularGramError, match="not finite"):
        opt.step(lambda: model(x).squeeze(1) - y)
    _assert_unchanged(opt, before)


def test_overflowing_coefficients_are_refused() -> None:
    # a finite, well-conditioned Gram with a huge right-hand side: the Cholesky solution overflows
    gram = 1e-30 * torch.eye(3)
    with pytest.raises(SingularGramError, match="not finite"):
        damped_solve(gram, torch.full((3,), 1e30), 1.0, 0.0)


class _GivenDirection:
    """An engine whose ``J^T v`` is a given tensor (``G = I``): the direction checks alone."""

    def __init__(self, params: list[Tensor], jt: Tensor):
        self.params, self.jt = params, jt

    def compute(self, closure):
        r = closure().detach().reshape(-1, 1)
        gram = torch.eye(r.shape[0], dtype=r.dtype)
        return GramSystem(residuals=r, gram=gram, jt_times=lambda v: [self.jt.clone()])


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_direction_is_refused(bad: str) -> None:
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    jt = torch.ones_like(model[0].weight.detach())
    jt[2, 1] = float(bad)
    engine = _GivenDirection([model[0].weight], jt)
    opt = GramGaussNewton([model[0].weight], engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = _snapshot(opt)
    with pytest.raises(SingularGramError, match="step is not finite"):
        opt.step(lambda: model(x).squeeze(1) - y)
    _assert_unchanged(opt, before)


def test_huge_finite_float64_direction_is_taken() -> None:
    # its float64 norm overflows (the fast check): the entries, all finite, are checked one by one
    weight = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    huge = torch.full((4,), 1e300, dtype=torch.float64)
    step = gram_gauss_newton_direction(
        _GivenDirection([weight], huge), lambda: weight.sum() + torch.zeros(3, dtype=torch.float64), lam=1.0, alpha=1.0
    )
    assert step.direction_norm == math.inf and torch.isfinite(step.direction[0]).all()


def test_overflowing_gram_is_refused() -> None:
    model = _mlp(torch.float32)
    x, y = torch.randn(6, 3), torch.randn(6)
    opt = GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = _snapshot(opt)
    with pytest.raises(SingularGramError, match="NaN or Inf|not finite"):
        # residuals equal to -y (finite, small) whose Jacobian is 1e25 J: J J^T overflows float32
        opt.step(lambda: 1e25 * (model(x) - model(x).detach()).squeeze(1) - y)
    _assert_unchanged(opt, before)


# --- item 5: adaptive damping whose re-evaluation raises ----------------------------------------------


def test_adaptive_damping_restores_everything_when_the_reevaluation_raises() -> None:
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    opt = GramGaussNewton(model, adaptive_damping=GainRatioDamping(), lam=1.0, momentum=0.0)
    opt.step(lambda: model(x).squeeze(1) - y)  # a first, successful step: state exists
    before = _snapshot(opt)
    last = opt.last_step, opt.last_gain_ratio
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        return model(x).squeeze(1) - y

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(closure)
    _assert_unchanged(opt, before)
    assert (opt.last_step, opt.last_gain_ratio) == last


def test_adaptive_damping_reevaluation_with_another_shape_restores() -> None:
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    opt = GramGaussNewton(model, adaptive_damping=True, lam=1.0, momentum=0.0)
    before = _snapshot(opt)
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        return model(x).squeeze(1) - y if len(calls) == 1 else model(x[:4]).squeeze(1) - y[:4]

    with pytest.raises(ValueError, match="different shape"):
        opt.step(closure)
    _assert_unchanged(opt, before)


def test_adaptive_damping_accepts_outputs_targets_closures() -> None:
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    opt = GramGaussNewton(model, adaptive_damping=True, lam=1.0, momentum=0.0)
    opt.step(lambda: (model(x), y))
    assert opt.last_gain_ratio is not None and math.isfinite(opt.last_gain_ratio)


# --- item 13: dtypes and hyper-parameters ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("engine", ENGINES)
def test_low_precision_model_solves_in_float32(dtype: torch.dtype, engine: str) -> None:
    model = _mlp(dtype)
    twin = copy.deepcopy(model).double()
    x, y = torch.randn(6, 3), torch.randn(6)
    expected = flat_params(twin) + dense_step(twin, x.double(), y.double(), 1.0, 1.0)
    opt = GramGaussNewton(model, alpha=1.0, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    opt.step(lambda: model(x.to(dtype)).squeeze(1) - y.to(dtype))
    assert opt.last_step.solve_info.method == "cholesky"
    assert all(p.dtype == dtype for p in model.parameters())
    assert_close(flat_params(model).double(), expected, 0.05, f"{dtype} step")


@pytest.mark.parametrize("engine", ENGINES)
def test_float64_targets_with_a_float32_model(engine: str) -> None:
    model = _mlp(torch.float32)
    x, y = torch.randn(6, 3), torch.randn(6, dtype=torch.float64)
    opt = GramGaussNewton(model, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"float64.*float32.*\(outputs, targets\)"):
        opt.step(lambda: model(x).squeeze(1) - y)
    _assert_unchanged(opt, before)
    opt.step(lambda: (model(x), y))  # the tuple form casts the targets to the outputs' dtype
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"lam": math.inf}, "lam"),
        ({"lam": math.nan}, "lam"),
        ({"weight_decay": math.nan}, "weight_decay"),
    ],
)
def test_non_finite_hyper_parameters_are_refused(kwargs: dict, match: str) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        GramGaussNewton(model, **{"momentum": 0.0, **kwargs})
    opt = GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0)
    opt.param_groups[0].update(kwargs)  # set after construction: refused at the step
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        opt.step(lambda: model(x).squeeze(1))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kwargs", [{"alpha": math.inf}, {"lam": math.inf}, {"lam": 0.0}, {"alpha": -1.0}])
def test_full_batch_step_and_damped_solve_validate_hyper_parameters(kwargs: dict) -> None:
    model = _mlp()
    x = torch.randn(6, 3, dtype=torch.float64)
    before = flat_params(model)
    with pytest.raises(ValueError, match="Invalid"):
        full_batch_step(model.parameters(), lambda: model(x).squeeze(1), **kwargs)
    assert torch.equal(flat_params(model), before)
    args = {"lam": 1.0, "alpha": 0.0, **kwargs}
    with pytest.raises(ValueError, match="Invalid"):
        damped_solve(torch.eye(2), torch.ones(2), args["lam"], args["alpha"])


# --- item 2: rows of a hooked module that are not the samples -----------------------------------------

T = B = 4  # sequence length equal to the batch size: dimension 0 has the batch's size, but is time


class SeqLinear(nn.Module):
    """Linear on a sequence-first ``(T, b, d)`` tensor, mean over time."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 5), nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)).mean(0))


class SeqTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layer(self.inp(x)).mean(0))


class SeqLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.out = nn.LSTM(3, 5, batch_first=False), nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.lstm(x)[0]).mean(0)  # the head sees (T, b, 5)


class SeqAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(3, 4), nn.MultiheadAttention(4, 2), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(self.attn(h, h, h, need_weights=False)[0][-1])


class Flipped(nn.Module):
    """Batch-first, but the rows reach the Linear in reverse order: row i is sample b-1-i."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x.flip(0))).flip(0))


class Centred(nn.Module):
    """Couples the samples after a Linear (``h - h.mean(0)``), as BatchNorm would."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(3, 5), nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(torch.tanh(h - h.mean(0)))


ROW_CASES = {
    "linear_seq_first": (SeqLinear, (T, B, 3)),
    "transformer_seq_first": (SeqTransformer, (T, B, 3)),
    "lstm_seq_first": (SeqLSTM, (T, B, 3)),
    "attention_seq_first": (SeqAttention, (T, B, 3)),
    "flipped_rows": (Flipped, (B, 3)),
    "centred_batch": (Centred, (B, 3)),
}


@pytest.mark.filterwarnings("ignore:HooksEngine")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.parametrize("name", ROW_CASES)
def test_rows_that_are_not_samples_give_the_exact_gram_and_step(name: str) -> None:
    from gramnewton.engines import HooksEngine

    build, shape = ROW_CASES[name]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        k = model(x).reshape(B, -1).shape[1]
    y = torch.randn(B, k, dtype=torch.float64)
    closure = lambda: model(x).reshape(B, -1) - y  # noqa: E731
    engine = HooksEngine(model)
    with pytest.warns(UserWarning, match="rows of its output are not the samples"):
        system = engine.compute(closure)
    jac = dense_jacobian(model, x)
    assert_close(system.gram, jac @ jac.T, 1e-10, f"{name}: Gram")
    v = torch.randn(B * k, dtype=torch.float64)
    assert_close(torch.cat([t.reshape(-1) for t in system.jt_times(v)]), jac.T @ v, 1e-10, f"{name}: J^T v")
    engine.compute(closure)  # the verdict is kept: same Gram again without a second warning
    expected = flat_params(model) + dense_step(model, x, y, 1.0, 0.1)
    opt = GramGaussNewton(model, alpha=0.1, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    opt.step(closure)
    assert_close(flat_params(model), expected, 1e-10, f"{name}: parameters after one step")


class Leaky(nn.Module):
    """Each sample's hidden row leaks a little into every other sample's (``h - leak * h.mean(0)``)."""

    def __init__(self, leak: float) -> None:
        super().__init__()
        self.leak, self.inp, self.out = leak, nn.Linear(3, 256), nn.Linear(256, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(torch.tanh(h - self.leak * h.mean(0)))


@pytest.mark.parametrize("leak", [0.0, 1e-2])
def test_row_check_in_float32_catches_a_one_percent_leak_between_samples(leak: float) -> None:
    """The check reduces each output gradient to a few random projections per row (engines/rows.py):
    a 1% coupling of 64 samples in float32 must still fail it, and no coupling must pass."""
    import warnings

    from gramnewton.engines import HooksEngine

    torch.manual_seed(0)
    model, x = Leaky(leak), torch.randn(64, 3)
    engine = HooksEngine(model)
    if leak:
        with pytest.warns(UserWarning, match="rows of its output are not the samples"):
            engine.compute(lambda: model(x).squeeze(1))
        assert set(engine._row_verdicts.popitem()[1][0]) == {0}  # the first Linear, not the head
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            engine.compute(lambda: model(x).squeeze(1))


# --- item 7: full_batch_step with alpha = 0 on an ill-conditioned problem -------------------------------


def _wide_tanh_fit(seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """A 1-256-1 tanh net and 16 points of sin(3x) on [-1, 1], float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 256), nn.Tanh(), nn.Linear(256, 1)).double()
    x = torch.linspace(-1, 1, 16, dtype=torch.float64).unsqueeze(1)
    return model, x, torch.sin(3 * x).squeeze(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_batch_alpha_zero_interpolates_to_1e_20_in_10_steps(seed: int) -> None:
    model, x, y = _wide_tanh_fit(seed)
    losses = []
    for _ in range(10):
        step = full_batch_step(model.parameters(), lambda: model(x).squeeze(1) - y, alpha=0.0)
        assert step.solve_info.method == "svd"
        with torch.no_grad():
            losses.append(float((model(x).squeeze(1) - y).pow(2).sum()))
        if losses[-1] < 1e-20:
            break
    assert losses[-1] < 1e-20, f"||r||^2 per step: {losses}"


def test_jacobian_solve_matches_the_pseudo_inverse_and_the_damped_formula() -> None:
    from gramnewton.solve import jacobian_solve

    torch.manual_seed(0)
    a = torch.randn(3, 7, dtype=torch.float64)
    jac = torch.cat([a, 2 * a])  # rank 3 of 6: the minimum-norm least-squares step
    rhs = torch.randn(6, dtype=torch.float64)
    jt_c, c, info = jacobian_solve(jac, rhs, 2.0, 0.0)
    assert info.method == "svd" and info.rank == 3
    assert_close(jt_c, torch.linalg.pinv(jac) @ rhs / 2.0, 1e-10, "J^T c at alpha = 0")
    assert_close(jac.T @ c, jt_c, 1e-10, "c consistent with J^T c")
    jt_c, c, _ = jacobian_solve(a, rhs[:3], 2.0, 0.5)
    expected = torch.linalg.solve(2.0 * a @ a.T + 0.5 * torch.eye(3, dtype=torch.float64), rhs[:3])
    assert_close(c, expected, 1e-10, "c at alpha > 0")
    assert_close(jt_c, a.T @ expected, 1e-10, "J^T c at alpha > 0")


@pytest.mark.parametrize("proof", [True, False], ids=["graph_proof", "numerical_only"])
def test_row_check_passes_ordinary_float32_models_and_runs_at_doubling_intervals_per_signature(
    proof: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs at each forward signature's 1st, 2nd, 4th, ... forward; on a ResNet the
    graph's node types prove every row kept (no backward pass), and without the proof the
    numerical check's float32 tolerance absorbs the rounding (nothing routed either way)."""
    import warnings

    from gramnewton.engines import HooksEngine, hooks
    from gramnewton.lab.models import get_model

    proofs, runs = [], []
    prove, check = hooks.rows_kept_by_graph, hooks.rows_not_samples
    monkeypatch.setattr(hooks, "rows_kept_by_graph", lambda *a: proofs.append(1) or (prove(*a) if proof else set()))
    monkeypatch.setattr(hooks, "rows_not_samples", lambda *a: runs.append(1) or check(*a))
    torch.manual_seed(0)
    model = get_model("resnet8_gn", groups=4)  # float32: the tolerance must absorb rounding
    engine = HooksEngine(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter may be routed
        for batch in (4, 4, 3, 4, 4, 4, 4):
            x = torch.randn(batch, 3, 8, 8)
            engine.compute(lambda: model(x).squeeze(1))
    assert len(proofs) == 4  # batch 4 at its 1st, 2nd and 4th forward (of six), batch 3 at its one
    assert len(runs) == (0 if proof else 4)


def test_row_check_runs_its_passes_without_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU PyTorch lets cuDNN round float32 convolutions to TF32 by default, which the check's
    float32 tolerance does not absorb (every convolution was routed to the reference engine there):
    its passes run in full precision, and the user's settings come back afterwards."""
    from gramnewton.engines.rows import rows_not_samples

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        seen = []

        def backward(weights: Tensor, observe) -> None:
            seen.append((torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
            observe(0, weights.clone())

        assert rows_not_samples(torch.zeros(3, 2), [2], backward) == [False]
        assert seen == [(False, "highest")] * 2
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (True, "high")
    finally:
        torch.set_float32_matmul_precision(precision)


DEFAULT_DEVICE_CASES = {
    "defaults": {},
    "momentum_bias_correction_bound": {"bias_correction": True, "max_step_norm": 10.0},
    "parameter_space": {"solve_space": "parameter", "momentum": 0.0},
    "reference_engine": {"engine": "reference"},
    "damping_on_a_subset": {"adaptive_damping": {"name": "gain_ratio", "subset": 4}},
    "geodesic_acceleration": {"geodesic_acceleration": True, "adaptive_damping": False},
    "cross_entropy": {"loss": "cross_entropy"},
    "cross_entropy_exact": {"loss": "cross_entropy", "curvature": "exact"},
    "cross_entropy_top_c": {"loss": "cross_entropy", "curvature": "top_c", "top_c": 2},
    "binary_cross_entropy": {"loss": "binary_cross_entropy"},
}


@pytest.mark.parametrize("options", DEFAULT_DEVICE_CASES.values(), ids=DEFAULT_DEVICE_CASES)
def test_a_step_follows_the_model_not_torchs_default_device(options: dict) -> None:
    """A step makes its tensors where the model is, whatever ``torch.set_default_device`` says (a
    user with ``cuda`` as the default and a model elsewhere, or the reverse). Run under a ``meta``
    default device, any tensor the library made from the default has no data and the step fails;
    the row check's random draws did (a CPU generator drawing on a CUDA default device raises)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
    x, y = torch.randn(8, 1, 5, 5), torch.randn(8, 3)
    loss = options.get("loss", "mse")
    targets = {"cross_entropy": torch.arange(8) % 3, "binary_cross_entropy": (y > 0).double().float()}.get(loss, y)
    opt = GramGaussNewton(model, **options)

    def closure(rows: slice = slice(None)) -> Tensor | tuple[Tensor, Tensor]:
        out = model(x[rows])
        return out - targets[rows] if loss == "mse" else (out, targets[rows])

    before = [p.detach().clone() for p in model.parameters()]
    home = torch.get_default_device().type  # the model's: the CPU, or the tests' default device
    with torch.device("meta"):
        for _ in range(3):
            opt.step(closure)
    assert all(p.device.type == home and torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    state = [(k, t) for s in opt.state.values() for k, t in s.items() if isinstance(t, Tensor)]
    # the step count is a CPU scalar on every device, as torch.optim keeps it
    assert state and all(t.device.type == home for k, t in state if k != "step")


class MixedAfter(nn.Module):
    """A Linear whose output rows are mixed across the batch (``h - h.mean(0)``) before the head."""

    def __init__(self):
        super().__init__()
        self.first, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.head(h - h.mean(0))


CPU_AUTOCAST = cpu_only("torch.autocast('cpu') leaves a GPU's tensors alone")


def autocast_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    from dense import groupnorm_cnn

    from gramnewton.lab.models import get_model

    return {
        "conv_linear": (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)), (1, 5, 5)),
        "groupnorm_cnn": (groupnorm_cnn(2), (1, 6, 6)),
        "layernorm_mlp": (nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 2)), (5,)),
        "resnet8_fixup": (get_model("resnet8_fixup", in_channels=1, num_outputs=2), (1, 12, 12)),
        "batchnorm_eval": (nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval(), (4,)),
        "rows_mixed": (MixedAfter(), (4,)),
    }


@CPU_AUTOCAST
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("accelerated", [False, True])
def test_autocast_outputs_and_targets_give_the_residuals_of_promotion(engine: str, accelerated: bool) -> None:
    """Under autocast a closure returning ``(outputs, targets)`` was refused ("residuals are
    torch.bfloat16 but the parameters are torch.float32", its targets rounded to bfloat16 on the
    way) while ``model(x) - y`` worked (promotion to float32). Outputs narrower than the
    parameters are now widened before the targets are subtracted: three steps with the defaults
    (the gain ratio re-evaluates the closure) or with geodesic acceleration (one more evaluation)
    are bit for bit those of the promoting closure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def pair() -> tuple[Tensor, Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x), y

    def promoted() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return twin(x) - y

    options = dict(engine=engine, geodesic_acceleration=accelerated)
    opt, reference = GramGaussNewton(model, **options), GramGaussNewton(twin, **options)
    for _ in range(3):
        assert_same_run(opt.step(pair), reference.step(promoted))
        assert_same_run(flat_params(model), flat_params(twin))


@CPU_AUTOCAST
@pytest.mark.parametrize("name", list(autocast_models()))
def test_autocast_modules_are_handled_in_the_parameters_precision(name: str) -> None:
    """Under ``torch.autocast`` (bfloat16) Linear, convolutions, GroupNorm and LayerNorm compute in
    bfloat16 with float32 parameters. The engine forms their per-sample gradients in float32 from
    the operands they computed with (the input cast to bfloat16, the bfloat16 output gradients):
    nothing goes to the reference engine, and the Gram, ``J^T v`` and ``J v`` agree with the
    reference engine's (autograd's per-sample gradients, its products rounded to bfloat16) to
    bfloat16's precision (they went to the reference engine: a resnet8 step 113x slower on the
    CPU). A module whose handler does not know autocast (BatchNorm in eval mode) is still routed
    for that reason, and the row check, at bfloat16's tolerance, still finds rows mixed across
    the batch."""
    import warnings

    from gramnewton.engines import HooksEngine, ReferenceEngine

    torch.manual_seed(0)
    model, shape = autocast_models()[name]
    with torch.no_grad():  # away from Fixup's zero initialisation: every layer's part counts
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(6, *shape), torch.randn(6, 2)

    def closure() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return out.float() - y

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = HooksEngine(model).compute(closure)
    routed = " ".join(str(w.message) for w in caught if "reference engine" in str(w.message))
    if name == "batchnorm_eval":
        assert "BatchNorm1d computes in torch.bfloat16 while its parameters are torch.float32 (autocast?)" in routed
        assert "Linear" not in routed
        return
    if name == "rows_mixed":
        assert "Linear: rows of its output are not the samples" in routed
        return
    assert not routed, routed
    reference = ReferenceEngine(list(model.parameters())).compute(closure)
    v = torch.randn(12)
    w = [torch.randn_like(p) for p in model.parameters()]

    def relative(a: Tensor, b: Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    assert relative(fast.gram, reference.gram) < 1e-2
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    assert relative(flat(fast.jt_times(v)), flat(reference.jt_times(v))) < 1e-2
    assert relative(fast.j_times(w), reference.j_times(w)) < 1e-2


def test_unbatched_convolution_with_as_many_channels_as_samples_is_routed() -> None:
    from gramnewton.engines import HooksEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3)).double()
    x = torch.randn(4, 5, 5, dtype=torch.float64)  # (C, H, W): no batch dimension, C == b
    closure = lambda: model(x).reshape(4, -1)  # noqa: E731  (4 "samples" that are channels)
    with pytest.warns(UserWarning, match="batch"):
        system = HooksEngine(model).compute(closure)
    jac = dense_jacobian(model, x)
    assert_close(system.gram, jac @ jac.T, 1e-10, "unbatched convolution: Gram")


def test_a_compiled_model_gives_the_exact_gram() -> None:
    """``torch.compile(model)`` (AOTAutograd, as the default backend traces it, without its code
    generation): the hooks engine sees the compiled module's layers and gives the reference
    engine's Gram and ``J^T v`` (float64), with no routing, on a first call and after the
    parameters changed."""
    import warnings

    from gramnewton.engines import HooksEngine, ReferenceEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(36, 2)).double()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    params = list(model.parameters())
    engine = HooksEngine(compiled, params)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    for call in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = engine.compute(lambda: compiled(x) - y)
        assert not [w for w in caught if "reference engine" in str(w.message)]
        reference = ReferenceEngine(params).compute(lambda: model(x) - y)
        v = torch.randn(12, dtype=torch.float64)
        assert_close(fast.gram, reference.gram, 1e-10, f"gram of the compiled model, call {call}")
        assert_close(flat(fast.jt_times(v)), flat(reference.jt_times(v)), 1e-10, f"J^T v, call {call}")
        with torch.no_grad():
            for p in params:
                p.mul_(1.1)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_exact_gram(reentrant: bool) -> None:
    """``torch.utils.checkpoint`` recomputes a segment's forward during the backward pass (the
    reentrant form runs the first forward without autograd): the hooks engine's Gram and ``J^T v``
    are still the reference engine's (float64), with nothing routed."""
    import warnings

    from torch.utils.checkpoint import checkpoint

    from gramnewton.engines import HooksEngine, ReferenceEngine

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.segment = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(36, 8), nn.Tanh())
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(checkpoint(self.segment, x, use_reentrant=reentrant))

    torch.manual_seed(0)
    model = Checkpointed().double()
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=reentrant)  # reentrant: an input that needs grad
    y = torch.randn(6, 2, dtype=torch.float64)
    params = list(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = HooksEngine(model, params).compute(lambda: model(x) - y)
    assert not [w for w in caught if "reference engine" in str(w.message)]
    reference = ReferenceEngine(params).compute(lambda: model(x) - y)
    v = torch.randn(12, dtype=torch.float64)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
    assert_close(fast.gram, reference.gram, 1e-10, "gram under checkpointing")
    assert_close(flat(fast.jt_times(v)), flat(reference.jt_times(v)), 1e-10, "J^T v under checkpointing")


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_a_sparse_embedding_gives_the_step_of_its_dense_twin(engine: str) -> None:
    """``nn.Embedding(sparse=True)`` has sparse weight gradients, which the reference engine's rows
    could not reshape (``RuntimeError: reshape is not implemented for sparse tensors``, also through
    ``engine="auto"``, which routed it there; the hooks engine now takes it, its rows never being
    autograd's weight gradient): the steps equal those of the same model with a dense embedding
    (float64)."""

    class Bag(nn.Module):
        def __init__(self, sparse: bool) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 3, sparse=sparse), nn.Linear(3, 2)

        def forward(self, idx: Tensor) -> Tensor:
            return self.head(torch.tanh(self.emb(idx).mean(1)))

    torch.manual_seed(0)
    sparse, dense = Bag(True).double(), Bag(False).double()
    dense.load_state_dict(sparse.state_dict())
    idx, y = torch.tensor([[0, 1, 1], [2, 0, 3], [4, 4, 0], [1, 2, 3]]), torch.randn(4, 2, dtype=torch.float64)
    import warnings

    opts = [GramGaussNewton(m, engine=engine, adaptive_damping=False) for m in (sparse, dense)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing routed
        for _ in range(2):
            for opt, m in zip(opts, (sparse, dense)):
                opt.step(lambda m=m: m(idx) - y)
    assert_close(flat_params(sparse), flat_params(dense), 1e-10, "sparse embedding against its dense twin")


# --- an error mid-step or a failed load changes nothing; hyper-parameters are numbers ---------------


def _failing_after(model: nn.Module, x: Tensor, y: Tensor, results: list[str]):
    """A closure whose ``i``-th call (0: the step's own evaluation) returns the residuals
    (``"ok"``), NaN residuals (``"nan"``: the step is rejected) or raises (``"raise"``)."""
    calls = []

    def closure():
        what = results[min(len(calls), len(results) - 1)]
        calls.append(what)
        if what == "raise":
            raise RuntimeError("data loader died")
        out = model(x) - y
        return out * math.nan if what == "nan" else out

    return closure


def test_an_error_in_a_retry_restores_alpha_and_the_damping_rule() -> None:
    """The first re-evaluation is NaN (the step rejected: alpha raised, a rejection counted), its
    retry's re-evaluation raises: alpha, the count and the rule's state are put back too."""
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.15, momentum=0.5, adaptive_damping=GainRatioDamping(retries=2))
    opt.step(lambda: model(x) - y)
    before, rule, rejections = _snapshot(opt), opt.damping.state_dict(), opt.rejections_in_a_row
    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(_failing_after(model, x, y, ["ok", "nan", "raise"]))
    _assert_unchanged(opt, before)
    assert opt.damping.state_dict() == rule and opt.rejections_in_a_row == rejections


def test_cross_validated_damping_is_restored_when_the_reevaluation_raises() -> None:
    """:class:`CrossValidatedDamping` moves its running ridge before the step (``choose_alpha``):
    a re-evaluation that raises puts it back."""
    from gramnewton.damping import CrossValidatedDamping

    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, adaptive_damping=CrossValidatedDamping())
    opt.step(lambda: model(x) - y)
    before, rule = _snapshot(opt), copy.deepcopy(opt.damping.state_dict())
    x2 = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(_failing_after(model, x2, y, ["ok", "raise"]))
    _assert_unchanged(opt, before)
    assert opt.damping.state_dict() == rule


def test_a_state_of_another_damping_rule_is_refused_before_anything_is_loaded() -> None:
    from gramnewton.damping import CrossValidatedDamping

    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    source = _mlp()
    saved = GramGaussNewton(source, lam=2.0, adaptive_damping=True)
    saved.step(lambda: source(x) - y)
    model = _mlp()
    opt = GramGaussNewton(model, adaptive_damping=CrossValidatedDamping())
    opt.step(lambda: model(x) - y)
    before, rule = _snapshot(opt), copy.deepcopy(opt.damping.state_dict())
    with pytest.raises(ValueError, match="CrossValidatedDamping has no state"):
        opt.load_state_dict(saved.state_dict())
    _assert_unchanged(opt, before)
    assert opt.damping.state_dict() == rule


@pytest.mark.parametrize("other", ["narrower", "reordered"])
def test_a_state_of_another_model_is_refused_at_load(other: str) -> None:
    """``phi`` saved from another model with as many tensors (torch checks only their count): a
    3-5-1 net, or the same 3-8-1 net's tensors in another order; refused with the shapes, nothing
    loaded, and the optimizer steps on."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    source = nn.Sequential(
        nn.Linear(3, 5 if other == "narrower" else 8), nn.Tanh(), nn.Linear(5 if other == "narrower" else 8, 1)
    ).double()
    params = list(source.parameters())
    saved = GramGaussNewton(params if other == "narrower" else params[::-1], adaptive_damping=False)
    saved.step(lambda: source(x) - y)
    model = _mlp()
    opt = GramGaussNewton(model, adaptive_damping=False)
    opt.step(lambda: model(x) - y)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter \d has shape .* another model"):
        opt.load_state_dict(saved.state_dict())
    _assert_unchanged(opt, before)
    opt.step(lambda: model(x) - y)


def test_a_group_added_after_alpha_adapted_shares_the_steps_alpha() -> None:
    """The damping rule adapts one ``alpha`` for every group: a group added later without one
    takes the current value (was: the constructor's, and every later step raised)."""
    torch.manual_seed(0)
    body, head = nn.Linear(3, 8).double(), nn.Linear(8, 1).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    model = nn.Sequential(body, nn.Tanh(), head)
    opt = GramGaussNewton(body.parameters())  # the head is trained from the second step on
    opt.step(lambda: model(x) - y)
    adapted = opt.param_groups[0]["alpha"]
    assert adapted != opt.defaults["alpha"]
    opt.add_param_group({"params": head.parameters()})
    assert opt.param_groups[1]["alpha"] == adapted
    opt.step(lambda: model(x) - y)
    assert len(opt.engine.params) == 4


@pytest.mark.parametrize("bad", [{"weight_decay": "0"}, {"lam": True}, {"alpha": math.nan}])
def test_a_bad_group_is_refused_before_it_is_added(bad: dict) -> None:
    model = _mlp()
    opt = GramGaussNewton(model[0].parameters())
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": model[2].parameters(), **bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "dtypes,kwargs",
    [
        ((torch.float32, torch.float64), {}),  # a float64 head on a float32 body: phi in each one's dtype
        (  # every step accepted: 257 counted, a count bfloat16 cannot hold
            (torch.bfloat16, torch.bfloat16),
            dict(
                metric="second_moment", bias_correction=True, adaptive_damping=False, momentum=0.5, lam=4.0, alpha=1.0
            ),
        ),
    ],
)
def test_a_resumed_run_takes_the_uninterrupted_runs_steps_bit_for_bit(dtypes, kwargs, tmp_path: Path) -> None:
    """torch's ``load_state_dict`` casts every state tensor but ``step`` to its parameter's
    dtype: ``phi`` and the moment are kept in it and the counts as Python ints (a count of 257 in
    bfloat16 is 256; a float64 ``phi`` of a float32 parameter loses its last digits)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8).to(dtypes[0]), nn.Tanh(), nn.Linear(8, 1).to(dtypes[1]))

    def closure(m: nn.Module, x: Tensor, y: Tensor):
        return lambda: (m[2](m[1](m[0](x)).to(dtypes[1])), y)

    gen = seeded(1)
    data = [
        (torch.randn(6, 3, generator=gen).to(dtypes[0]), torch.randn(6, 1, generator=gen).to(dtypes[1]))
        for _ in range(6)
    ]
    opt = GramGaussNewton(model, **kwargs)
    steps = 257 if dtypes[0] == torch.bfloat16 else 3
    for i in range(steps):
        opt.step(closure(model, *data[i % 3]))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    twin = copy.deepcopy(model)
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin.load_state_dict(loaded["model"])
    resumed = GramGaussNewton(twin, **kwargs)
    resumed.load_state_dict(loaded["opt"])
    for x, y in data[3:]:
        opt.step(closure(model, x, y))
        resumed.step(closure(twin, x, y))
        for a, b in zip(model.parameters(), twin.parameters()):
            assert_same_run(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lam": True}, "lam"),
        ({"alpha": False}, "alpha"),
        ({"momentum": False}, "momentum"),
        ({"weight_decay": False}, "weight_decay"),
        ({"lam": torch.tensor(2.0)}, "lam"),
        ({"alpha": "0.3"}, "alpha"),
        ({"momentum": None}, "momentum"),
        ({"solve_dtype": torch.float16}, "solve_dtype"),
        ({"solve_dtype": "float64"}, "solve_dtype"),
        ({"solve_dtype": torch.int64}, "solve_dtype"),
    ],
)
def test_hyper_parameters_must_be_numbers(kwargs: dict, match: str) -> None:
    """A bool, a tensor, a string or ``None`` for a number (and a dtype the solve cannot take)
    is refused by name (was: ``lam=True`` taken as 1, strings a ``TypeError`` about ``<``, a
    float16 ``solve_dtype`` failing inside the first step's Cholesky)."""
    with pytest.raises(ValueError, match=f"Invalid {match}"):
        GramGaussNewton(_mlp(), **kwargs)
    if "solve_dtype" not in kwargs:  # set in param_groups later: refused at the step
        model = _mlp()
        opt = GramGaussNewton(model)
        opt.param_groups[0].update(kwargs)
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.randn(6, 3, dtype=torch.float64)
        with pytest.raises(ValueError, match=f"Invalid {match}"):
            opt.step(lambda: model(x).squeeze(1))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reject_below": math.nan},  # every step would be rejected
        {"factor": math.inf},  # one bad step would take alpha to inf for good
        {"min_alpha": True},
        {"check_every": True},
        {"trust_after": True},
        {"recheck_above": True},
        {"low": "0.25"},
    ],
)
def test_gain_ratio_rule_settings_must_be_numbers(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Invalid|need"):
        GainRatioDamping(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"smoothing": True}, {"max_samples": math.nan}, {"points": 2.5}, {"span": (1e-5, math.inf)}]
)
def test_cross_validated_rule_settings_are_checked(kwargs: dict) -> None:
    from gramnewton.damping import CrossValidatedDamping

    with pytest.raises(ValueError, match="Invalid|need"):
        CrossValidatedDamping(**kwargs)


def test_given_parameters_a_named_engine_still_refuses_a_batchnorm_in_training_mode() -> None:
    """The model form and ``engine="auto"`` refused it; parameters with a named engine stepped
    (the reference engine's Gram of the batch-coupled residuals) and moved the running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(model.parameters(), engine="reference")
    buffers = [b.clone() for b in model.buffers()]
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        opt.step(lambda: model(x) - y)
    _assert_unchanged(opt, before)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    model.eval()  # the next steps are checked too: eval mode steps, training mode is refused again
    opt.step(lambda: model(x) - y)
    model.train()
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        opt.step(lambda: model(x) - y)


def test_a_linear_layer_without_inputs_gives_the_reference_engines_step() -> None:
    """``nn.Linear(0, k)`` (a weight of shape ``(k, 0)``, e.g. an optional feature block left
    empty): the hooks engine's step equals the reference engine's (was: ``cannot reshape tensor of
    0 elements into shape [6, -1, 0]``)."""

    class EmptyBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.empty = nn.Linear(3, 2), nn.Linear(0, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) + self.empty(x[:, :0])

    torch.manual_seed(0)
    model = EmptyBlock().double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    hooks = GramGaussNewton(model, engine="hooks", lam=1.0, adaptive_damping=False)
    reference = GramGaussNewton(twin, engine="reference", lam=1.0, adaptive_damping=False)
    for _ in range(2):
        hooks.step(lambda: model(x) - y)
        reference.step(lambda: twin(x) - y)
    assert_close(flat_params(model), flat_params(twin), 1e-12, "Linear(0, k) on the hooks engine")


def test_integer_residuals_on_the_reevaluation_are_refused_and_restore() -> None:
    """As on the step's first evaluation (was: truncated into a loss after the step, a gain ratio
    of 1.11 for 0.93)."""
    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(model)
    before = _snapshot(opt)
    calls = []

    def closure():
        calls.append(1)
        out = model(x) - y
        return out if len(calls) == 1 else (out * 100).long()

    with pytest.raises(TypeError, match="floating point, got torch.int64 when the closure was re-evaluated"):
        opt.step(closure)
    _assert_unchanged(opt, before)


class _BatchContext(nn.Module):
    """A learned multiple of the batch mean, its gate at zero at the start (ReZero's): the samples
    mix only once training moves the gate."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.gamma * h.mean(0, keepdim=True)


def test_samples_mixed_through_a_gate_at_zero_give_the_exact_steps() -> None:
    """At ``gamma = 0`` the module's outputs run again sample by sample are the recorded ones,
    but its rows for ``gamma`` are ``g_i h_i`` instead of ``g_i mean(h)``: the rows are checked
    against the module's batch vector-Jacobian product too (was: a Gram 1.6% off, the step 19%).
    The first step moves the gate and the first Linear's rows stop being the samples: the row
    check runs again at the second forward and routes it (was: its verdict cached from the first
    step, 30% off from then on). Three default steps equal the reference engine's (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), _BatchContext(6), nn.Linear(6, 2)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    hooks = GramGaussNewton(model, engine="hooks")
    reference = GramGaussNewton(twin, engine="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the routing's warning, at the second step
        for step in range(3):
            hooks.step(lambda: model(x) - y)
            reference.step(lambda: twin(x) - y)
            assert_close(flat_params(model), flat_params(twin), 1e-10, f"step {step + 1} with a gate at zero")


def test_functional_engine_refuses_a_trained_parameter_its_residual_does_not_name() -> None:
    """A ``FunctionalResidual`` given the weights only, whose function still reaches the biases
    (``functional_call`` falls back to the module's own tensors): refused, nothing changed (was:
    zero columns for the biases, a Gram 36% off and their step zero)."""
    from torch.func import functional_call

    from gramnewton import FunctionalResidual, Term

    model = _mlp()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    closure = FunctionalResidual(weights, Term(lambda p, xi, yi: functional_call(model, p, (xi,)) - yi, (x, y)))
    opt = GramGaussNewton(model, engine="functional")
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"2 trained parameter\(s\) of shapes \[\(8,\), \(1,\)\] are not among"):
        opt.step(closure)
    _assert_unchanged(opt, before)
