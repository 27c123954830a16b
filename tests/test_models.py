"""Models: registry, parameter counts, initialisation, shapes, no in-place ops, one GGN step each."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gramnewton import GramGaussNewton
from gramnewton.lab.models import ResNet, ScalarBias, ScalarScale, TwoLayerNet, get_model, list_models, register_model

SIZES = (8, 28, 32, 64)
RESNETS = [f"resnet{d}_{n}" for d in (8, 20, 32) for n in ("fixup", "gn", "bn")]
FLAT_MODELS = ("two_layer", "mlp")  # take the flattened input dimension as in_channels


def build(name: str, channels: int, size: int, num_outputs: int = 1) -> nn.Module:
    torch.manual_seed(0)
    in_channels = channels * size * size if name in FLAT_MODELS else channels
    kwargs = {"width": 64} if name == "two_layer" else {}
    return get_model(name, in_channels=in_channels, num_outputs=num_outputs, **kwargs)


def expected_resnet_params(depth: int, in_channels: int, num_outputs: int, norm: str) -> int:
    """Count from the architecture: 3x3 convolutions without bias, option-A shortcuts, a linear head."""
    n = (depth - 2) // 6
    total, cin = 9 * in_channels * 16, 16
    per_norm = 2 * 16  # affine weight and bias after the stem
    for cout in (16, 32, 64):
        for _ in range(n):
            total += 9 * cin * cout + 9 * cout * cout
            per_norm += 2 * (2 * cout)
            cin = cout
    total += 64 * num_outputs + num_outputs
    if norm == "fixup":
        return total + 5 * 3 * n + 2  # 4 scalar biases and 1 multiplier per branch; stem and head biases
    return total + per_norm


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model() -> None:
    assert set(list_models()) == set(RESNETS) | set(FLAT_MODELS)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet32_fixup")(lambda **kw: nn.Identity())
    assert isinstance(get_model("resnet32_fixup"), ResNet)  # the original builder survives


def test_unknown_model_raises() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        get_model("resnet33")


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_parameter_count(name: str) -> None:
    depth, norm = int(name[6:].split("_")[0]), name.split("_")[1]
    for in_channels, num_outputs in ((3, 1), (1, 10)):
        model = get_model(name, in_channels=in_channels, num_outputs=num_outputs)
        assert n_params(model) == expected_resnet_params(depth, in_channels, num_outputs, norm)


def test_resnet32_has_the_papers_046m_parameters() -> None:
    for norm in ("fixup", "gn", "bn"):
        assert 0.45e6 < n_params(get_model(f"resnet32_{norm}")) < 0.47e6


def test_fixup_initialisation() -> None:
    torch.manual_seed(0)
    model = get_model("resnet32_fixup")
    blocks = list(model.blocks)
    num_branches = len(blocks)
    assert num_branches == 15
    # Final layer and the last convolution of every branch start at zero.
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    for block in blocks:
        assert torch.count_nonzero(block.conv2.weight) == 0
    # Scalars are modules of their own (the engine sees them): biases 0, multipliers 1.
    biases = [m for m in model.modules() if isinstance(m, ScalarBias)]
    scales = [m for m in model.modules() if isinstance(m, ScalarScale)]
    assert len(biases) == 4 * num_branches + 2 and len(scales) == num_branches
    assert all(m.bias.item() == 0.0 for m in biases) and all(m.scale.item() == 1.0 for m in scales)
    # Other branch convolutions: He (fan_out) scaled by L^(-1/(2m-2)) with m = 2.
    for cout in (16, 32, 64):
        weights = torch.cat([b.conv1.weight.flatten() for b in blocks if b.conv1.out_channels == cout])
        expected = math.sqrt(2.0 / (cout * 9)) * num_branches ** (-0.5)
        assert weights.std().item() == pytest.approx(expected, rel=0.05)
        assert abs(weights.mean().item()) < 0.05 * expected
    stem = model.conv1.weight
    assert stem.std().item() == pytest.approx(math.sqrt(2.0 / (16 * 9)), rel=0.15)
    # A zero head makes the network output exactly zero at initialisation.
    assert torch.count_nonzero(model(torch.randn(2, 3, 8, 8))) == 0


@pytest.mark.parametrize("norm, cls", [("gn", nn.GroupNorm), ("bn", nn.BatchNorm2d)])
def test_normalised_resnets_use_their_norm(norm: str, cls: type) -> None:
    model = get_model(f"resnet20_{norm}")
    norms = [m for m in model.modules() if isinstance(m, cls)]
    assert len(norms) == 1 + 2 * 9
    if norm == "gn":
        assert all(m.num_groups == 8 for m in norms)
    assert not any(isinstance(m, (ScalarBias, ScalarScale)) for m in model.modules())


def test_two_layer_initialisation_and_formula() -> None:
    torch.manual_seed(0)
    d, width = 20, 4096
    model = get_model("two_layer", in_channels=d, width=width)
    assert isinstance(model, TwoLayerNet)
    # Only W trains; a is a fixed buffer uniform on {-1, +1}.
    assert [name for name, _ in model.named_parameters()] == ["hidden.weight"]
    assert "a" in dict(model.named_buffers())
    a = model.a
    assert a.shape == (width, 1) and set(a.unique().tolist()) == {-1.0, 1.0}
    assert abs(a.mean().item()) < 0.05
    w = model.hidden.weight
    assert w.shape == (width, d)
    assert w.mean().item() == pytest.approx(0.0, abs=0.02) and w.std().item() == pytest.approx(1.0, rel=0.02)
    x = torch.randn(5, d)
    manual = (torch.nn.functional.softplus(x @ w.T) @ a) / math.sqrt(width)
    torch.testing.assert_close(model(x), manual)


@pytest.mark.parametrize("act, fn", [("tanh", torch.tanh), ("relu", torch.relu), ("gelu", torch.nn.functional.gelu)])
def test_two_layer_activations(act: str, fn) -> None:
    torch.manual_seed(0)
    model = get_model("two_layer", in_channels=3, width=16, act=act, num_outputs=2)
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), fn(x @ model.hidden.weight.T) @ model.a / 4.0)


def test_unknown_activation_raises() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        get_model("two_layer", in_channels=3, act="swish")


@pytest.mark.parametrize("name", sorted(set(RESNETS) | set(FLAT_MODELS)))
def test_output_shapes_at_every_input_size(name: str) -> None:
    # Channel and output counts alternate across sizes so each combination is seen once.
    for size, (channels, num_outputs) in zip(SIZES, ((1, 1), (3, 4), (1, 4), (3, 1))):
        model = build(name, channels, size, num_outputs).eval()
        with torch.no_grad():
            out = model(torch.randn(2, channels, size, size))
        assert out.shape == (2, num_outputs), (name, size, channels)


class InPlaceRecorder(TorchDispatchMode):
    """Records every ATen operation that mutates one of its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.mutating: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            self.mutating.add(str(func))
        return func(*args, **(kwargs or {}))


def test_inplace_recorder_catches_inplace_ops() -> None:
    with InPlaceRecorder() as recorder:
        nn.ReLU(inplace=True)(torch.randn(3))
    assert recorder.mutating


@pytest.mark.parametrize("name", ["resnet8_fixup", "resnet8_gn", "resnet8_bn", "two_layer", "mlp"])
def test_forward_has_no_inplace_ops(name: str) -> None:
    model = build(name, 3, 8)
    # BatchNorm updates its running statistics in place in training mode; in eval mode it must not.
    model.train(name != "resnet8_bn")
    x = torch.randn(2, 3, 8, 8)
    with InPlaceRecorder() as recorder:
        model(x)
    assert recorder.mutating == set()
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def ggn_step(model: nn.Module, channels: int, size: int) -> tuple[float, float]:
    """One reference-engine GGN step on a tiny batch; returns the losses before and after."""
    torch.manual_seed(1)
    x, y = torch.randn(3, channels, size, size), torch.randn(3)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, engine="reference", adaptive_damping=False, momentum=0.0)

    def closure() -> torch.Tensor:
        return model(x).squeeze(1) - y

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    with torch.no_grad():
        after = closure().pow(2).mean().item()
    assert math.isfinite(loss.item()) and math.isfinite(after)
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    return loss.item(), after


GGN_CASES = (
    [(f"resnet8_{n}", s) for n in ("fixup", "gn") for s in SIZES]
    + [(f"resnet32_{n}", 8) for n in ("fixup", "gn")]
    + [(m, s) for m in FLAT_MODELS for s in SIZES]
)


@pytest.mark.parametrize("name, size", GGN_CASES)
def test_one_ggn_step(name: str, size: int) -> None:
    ggn_step(build(name, 3, size), 3, size)


def test_ggn_step_fits_the_batch_on_the_two_layer_net() -> None:
    # The theory's model: with small damping one step nearly solves the linearised problem.
    model = get_model("two_layer", in_channels=3 * 8 * 8, width=512)
    before, after = ggn_step(model, 3, 8)
    assert after < 0.1 * before


@pytest.mark.parametrize("name, size", [("resnet8_bn", s) for s in SIZES] + [("resnet32_bn", 8)])
def test_batchnorm_refused_in_training_mode_and_accepted_in_eval(name: str, size: int) -> None:
    model = build(name, 3, size).train()
    x = torch.randn(3, 3, size, size)
    opt = GramGaussNewton(model, lam=1.0, alpha=0.1, engine="reference", adaptive_damping=False, momentum=0.0)
    with pytest.raises(ValueError, match="BatchNorm"):
        opt.step(lambda: model(x).squeeze(1))
    ggn_step(model.eval(), 3, size)
