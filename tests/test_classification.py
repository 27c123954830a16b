"""General losses: the generalized Gauss-Newton step against the dense parameter-space formula."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from dense import assert_close, assert_same_run, cpu_only, dense_jacobian, flat_params, groupnorm_cnn
from torch import Tensor, nn
from torch.func import grad, hessian

from gramnewton import BinaryCrossEntropy, CrossEntropy, GramGaussNewton, Loss, NonFiniteError, SquaredError
from gramnewton.generalized import LossClosure, output_factor, top_basis
from gramnewton.update import apply_direction, gram_gauss_newton_direction


def _mlp(k: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 12), nn.Softplus(), nn.Linear(12, k))


# name, builder, input shape, classes, batch
MODELS = [("mlp", _mlp, (3, 4), 4, 6), ("groupnorm_cnn", groupnorm_cnn, (1, 6, 6), 3, 5)]
MODEL_IDS = [m[0] for m in MODELS]


def _targets(kind: str, b: int, k: int) -> Tensor:
    if kind == "labels":
        return torch.randint(0, k, (b,))
    return torch.softmax(torch.randn(b, k, dtype=torch.float64), 1)


def _sum_loss(name: str, targets: Tensor):
    """``f (b, k) -> sum_i l_i`` written with torch.nn.functional, independent of gramnewton.losses."""
    if name == "cross_entropy":
        if targets.dim() == 1:
            return lambda f: F.cross_entropy(f, targets, reduction="sum")
        return lambda f: -(targets * F.log_softmax(f, 1)).sum()
    if name == "binary_cross_entropy":
        return lambda f: F.binary_cross_entropy_with_logits(f, targets, reduction="sum")
    return lambda f: 0.5 * (f - targets).pow(2).sum()


def _derivatives(model: nn.Module, x: Tensor, total) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense ``J (b*k, m)``, logits ``(b, k)``, ``g (b*k,)`` and ``H (b*k, b*k)`` by autograd."""
    with torch.no_grad():
        f = model(x)
    jac = dense_jacobian(model, x)
    return jac, f, grad(total)(f).reshape(-1), hessian(total)(f).reshape(f.numel(), f.numel())


def _dense_ggn(jac: Tensor, g: Tensor, h: Tensor, lam: float, alpha: float) -> Tensor:
    """``-(lam J^T H J + alpha I)^{-1} J^T g`` in parameter space, flat ``(m,)``."""
    m = jac.shape[1]
    return -torch.linalg.solve(lam * jac.T @ h @ jac + alpha * torch.eye(m, dtype=jac.dtype), jac.T @ g)


def _blocks(h: Tensor, b: int, k: int) -> Tensor:
    """Per-sample blocks ``(b, k, k)`` of a block-diagonal ``(b*k, b*k)`` matrix."""
    return torch.stack([h[i * k : (i + 1) * k, i * k : (i + 1) * k] for i in range(b)])


def _blockdiag(blocks: Tensor) -> Tensor:
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
@pytest.mark.parametrize("name,build,shape,k,b", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("lam,alpha", [(1.0, 0.1), (0.5, 2.0)])
def test_exact_cross_entropy_step_matches_dense_formula(name, build, shape, k, b, target_kind, engine, lam, alpha):
    model = build(k).double()
    x = torch.randn(b, *shape, dtype=torch.float64)
    y = _targets(target_kind, b, k)
    total = _sum_loss("cross_entropy", y)
    jac, f, g, h = _derivatives(model, x, total)
    expected = flat_params(model) + _dense_ggn(jac, g, h, lam, alpha)
    opt = GramGaussNewton(
        model,
        lam=lam,
        alpha=alpha,
        engine=engine,
        loss="cross_entropy",
        curvature="exact",
        adaptive_damping=False,
        momentum=0.0,
    )
    loss = opt.step(lambda: (model(x), y))
    assert_close(flat_params(model), expected, 1e-9, f"{name} exact GGN step ({target_kind}, {engine})")
    assert loss.dim() == 0 and not loss.requires_grad
    assert_close(loss, total(f) / b, 1e-12, "returned mean cross-entropy")


def _top_c_hessian(h_blocks: Tensor, g: Tensor, c: int) -> Tensor:
    """``V V^T H_i V V^T`` written out: ``V`` = top-|g| unit vectors and the rest of ``g``."""
    out = []
    for hi, gi in zip(h_blocks, g):
        top = gi.abs().topk(min(c, gi.numel() - 1)).indices
        cols = [torch.eye(gi.numel(), dtype=gi.dtype)[j] for j in top]
        rest = gi.clone()
        rest[top] = 0
        if rest.norm() > 0:
            cols.append(rest / rest.norm())
        if not cols:  # g_i = 0 (a saturated, correctly classified sample): an empty subspace
            out.append(torch.zeros_like(hi))
            continue
        v = torch.stack(cols, 1)
        out.append(v @ v.T @ hi @ v @ v.T)
    return torch.stack(out)


@pytest.mark.parametrize("curvature,c", [("gradient", 0), ("top_c", 1), ("top_c", 2), ("top_c", 3)])
@pytest.mark.parametrize("name,build,shape,k,b", MODELS, ids=MODEL_IDS)
def test_cheaper_curvatures_match_their_dense_formula(name, build, shape, k, b, curvature, c):
    model = build(k).double()
    x = torch.randn(b, *shape, dtype=torch.float64)
    y = _targets("labels", b, k)
    jac, f, g, h = _derivatives(model, x, _sum_loss("cross_entropy", y))
    h_hat = _blockdiag(_top_c_hessian(_blocks(h, b, k), g.reshape(b, k), c))
    if c >= k - 1:  # the projection then spans everything: exactly H
        assert_close(h_hat, h, 1e-12, "top_c with c = k - 1 is the exact Hessian")
    expected = flat_params(model) + _dense_ggn(jac, g, h_hat, 1.0, 0.3)
    opt = GramGaussNewton(
        model,
        alpha=0.3,
        loss="cross_entropy",
        curvature=curvature,
        top_c=c,
        lam=1.0,
        adaptive_damping=False,
        momentum=0.0,
    )
    opt.step(lambda: (model(x), y))
    assert_close(flat_params(model), expected, 1e-9, f"{name} {curvature} (c={c}) step")


def test_gradient_curvature_is_the_curvature_along_g():
    f, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 5, (7,))
    loss = CrossEntropy()
    t = loss.check(f, y)
    sqrt_h, u = output_factor(loss, f, t, "gradient")
    g, h = loss.gradient(f, t), loss.hessian_sqrt(f, t) @ loss.hessian_sqrt(f, t).transpose(1, 2)
    expected = (
        g.unsqueeze(2)
        * g.unsqueeze(1)
        * ((g.unsqueeze(1) @ h @ g.unsqueeze(2)).squeeze() / g.norm(dim=1) ** 4)[:, None, None]
    )
    assert sqrt_h.shape == (7, 5, 1)
    assert_close(sqrt_h @ sqrt_h.transpose(1, 2), expected, 1e-12, "gradient-direction curvature")
    assert_close((sqrt_h @ u.unsqueeze(2)).squeeze(2), g, 1e-12, "B u = g")
    assert top_basis(g, 2).shape == (7, 5, 3)


@pytest.mark.parametrize("target_kind", ["labels", "probabilities"])
def test_cross_entropy_factorisation(target_kind):
    f = 3 * torch.randn(6, 4, dtype=torch.float64)
    loss = CrossEntropy()
    t = loss.check(f, _targets(target_kind, 6, 4))
    total = _sum_loss("cross_entropy", t.argmax(1) if target_kind == "labels" else t)
    b_mat = loss.hessian_sqrt(f, t)
    u = loss.sqrt_solve(f, t, b_mat, loss.gradient(f, t))
    h = hessian(total)(f).reshape(24, 24)
    assert_close(_blockdiag(b_mat @ b_mat.transpose(1, 2)), h, 1e-12, "B B^T = H")
    assert_close((b_mat @ u.unsqueeze(2)).reshape(-1), grad(total)(f).reshape(-1), 1e-12, "B u = g")
    assert_close(loss.per_sample(f, t).sum(), total(f), 1e-12, "per-sample loss")


class WeightedSquares(Loss):
    """A user loss through the protocol only (default least-squares ``sqrt_solve``):
    ``l_i = 1/2 sum_c w_c (f_ic - y_ic)^2``."""

    name = "weighted_squares"

    def __init__(self, weights: Tensor):
        self.weights = weights

    def check(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return targets

    def per_sample(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (self.weights * (outputs - targets).pow(2)).sum(1)

    def gradient(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.weights * (outputs - targets)

    def hessian_sqrt(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.diag_embed(self.weights.sqrt().expand_as(outputs))


@pytest.mark.parametrize("which", ["binary_cross_entropy", "user_loss"])
def test_other_losses_match_dense_formula(which):
    model = _mlp(3).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    if which == "binary_cross_entropy":
        y, loss = torch.rand(5, 3, dtype=torch.float64), BinaryCrossEntropy()
        total = _sum_loss(which, y)
    else:
        weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
        y, loss = torch.randn(5, 3, dtype=torch.float64), WeightedSquares(weights)

        def total(f):
            return 0.5 * (weights * (f - y).pow(2)).sum()

    jac, f, g, h = _derivatives(model, x, total)
    expected = flat_params(model) + _dense_ggn(jac, g, h, 1.0, 0.2)
    opt = GramGaussNewton(model, alpha=0.2, loss=loss, curvature="exact", lam=1.0, adaptive_damping=False, momentum=0.0)
    opt.step(lambda: (model(x), y))
    assert_close(flat_params(model), expected, 1e-9, f"{which} step")


@pytest.mark.parametrize("loss", ["mse", SquaredError()])
@pytest.mark.parametrize("engine", ["reference", "auto"])
def test_mse_path_is_eq11_bit_for_bit(loss, engine):
    model = groupnorm_cnn(2)
    x, y = torch.randn(5, 1, 6, 6), torch.randn(5, 2)
    twin = copy.deepcopy(model)
    opt = GramGaussNewton(model, alpha=0.1, engine=engine, loss=loss, lam=1.0, adaptive_damping=False, momentum=0.0)
    got = opt.step(lambda: model(x) - y)
    twin_opt = GramGaussNewton(twin, alpha=0.1, engine=engine, lam=1.0, adaptive_damping=False, momentum=0.0)
    step = gram_gauss_newton_direction(twin_opt.engine, lambda: twin(x) - y, lam=1.0, alpha=0.1)
    apply_direction(list(twin.parameters()), step.direction)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_same_run(p, q)
    assert_same_run(got, step.loss)


def test_generalized_machinery_reduces_to_eq11_for_the_square_loss():
    """The pseudo-residual path with ``B = I`` and ``u = r`` is Eq. 11 (to rounding)."""
    model = _mlp(2).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    GramGaussNewton(model, alpha=0.1, lam=1.0, adaptive_damping=False, momentum=0.0).step(lambda: model(x) - y)
    engine = GramGaussNewton(twin, alpha=0.1, lam=1.0, adaptive_damping=False, momentum=0.0).engine
    step = gram_gauss_newton_direction(engine, LossClosure(SquaredError(), lambda: (twin(x), y)), lam=1.0, alpha=0.1)
    apply_direction(list(twin.parameters()), step.direction)
    assert_close(flat_params(twin), flat_params(model), 1e-13, "square loss through LossClosure")


def test_adaptive_damping_gain_ratio_compares_loss_decreases():
    model = _mlp(4).double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    total = _sum_loss("cross_entropy", y)
    jac, f, g, h = _derivatives(model, x, total)
    delta = _dense_ggn(jac, g, h, 1.0, 0.5)
    predicted = -(g @ (jac @ delta) + 0.5 * (jac @ delta) @ h @ (jac @ delta))
    opt = GramGaussNewton(
        model, alpha=0.5, loss="cross_entropy", curvature="exact", adaptive_damping=True, lam=1.0, momentum=0.0
    )
    before = total(f)
    opt.step(lambda: (model(x), y))
    with torch.no_grad():
        after = total(model(x))
    assert_close(
        torch.tensor(opt.last_gain_ratio, dtype=torch.float64), (before - after) / predicted, 1e-9, "gain ratio"
    )


def test_adaptive_damping_rejects_a_step_that_increases_the_loss():
    model = _mlp(4).double()
    x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 4, (6,))
    with torch.no_grad():  # huge logits: the quadratic model is far off
        model[-1].weight.mul_(50)
    start = flat_params(model)
    opt = GramGaussNewton(
        model, alpha=1e-6, loss="cross_entropy", curvature="exact", adaptive_damping=True, lam=1.0, momentum=0.0
    )
    opt.step(lambda: (model(x), y))
    if opt.last_gain_ratio < 0:
        assert torch.equal(flat_params(model), start)
        assert opt.param_groups[0]["alpha"] > 1e-6
    else:  # the test must exercise a rejection
        pytest.fail(f"expected a rejected step, got gain ratio {opt.last_gain_ratio}")


@pytest.mark.parametrize("curvature", ["exact", "top_c", "gradient"])
def test_cross_entropy_training_fits_a_batch(curvature):
    model = _mlp(3)
    x, y = torch.randn(32, 3, 4), torch.randint(0, 3, (32,))
    opt = GramGaussNewton(
        model, alpha=1.0, loss="cross_entropy", curvature=curvature, adaptive_damping=True, lam=1.0, momentum=0.0
    )
    first = float(opt.step(lambda: (model(x), y)))
    for _ in range(15):
        last = float(opt.step(lambda: (model(x), y)))
    assert last < 1e-3 * first


B, K = 4, 3
BAD = [
    ("label out of range", lambda: torch.tensor([0, 1, 3, 2]), ValueError, "in \\[0, 3\\)"),
    ("negative label", lambda: torch.tensor([0, -1, 2, 2]), ValueError, "in \\[0, 3\\)"),
    ("float labels", lambda: torch.tensor([0.0, 1.0, 2.0, 1.0]), TypeError, "integer"),
    ("labels (b, 1)", lambda: torch.zeros(B, 1, dtype=torch.long), ValueError, "shape"),
    ("too few labels", lambda: torch.zeros(B - 1, dtype=torch.long), ValueError, "3 labels for 4 samples"),
    ("probabilities (b, k+1)", lambda: torch.full((B, K + 1), 0.25), ValueError, "shape"),
    ("probabilities not summing to 1", lambda: torch.full((B, K), 0.5), ValueError, "summing to 1"),
    ("negative probabilities", lambda: torch.tensor([[1.5, -0.5, 0.0]] * B), ValueError, "non-negative"),
    ("NaN probabilities", lambda: torch.full((B, K), float("nan")), ValueError, "NaN"),
]


@pytest.mark.parametrize("what,labels,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_labels_raise_and_change_nothing(what, labels, error, match):
    model = _mlp(K)
    x = torch.randn(B, 3, 4)
    opt = GramGaussNewton(model, loss="cross_entropy", adaptive_damping=True, lam=1.0, momentum=0.0)
    start, alpha = flat_params(model), opt.param_groups[0]["alpha"]
    with pytest.raises(error, match=match) as info:
        opt.step(lambda: (model(x), labels()))
    assert not isinstance(info.value, NonFiniteError)  # bad targets are bad input, not a diverged model
    assert torch.equal(flat_params(model), start) and opt.state_dict()["state"] == {}
    assert opt.param_groups[0]["alpha"] == alpha


@pytest.mark.parametrize(
    "what,closure_value,error,match",
    [
        ("NaN logits", lambda m, x: (m(x) * float("nan"), torch.zeros(B, dtype=torch.long)), NonFiniteError, "NaN"),
        ("residuals, not a pair", lambda m, x: m(x), TypeError, "pair"),
        ("logits (b,)", lambda m, x: (m(x)[:, 0], torch.zeros(B, dtype=torch.long)), ValueError, "shape"),
        ("integer logits", lambda m, x: (m(x).long(), torch.zeros(B, dtype=torch.long)), TypeError, "floating"),
    ],
)
def test_bad_logits_raise_and_change_nothing(what, closure_value, error, match):
    model = _mlp(K)
    x = torch.randn(B, 3, 4)
    opt = GramGaussNewton(model, loss="cross_entropy", lam=1.0, adaptive_damping=False, momentum=0.0)
    start = flat_params(model)
    with pytest.raises(error, match=match) as info:
        opt.step(lambda: closure_value(model, x))
    assert type(info.value) is error  # NaN logits: a diverged model (NonFiniteError), not a ValueError of the input
    assert torch.equal(flat_params(model), start) and opt.state_dict()["state"] == {}


@cpu_only("torch.autocast('cpu') leaves a GPU's tensors alone")
@pytest.mark.parametrize("curvature", ["gradient", "top_c", "exact"])
def test_autocast_logits_are_widened_to_the_parameters_precision(curvature: str) -> None:
    """Logits from an autocast forward (bfloat16, of a float32 model) crashed the step
    (``linalg_eigh_cpu`` has no bfloat16 kernel) and would have formed the curvature in 8 bits;
    they are widened to the parameters' float32 first: three steps with the defaults (the gain
    ratio re-evaluates the loss) bit for bit those of a closure that widens them itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    x, labels = torch.randn(8, 3), torch.randint(0, 4, (8,))

    def narrow() -> tuple[Tensor, Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x), labels

    def wide() -> tuple[Tensor, Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return twin(x).float(), labels

    options = dict(loss="cross_entropy", curvature=curvature)
    opt, reference = GramGaussNewton(model, **options), GramGaussNewton(twin, **options)
    for _ in range(3):
        assert_same_run(opt.step(narrow), reference.step(wide))
        assert_same_run(flat_params(model), flat_params(twin))


def test_bad_options_are_refused():
    model = _mlp(K)
    with pytest.raises(ValueError, match="Invalid loss"):
        GramGaussNewton(model, loss="hinge", lam=1.0, adaptive_damping=False, momentum=0.0)
    with pytest.raises(ValueError, match="Invalid curvature"):
        GramGaussNewton(
            model, loss="cross_entropy", curvature="diagonal", lam=1.0, adaptive_damping=False, momentum=0.0
        )
    with pytest.raises(ValueError, match="Invalid top_c"):
        GramGaussNewton(
            model, loss="cross_entropy", curvature="top_c", top_c=-1, lam=1.0, adaptive_damping=False, momentum=0.0
        )
    with pytest.raises(ValueError, match="losses other than 'mse'"):
        GramGaussNewton(model, curvature="gradient", lam=1.0, adaptive_damping=False, momentum=0.0)
    assert GramGaussNewton(model, lam=1.0, adaptive_damping=False, momentum=0.0).curvature == "exact"
    assert (
        GramGaussNewton(model, loss="cross_entropy", lam=1.0, adaptive_damping=False, momentum=0.0).curvature
        == "gradient"
    )


def test_underflowing_softmax_gives_a_finite_step():
    """Logit gaps of 1e3 underflow the softmax to 0 in float32: the probability floor keeps ``u`` finite."""
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(1e3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = GramGaussNewton(
        model, alpha=1.0, loss="cross_entropy", curvature="exact", lam=1.0, adaptive_damping=False, momentum=0.0
    )
    opt.step(lambda: (model(x), y))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
