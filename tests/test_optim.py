"""GramGaussNewton: one step against the dense formula, limits of Eq. 11, errors, state."""

from __future__ import annotations

import copy

import pytest
import torch
from dense import assert_close, assert_same_run, dense_jacobian, dense_step, flat_params, groupnorm_cnn, perturbed_fixup
from torch import nn

import gramnewton
from gramnewton import GramGaussNewton, SingularGramError, full_batch_step


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 1))


# name, model builder, input shape, outputs, batch
CASES = [
    ("mlp", _mlp, (3, 4), 1, 6),
    ("groupnorm_cnn", groupnorm_cnn, (1, 6, 6), 2, 5),
    ("resnet8_fixup", perturbed_fixup, (1, 8, 8), 1, 4),
]
ENGINES = ["reference", "auto"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name,build,shape,k,b", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("lam,alpha", [(1.0, 0.1), (0.5, 0.0), (2.0, 3.0)])
def test_step_matches_dense_formula(name, build, shape, k, b, lam, alpha, engine):
    model = build().double()
    x = torch.randn(b, *shape, dtype=torch.float64)
    y = torch.randn(b, k, dtype=torch.float64)
    expected = flat_params(model) + dense_step(model, x, y, lam, alpha)
    opt = GramGaussNewton(model, lam=lam, alpha=alpha, engine=engine, adaptive_damping=False, momentum=0.0)
    loss = opt.step(lambda: model(x) - y)
    assert_close(flat_params(model), expected, 1e-10, f"{name} parameters after one step")
    assert loss.requires_grad is False and loss.dim() == 0


def test_residuals_of_shape_b_equal_b_by_1():
    model = _mlp().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    twin = copy.deepcopy(model)
    GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: model(x).squeeze(1) - y)
    GramGaussNewton(twin, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: twin(x) - y.unsqueeze(1))
    assert_close(flat_params(model), flat_params(twin), 1e-12, "(b,) vs (b, 1) residuals")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form", ["residuals", "pair"])
@pytest.mark.parametrize("accelerated", [False, True])
def test_residuals_of_shape_b_by_field_equal_their_flattened_rows(engine: str, form: str, accelerated: bool) -> None:
    """A field per sample (an image-to-image network's ``(b, 1, H, W)`` outputs) was refused
    ("must return (b,) or (b, k)"); its rows are sample ``i``'s flattened entries, and three steps
    with the defaults (momentum, the gain-ratio rule re-evaluating the closure), or with geodesic
    acceleration, are bit for bit those of the closure that flattens them itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 3, padding=1)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    options = dict(engine=engine, geodesic_acceleration=accelerated)
    if form == "pair":
        field, flat = (lambda: (model(x), y)), (lambda: (twin(x).flatten(1), y.flatten(1)))
    else:
        field, flat = (lambda: model(x) - y), (lambda: (twin(x) - y).flatten(1))
    opt, reference = GramGaussNewton(model, **options), GramGaussNewton(twin, **options)
    for _ in range(3):
        assert_same_run(opt.step(field), reference.step(flat))
        assert_same_run(flat_params(model), flat_params(twin))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form", ["residuals", "pair"])
def test_complex_residuals_are_their_real_and_imaginary_parts(engine: str, form: str) -> None:
    """A misfit in Fourier space, ``rfft(f) - rfft(y)`` (complex), was refused ("residuals must be
    floating point"); its squared modulus is ``Re^2 + Im^2``, so its rows are those of
    ``view_as_real``'s two parts: three steps with the defaults (the gain ratio re-evaluates the
    closure) bit for bit those of a closure that returns them itself (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    target = torch.fft.rfft(y)
    if form == "pair":
        spectral = lambda: (torch.fft.rfft(model(x)), target)  # noqa: E731
    else:
        spectral = lambda: torch.fft.rfft(model(x)) - target  # noqa: E731
    parts = lambda: torch.view_as_real(torch.fft.rfft(twin(x)) - target)  # noqa: E731
    opt, reference = GramGaussNewton(model, engine=engine), GramGaussNewton(twin, engine=engine)
    for _ in range(3):
        assert_same_run(opt.step(spectral), reference.step(parts))
        assert_same_run(flat_params(model), flat_params(twin))


def test_linear_model_interpolates_batch_with_alpha_zero():
    model = nn.Linear(20, 1, dtype=torch.float64)
    x, y = torch.randn(8, 20, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.0, adaptive_damping=False, momentum=0.0)
    opt.step(lambda: model(x).squeeze(1) - y)
    assert float((model(x).squeeze(1) - y).detach().abs().max()) < 1e-10


def test_large_alpha_approaches_scaled_gradient_step():
    model = _mlp().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    start = flat_params(model)
    loss = 0.5 * (model(x).squeeze(1) - y).pow(2).sum()
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    gaps = []
    for alpha in (1e3, 1e5, 1e7):
        trial = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip(trial.parameters(), model.parameters()):
                p.copy_(q)
        GramGaussNewton(trial, alpha=alpha, lam=1.0, adaptive_damping=False, momentum=0.0).step(
            lambda: trial(x).squeeze(1) - y
        )
        step, expected = flat_params(trial) - start, -grad / alpha
        gaps.append(float((step - expected).norm() / expected.norm()))
    # the gap is O(||G|| / alpha): it must shrink ~100x per 100x alpha
    assert gaps[0] > 50 * gaps[1] > 2500 * gaps[2] and gaps[2] < 1e-5, gaps


def test_weight_decay_is_decoupled():
    model = _mlp().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    wd = 0.01
    expected = (1 - wd) * flat_params(model) + dense_step(model, x, y, 1.0, 0.1)
    GramGaussNewton(model, alpha=0.1, weight_decay=wd, lam=1.0, adaptive_damping=False, momentum=0.0).step(
        lambda: model(x) - y
    )
    assert_close(flat_params(model), expected, 1e-10, "decoupled weight decay")


def test_weight_decay_with_gain_ratio_is_the_same_step_and_does_not_bias_the_ratio():
    # the decay is applied after the verdict: the step is still (1 - wd) w - phi, and the gain
    # ratio is the one of the Gauss-Newton step alone (a decay that raised the batch loss used to
    # be judged as a failed step, and a large wd then rejected every step)
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    plain, decayed = _mlp().double(), _mlp().double()
    decayed.load_state_dict(plain.state_dict())
    wd = 0.2
    expected = (1 - wd) * flat_params(plain) + dense_step(plain, x, y, 1.0, 0.1)
    ratios = []
    for model, decay in ((plain, 0.0), (decayed, wd)):
        opt = GramGaussNewton(
            model, alpha=0.1, weight_decay=decay, lam=1.0, adaptive_damping=True, momentum=0.0, metric=None
        )
        opt.step(lambda m=model: m(x) - y)
        assert not opt.last_diagnostics.rejected
        ratios.append(opt.last_gain_ratio)
    assert_close(flat_params(decayed), expected, 1e-10, "decayed step with a damping rule")
    assert ratios[0] == ratios[1], ratios


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(alpha=-0.1), "alpha"),
        (dict(lam=0.0), "lam"),
        (dict(lam=-1.0), "lam"),
        (dict(weight_decay=1.0), "weight_decay"),
    ],
)
def test_invalid_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GramGaussNewton(_mlp(), **{"momentum": 0.0, **kwargs})


def test_lam_must_agree_across_param_groups():
    model = _mlp()
    layers = [m for m in model if isinstance(m, nn.Linear)]
    opt = GramGaussNewton(
        [{"params": layers[0].parameters(), "lam": 2.0}, {"params": layers[1].parameters()}],
        adaptive_damping=False,
        momentum=0.0,
    )
    x, y = torch.randn(4, 3, 4), torch.randn(4, 1)
    with pytest.raises(ValueError, match="lam must be the same"):
        opt.step(lambda: model(x) - y)


@pytest.mark.parametrize("bad", ["nan", "inf", "scalar", "detached", "not_tensor"])
def test_bad_residuals_raise_and_change_nothing(bad):
    model = _mlp()
    x, y = torch.randn(4, 3, 4), torch.randn(4, 1)
    before = flat_params(model).clone()
    if bad == "nan":
        y[1, 0] = float("nan")
    if bad == "inf":
        y[2, 0] = float("inf")
    closures = {
        "scalar": lambda: (model(x) - y).pow(2).mean(),
        "detached": lambda: (model(x) - y).detach(),
        "not_tensor": lambda: 1.0,
    }
    opt = GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0)
    with pytest.raises((ValueError, TypeError)) as info:
        opt.step(closures.get(bad, lambda: model(x) - y))
    if bad in ("nan", "inf"):
        assert "NaN or Inf" in str(info.value) and isinstance(info.value, gramnewton.NonFiniteError)
    assert torch.equal(flat_params(model), before)


def test_batchnorm_in_training_mode_is_refused_before_forward():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    stats = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: model(x) - y)
    assert torch.equal(model[1].running_mean, stats)  # the forward pass never ran
    model.eval()
    GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: model(x) - y)


def test_duplicated_samples_with_alpha_zero_give_finite_step():
    model = _mlp().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64).repeat(2, 1, 1)
    y = torch.randn(3, 1, dtype=torch.float64).repeat(2, 1)
    opt = GramGaussNewton(model, alpha=0.0, lam=1.0, adaptive_damping=False, momentum=0.0)
    before = float((model(x) - y).detach().pow(2).mean())
    opt.step(lambda: model(x) - y)
    assert torch.isfinite(flat_params(model)).all()
    assert opt.last_step.solve_info.method in ("jitter", "eigh")
    assert float((model(x) - y).detach().pow(2).mean()) < before


def test_non_finite_gram_raises_and_changes_nothing():
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(1e30)
    x, y = torch.full((4, 3), 1e30), torch.zeros(4, 1)
    before = flat_params(model).clone()
    with pytest.raises((SingularGramError, ValueError)):
        GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: model(x) - y)
    assert torch.equal(flat_params(model), before)


def test_state_dict_round_trip_gives_identical_next_steps():
    model = _mlp().double()
    data = [(torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)) for _ in range(3)]
    opt = GramGaussNewton(model, lam=0.7, alpha=0.2, weight_decay=1e-3, adaptive_damping=False, momentum=0.0)
    x, y = data[0]
    opt.step(lambda: model(x) - y)
    twin = copy.deepcopy(model)
    twin_opt = GramGaussNewton(twin, lam=1.0, alpha=1.0, adaptive_damping=False, momentum=0.0)
    twin_opt.load_state_dict(opt.state_dict())
    assert twin_opt.param_groups[0]["lam"] == 0.7 and twin_opt.param_groups[0]["alpha"] == 0.2
    for x, y in data[1:]:
        opt.step(lambda: model(x) - y)
        twin_opt.step(lambda: twin(x) - y)
    assert_same_run(flat_params(model), flat_params(twin))
    assert int(twin_opt.state[next(twin.parameters())]["step"]) == 3


def test_step_counts_per_parameter_and_a_loaded_copy_keeps_its_own() -> None:
    """The parameters' ``step`` counts share one tensor per distinct count (optim._step): each
    parameter still counts its own accepted steps (a group added later starts at 1), and an
    optimizer that loaded a state_dict (whose ``step`` tensors are the very objects of the
    source's state: torch does not copy them) keeps its counts while the source steps on."""
    model, x, y = _two_layers()
    first, last = list(model[0].parameters()), list(model[2].parameters())
    opt = GramGaussNewton(first, lam=0.7, alpha=0.2, momentum=0.5, adaptive_damping=False)
    opt.step(lambda: model(x) - y)
    opt.step(lambda: model(x) - y)
    twin_opt = GramGaussNewton(copy.deepcopy(first), lam=0.7, alpha=0.2, momentum=0.5, adaptive_damping=False)
    twin_opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": last})
    opt.step(lambda: model(x) - y)
    assert [int(opt.state[p]["step"]) for p in first + last] == [3, 3, 1, 1]
    assert [int(twin_opt.state[p]["step"]) for p in twin_opt.param_groups[0]["params"]] == [2, 2]


def test_full_batch_step_is_eq9():
    model = _mlp().double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    jac = dense_jacobian(model, x)
    expected = flat_params(model) + dense_step(model, x, y, 1.0, 0.0)
    step = full_batch_step(model.parameters(), lambda: model(x) - y)
    assert_close(step.gram, jac @ jac.T, 1e-12, "full-batch Gram")
    assert_close(flat_params(model), expected, 1e-9, "full-batch step")


def test_registered_engine_is_built_by_name() -> None:
    """``register_engine`` makes a name usable as ``engine=``; the step is the engine's step."""
    from gramnewton.engines.select import ENGINE_FACTORIES

    built = []

    def factory(params, model):
        built.append(model)
        return gramnewton.ReferenceEngine(params)

    gramnewton.register_engine("counting_reference", factory)
    try:
        with pytest.raises(ValueError, match="already registered"):
            gramnewton.register_engine("counting_reference", factory)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        twin = copy.deepcopy(model)
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
        GramGaussNewton(model, engine="counting_reference", momentum=0.0).step(lambda: model(x).squeeze(1) - y)
        GramGaussNewton(twin, engine="reference", momentum=0.0).step(lambda: twin(x).squeeze(1) - y)
        assert built == [model]
        assert_same_run(flat_params(model), flat_params(twin))
    finally:
        ENGINE_FACTORIES.pop("counting_reference", None)
    with pytest.raises(ValueError, match="counting_reference|Invalid engine"):
        GramGaussNewton(model, engine="counting_reference", momentum=0.0)


def _two_layers() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    return model, torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)


@pytest.mark.parametrize("engine", ["auto", "reference"])
@pytest.mark.parametrize("change", ["add_param_group", "unfreeze", "freeze"])
def test_a_step_trains_the_parameters_that_require_grad_now(engine: str, change: str) -> None:
    """As with torch.optim, a step trains every parameter of ``param_groups`` that requires grad at
    that step, and only those: a group added by ``add_param_group`` or a parameter unfrozen after
    construction was left untrained, and one frozen after construction was still updated. The
    step is Eq. 11 over the parameters trained (``dense_step``, over the parameters that require
    grad; float64); a frozen one is left bit for bit."""
    model, x, y = _two_layers()
    first, last = list(model[0].parameters()), list(model[2].parameters())
    if change == "add_param_group":
        opt = GramGaussNewton(first, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False, engine=engine)
        opt.add_param_group({"params": last})
        trained, fixed = first + last, []
    elif change == "unfreeze":
        model[2].weight.requires_grad_(False)
        opt = GramGaussNewton(model, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False, engine=engine)
        model[2].weight.requires_grad_(True)
        trained, fixed = first + last, []
    else:
        opt = GramGaussNewton(model, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False, engine=engine)
        opt.step(lambda: model(x) - y)
        model[2].weight.requires_grad_(False)
        trained, fixed = first + [model[2].bias], [model[2].weight]
    assert [id(p) for p in model.parameters() if p.requires_grad] == [id(p) for p in trained]
    frozen = [p.detach().clone() for p in fixed]
    expected = flat_params(model) + dense_step(model, x, y, 0.7, 0.2)
    opt.step(lambda: model(x) - y)
    assert_close(flat_params(model), expected, 1e-10, f"{change}: the parameters trained")
    assert all(torch.equal(p, q) for p, q in zip(fixed, frozen))


def test_an_engine_instance_for_other_parameters_is_refused() -> None:
    from gramnewton.engines import ReferenceEngine

    model, x, y = _two_layers()
    params = list(model.parameters())
    opt = GramGaussNewton(params, engine=ReferenceEngine(params), adaptive_damping=False)
    model[0].weight.requires_grad_(False)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="engine instance"):
        opt.step(lambda: model(x) - y)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("engine", ["auto", "reference"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_step_under_no_grad_is_the_step(engine: str, loss: str) -> None:
    """``opt.step`` called inside ``torch.no_grad()`` (a training loop's evaluation block, say) takes
    the same step as outside it, bit for bit; it raised ``AttributeError: 'NoneType' object has no
    attribute 'next_functions'`` (the hooks engine's residuals had lost their graph)."""
    torch.manual_seed(0)
    model = groupnorm_cnn(outputs=3).double()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64) if loss == "mse" else torch.arange(8) % 3

    def closure_of(net: nn.Module):
        return (lambda: net(x) - y) if loss == "mse" else (lambda: (net(x), y))

    opts = [GramGaussNewton(net, engine=engine, loss=loss) for net in (model, twin)]
    for _ in range(3):
        opts[0].step(closure_of(model))
        with torch.no_grad():
            opts[1].step(closure_of(twin))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_same_run(p, q)


def test_a_step_under_inference_mode_is_refused_with_the_reason() -> None:
    """``torch.inference_mode()`` cannot be left for autograd inside the step: refused with that
    reason, nothing changed (the message was "residuals do not depend on any parameter ...; run the
    forward pass inside the closure", which the closure did)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = GramGaussNewton(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="inference_mode"), torch.inference_mode():
        opt.step(lambda: model(x) - y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


class _EncoderHead(nn.Module):
    """Two modules a closure calls one after the other, as ``head(encoder(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(3 * 6 * 6, 2))


@pytest.mark.parametrize("layout", ["one_model", "encoder_and_head"])
def test_given_parameters_the_first_step_finds_the_model(layout: str) -> None:
    """torch.optim's idiom, ``GramGaussNewton(model.parameters())``, had every step on the reference
    engine (a backward pass per residual: 100x and more a step on a ResNet) because the
    optimizer was not given the module. The first step now finds the modules the closure calls
    (one run without gradients) and the hooks engine takes them: the steps, with the defaults
    (momentum, gain-ratio damping) and dropout drawing in the closure, are bit for bit those of
    an optimizer given the modules, and the random stream after them is the same (the extra run
    replays the step's draws)."""
    torch.manual_seed(0)
    net = _EncoderHead().double()
    twin = copy.deepcopy(net)
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)

    def closure_of(model: _EncoderHead):
        if layout == "one_model":
            return lambda: nn.Sequential(model.encoder, model.head)(x) - y
        return lambda: model.head(model.encoder(x)) - y

    given = (
        nn.Sequential(twin.encoder, twin.head) if layout == "one_model" else nn.ModuleList([twin.encoder, twin.head])
    )
    found, known = GramGaussNewton(net.parameters()), GramGaussNewton(given)
    rng = torch.cuda if net.head[1].weight.is_cuda else torch  # the generator the dropout draws from
    for _ in range(3):
        state = rng.get_rng_state()
        found.step(closure_of(net))
        after_found = rng.get_rng_state()
        rng.set_rng_state(state)
        known.step(closure_of(twin))
        assert torch.equal(rng.get_rng_state(), after_found)
        assert_same_run(flat_params(net), flat_params(twin))
    assert type(found.engine).__name__ == "HooksEngine"


def test_given_parameters_a_batchnorm_in_training_mode_is_refused_before_its_forward() -> None:
    """As with the model given: refused with the reason, its running statistics unchanged (the run
    that finds the model stops before the BatchNorm's forward), no parameter changed."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    stats, before = model[1].running_mean.clone(), flat_params(model)
    with pytest.raises(ValueError, match="BatchNorm1d in training mode"):
        GramGaussNewton(model.parameters()).step(lambda: model(x) - y)
    assert torch.equal(model[1].running_mean, stats) and torch.equal(flat_params(model), before)


def test_given_parameters_that_no_called_module_owns_the_reference_engine_steps() -> None:
    """A network of raw tensors (no module call owns them): the reference engine, Eq. 11 exactly."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    params = [nn.Parameter(w1.clone()), nn.Parameter(w2.clone())]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = GramGaussNewton(params, lam=0.7, alpha=0.2, momentum=0.0, adaptive_damping=False)
    opt.step(lambda: torch.tanh(x @ params[0]) @ params[1] - y)
    assert type(opt.engine).__name__ == "ReferenceEngine"
    jac = torch.func.jacrev(lambda a, b: (torch.tanh(x @ a) @ b).reshape(-1), argnums=(0, 1))(w1, w2)
    jac = torch.cat([j.reshape(6, -1) for j in jac], 1)
    r = (torch.tanh(x @ w1) @ w2 - y).reshape(-1)
    step = jac.T @ torch.linalg.solve(0.7 * jac @ jac.T + 0.2 * torch.eye(6, dtype=torch.float64), r)
    assert_close(
        torch.cat([p.detach().reshape(-1) for p in params]),
        torch.cat([w1.reshape(-1), w2.reshape(-1)]) - step,
        1e-10,
        "raw tensors",
    )
