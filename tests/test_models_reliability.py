"""The lab's models against their definitions and bad input (rows of "The lab's models" in
docs/reliability.md): Fixup ResNets against the official block (hongyi-zhang/Fixup,
``cifar/models/fixup_resnet_cifar.py``) with every scalar away from its initial value, the
two-layer network's per-sample Jacobian and Gram against the closed form of the theory, group
counts, seeded initialisation, and builder arguments that built a broken model or failed deep in
torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gramnewton.convert import group_count
from gramnewton.lab.models import ResNet, get_model, list_models

FLAT = ("mlp", "two_layer")


def official_fixup_forward(model: ResNet, x: Tensor) -> Tensor:
    """``FixupResNet.forward`` of the official code on ``model``'s parameters: the scalar bias
    ``bias1a`` enters the branch and the downsampling shortcut, never the identity shortcut."""
    out = F.relu(F.conv2d(x, model.conv1.weight, padding=1) + model.bias1.bias)
    for block in model.blocks:
        stride = block.conv1.stride
        branch = F.conv2d(out + block.bias1a.bias, block.conv1.weight, stride=stride, padding=1)
        branch = F.relu(branch + block.bias1b.bias)
        branch = F.conv2d(branch + block.bias2a.bias, block.conv2.weight, padding=1)
        branch = branch * block.scale.scale + block.bias2b.bias
        if stride != (1, 1):  # AvgPool2d(1, stride) and the channels doubled with zeros
            identity = (out + block.bias1a.bias)[:, :, :: stride[0], :: stride[1]]
            identity = torch.cat((identity, torch.zeros_like(identity)), 1)
        else:
            identity = out
        out = F.relu(branch + identity)
    out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
    return model.fc(out + model.bias2.bias)


@pytest.mark.parametrize("name", ["resnet8_fixup", "resnet20_fixup"])
def test_fixup_network_is_the_official_one_off_its_initialisation(name):
    """Every weight and scalar drawn at random (at Fixup's initialisation the scalars are 0 and 1
    and the zero layers hide where a bias enters), float64: the official forward to round-off."""
    torch.manual_seed(0)
    model = get_model(name, in_channels=3, num_outputs=2).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.numel() == 1 else 0.1))
    x = torch.randn(3, 3, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(model(x), official_fixup_forward(model, x), rtol=1e-12, atol=1e-12)


def test_fixup_initialisation_follows_the_formula_exactly(monkeypatch):
    """Fixup's rules on a seeded build: ``conv2`` of each branch and the head zero, the scalars 0
    and 1, each ``conv1`` exactly ``L^(-1/2)`` times the He (``fan_out``) draw that the same seed
    gives without Fixup's rescaling (``L`` = 3 stages x blocks), the stem not rescaled."""
    for depth, branches in ((8, 3), (20, 9)):
        torch.manual_seed(4)
        fixup = get_model(f"resnet{depth}_fixup")
        with monkeypatch.context() as patch:
            patch.setattr(ResNet, "fixup_init", lambda self: None)
            torch.manual_seed(4)
            plain = get_model(f"resnet{depth}_fixup")
        assert len(fixup.blocks) == branches
        for block, he in zip(fixup.blocks, plain.blocks):
            assert torch.equal(block.conv1.weight, he.conv1.weight * branches**-0.5)
            assert he.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (he.conv1.out_channels * 9)), rel=0.2)
            assert torch.count_nonzero(block.conv2.weight) == 0
            for bias in (block.bias1a, block.bias1b, block.bias2a, block.bias2b):
                assert torch.equal(bias.bias, torch.zeros(1))
            assert torch.equal(block.scale.scale, torch.ones(1))
        assert torch.equal(fixup.conv1.weight, plain.conv1.weight)
        assert torch.count_nonzero(fixup.fc.weight) == 0 and torch.count_nonzero(fixup.fc.bias) == 0


def test_parameter_counts_the_docs_state():
    """docs/convergence.md: resnet8_fixup on 1-channel images with one output has 73,954 parameters,
    55,367 of them in the last stage and the head; docs/performance.md: ResNet-32 (Fixup, RGB, one
    output) 461,374, the paper's ~0.46M."""

    def count(model: nn.Module, prefixes: tuple[str, ...] = ("",)) -> int:
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))

    resnet8 = get_model("resnet8_fixup", in_channels=1, num_outputs=1)
    assert count(resnet8) == 73_954
    assert count(resnet8, ("blocks.2.", "bias2", "fc.")) == 55_367
    assert count(get_model("resnet32_fixup", in_channels=3, num_outputs=1)) == 461_374


@pytest.mark.parametrize("groups, counts", [(1, (1, 1, 1)), (3, (2, 2, 2)), (8, (8, 8, 8)), (32, (16, 32, 32))])
def test_groupnorm_resnet_has_the_documented_group_counts(groups, counts):
    """Each GroupNorm of ``C`` channels gets ``group_count(C, groups)`` groups (the largest divisor
    of ``C`` at most ``groups``), the rule of ``convert_batchnorm``; ``groups=3`` raised torch's
    ``num_channels (16) must be divisible by num_groups (3)``."""
    norms = [m for m in get_model("resnet8_gn", groups=groups).modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 7
    assert all(m.num_groups == group_count(m.num_channels, groups) for m in norms)
    assert {m.num_channels: m.num_groups for m in norms} == dict(zip((16, 32, 64), counts))


def test_default_groupnorm_resnet_has_8_groups_everywhere():
    assert {m.num_groups for m in get_model("resnet20_gn").modules() if isinstance(m, nn.GroupNorm)} == {8}


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("two_layer", {"in_channels": 3, "width": 0}, "width must be a positive integer, got 0"),
        ("two_layer", {"in_channels": 3, "width": -4}, "width must be a positive integer, got -4"),
        ("two_layer", {"in_channels": 3, "width": 4.5}, "width must be a positive integer, got 4.5"),
        ("two_layer", {"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ("two_layer", {"in_channels": 3, "num_outputs": 0}, "num_outputs must be a positive integer, got 0"),
        ("mlp", {"in_channels": 3, "hidden": [8, 0]}, r"hidden\[1\] must be a positive integer, got 0"),
        ("mlp", {"in_channels": 3, "hidden": [-5]}, r"hidden\[0\] must be a positive integer, got -5"),
        ("mlp", {"in_channels": -3}, "in_channels must be a positive integer, got -3"),
        ("mlp", {"in_channels": 3, "num_outputs": 0}, "num_outputs must be a positive integer, got 0"),
        ("resnet8_fixup", {"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ("resnet8_fixup", {"in_channels": -1}, "in_channels must be a positive integer, got -1"),
        ("resnet8_fixup", {"in_channels": True}, "in_channels must be a positive integer, got True"),
        ("resnet8_fixup", {"num_outputs": 0}, "num_outputs must be a positive integer, got 0"),
        ("resnet8_gn", {"groups": 0}, "groups must be a positive integer, got 0"),
        ("resnet8_gn", {"groups": -2}, "groups must be a positive integer, got -2"),
        ("resnet8_gn", {"groups": 2.5}, "groups must be a positive integer, got 2.5"),
        ("resnet8_fixup", {"groups": 4}, "groups=4 is for the GroupNorm ResNets .*'fixup'"),
        ("resnet32_bn", {"groups": 8}, "groups=8 is for the GroupNorm ResNets .*'bn'"),
    ],
)
def test_bad_builder_arguments_are_refused_in_one_line(name, kwargs, match):
    """Each was accepted (a width-0 network: NaN outputs, 0/0; a constant MLP; a ``GroupNorm(-2, 16)``;
    ``groups`` silently unused by Fixup and BatchNorm) or failed in torch
    (``Trying to create tensor with negative dimension``, ``integer modulo by zero``)."""
    with pytest.raises(ValueError, match=match) as error:
        get_model(name, **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("blocks", [0, -1, 1.5])
def test_resnet_needs_a_block_per_stage(blocks):
    """``ResNet(0)`` raised ``ZeroDivisionError`` (``0 ** -0.5``), ``ResNet(-1)`` built a network
    without blocks."""
    with pytest.raises(ValueError, match=f"blocks_per_stage must be a positive integer, got {blocks}"):
        ResNet(blocks)


def test_unknown_model_names_the_closest():
    with pytest.raises(ValueError, match="unknown model 'resnet_8_fixup' \\(did you mean resnet8_fixup\\?\\)"):
        get_model("resnet_8_fixup")


@pytest.mark.parametrize("act", ["softplus", "tanh", "relu"])
def test_two_layer_jacobian_and_gram_are_the_closed_form(act):
    """Row ``i`` of ``J`` (``jacrev``, float64) is ``(1/sqrt(M)) a_r sigma'(w_r . x_i) x_i`` for
    each neuron ``r``, and ``G = J J^T`` the theory's ``(1/M) sum_r sigma' sigma' (x_i . x_j)``
    (``a_r^2 = 1``): only ``W`` moves, ``a`` is a fixed buffer, and the output is scaled by
    ``1/sqrt(M)``."""
    torch.manual_seed(1)
    width, d, n = 7, 4, 5
    model = get_model("two_layer", in_channels=d, width=width, act=act).double()
    x = torch.randn(n, d, dtype=torch.float64)
    weight = model.hidden.weight.detach()
    jac = torch.func.jacrev(lambda w: torch.func.functional_call(model, {"hidden.weight": w}, (x,)))(weight)
    jac = jac.reshape(n, width * d)
    z = (x @ weight.T).requires_grad_(True)
    (slopes,) = torch.autograd.grad(model.act(z).sum(), z)  # (n, M)
    a = model.a[:, 0]
    closed = (a * slopes / math.sqrt(width))[:, :, None] * x[:, None, :]  # (n, M, d)
    torch.testing.assert_close(jac, closed.reshape(n, -1), rtol=1e-13, atol=1e-15)
    gram = (slopes @ slopes.T / width) * (x @ x.T)
    torch.testing.assert_close(jac @ jac.T, gram, rtol=1e-13, atol=1e-15)
    assert [name for name, p in model.named_parameters()] == ["hidden.weight"]


@pytest.mark.parametrize("name", sorted(list_models()))
def test_initialisation_is_seeded_and_round_trips(name, tmp_path):
    """The same seed builds the same model bit for bit (the buffer ``a`` too), another seed another
    one; the state_dict saved and loaded with ``weights_only=True`` gives the same outputs."""
    kwargs = {"in_channels": 3 * 6 * 6 if name in FLAT else 3, "num_outputs": 2}
    if name == "two_layer":
        kwargs["width"] = 16

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return get_model(name, **kwargs).eval()

    first, again, other = build(3), build(3), build(4)
    state = first.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    torch.save(state, tmp_path / "model.pt")
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(other(x), first(x))


def test_ggn_on_a_batchnorm_resnet_is_refused_before_the_run_folder_changes(tmp_path):
    """``resnet*_bn`` in training mode with GGN: the optimizer's clear error, and no run folder (it
    was written with the epoch-0 row, a run that can never take a step)."""
    from test_experiments import tiny_config

    from gramnewton.lab.experiments.config import load_config
    from gramnewton.lab.experiments.runner import run_experiment

    config = load_config(tiny_config(tmp_path, "ggn"), ['model.name="resnet8_bn"', "model.kwargs={}"])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="norm1 is BatchNorm2d in training mode: .* Put it in eval mode"):
        run_experiment(config, out)
    assert not out.exists()
