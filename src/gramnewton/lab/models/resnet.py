"""CIFAR-style ResNets (He et al. 2016): 3 stages of 16/32/64 channels, depth 6n+2.

Three normalisations:
- ``fixup``: no normalisation, Fixup initialisation (Zhang et al. 2019): scalar biases before
  each convolution and activation, a scalar multiplier per branch, the last convolution of each
  branch and the final layer zero-initialised, the other branch convolutions scaled by
  ``L^(-1/(2m-2))`` (``L`` residual branches, ``m = 2`` layers per branch); the blocks are those
  of the official code (hongyi-zhang/Fixup, ``cifar/models/fixup_resnet_cifar.py``).
- ``gn``: GroupNorm after each convolution, ``group_count(C, groups)`` groups for ``C`` channels
  (:func:`gramnewton.convert.group_count`; ``groups = 8`` by default: 8 in every layer).
- ``bn``: BatchNorm (first-order baselines only; GGN refuses it in training mode).

The shortcut of a downsampling block is the parameter-free "option A" of the CIFAR ResNets
(stride-2 subsampling, zero-padded channels), so ResNet-32 has the paper's ~0.46M parameters.
No in-place operations: they break hooks and ``torch.func``. Any input size works (global
average pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...convert import group_count
from ...nn import ScalarBias, ScalarScale
from .registry import check_sizes, register_model

STAGE_WIDTHS = (16, 32, 64)
LAYERS_PER_BRANCH = 2  # Fixup's m: two convolutions per residual branch


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels to ``cout``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    return PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()


class FixupBlock(nn.Module):
    """``relu(b2b + s * conv2(b2a + relu(b1b + conv1(b1a + x))) + x)``; a downsampling block's
    shortcut is ``shortcut(b1a + x)`` instead of ``x``, as in the official code."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bias1a, self.conv1, self.bias1b = ScalarBias(), conv3x3(cin, cout, stride), ScalarBias()
        self.bias2a, self.conv2, self.scale, self.bias2b = (
            ScalarBias(),
            conv3x3(cout, cout),
            ScalarScale(),
            ScalarBias(),
        )
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        biased = self.bias1a(x)
        out = F.relu(self.bias1b(self.conv1(biased)))
        out = self.bias2b(self.scale(self.conv2(self.bias2a(out))))
        # b1a is a bias before conv1: the identity shortcut bypasses it (the official block's
        # identity is x), the downsampling shortcut takes the biased input as the official one does
        identity = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(biased)
        return F.relu(out + identity)


class NormBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(cin, cout, stride), norm(cout)
        self.conv2, self.norm2 = conv3x3(cout, cout), norm(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet of ``6 * blocks_per_stage + 2`` layers; input ``(b, C, H, W)``, output ``(b, num_outputs)``.

    ``groups`` (``norm="gn"`` only; 8 when None) is the wanted number of groups of each GroupNorm.
    Raises ``ValueError`` for a size that is not a positive integer, an unknown ``norm``, or
    ``groups`` given to another norm (it would be ignored).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        in_channels: int = 3,
        num_outputs: int = 1,
        norm: str = "fixup",
        groups: int | None = None,
    ):
        if norm not in ("fixup", "gn", "bn"):
            raise ValueError(f"unknown norm {norm!r}; expected 'fixup', 'gn' or 'bn'")
        if norm != "gn" and groups is not None:
            raise ValueError(f"groups={groups!r} is for the GroupNorm ResNets (norm 'gn'); this one has norm {norm!r}")
        groups = 8 if groups is None else groups
        check_sizes(blocks_per_stage=blocks_per_stage, in_channels=in_channels, num_outputs=num_outputs, groups=groups)
        super().__init__()
        self.norm = norm
        self.num_branches = 3 * blocks_per_stage
        self.conv1 = conv3x3(in_channels, STAGE_WIDTHS[0])
        if norm == "fixup":
            self.bias1 = ScalarBias()
        else:
            self.norm1 = self._norm_layer(norm, groups)(STAGE_WIDTHS[0])
        blocks: list[nn.Module] = []
        cin = STAGE_WIDTHS[0]
        for stage, cout in enumerate(STAGE_WIDTHS):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                if norm == "fixup":
                    blocks.append(FixupBlock(cin, cout, stride))
                else:
                    blocks.append(NormBlock(cin, cout, stride, self._norm_layer(norm, groups)))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        if norm == "fixup":
            self.bias2 = ScalarBias()
        self.fc = nn.Linear(cin, num_outputs)
        self.reset_parameters()

    @staticmethod
    def _norm_layer(norm: str, groups: int) -> Callable[[int], nn.Module]:
        if norm == "bn":
            return nn.BatchNorm2d
        return lambda channels: nn.GroupNorm(group_count(channels, groups), channels)

    def reset_parameters(self) -> None:
        """He initialisation (``fan_out``); for Fixup, the rescaled branches and zero-initialised layers."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.norm == "fixup":
            self.fixup_init()

    @torch.no_grad()
    def fixup_init(self) -> None:
        """Fixup rules 1-2 on top of He init: zero ``conv2`` of each branch and the final layer,
        scale the other branch convolution by ``L^(-1/(2m-2))``.

        The official code (hongyi-zhang/Fixup, ``fixup_resnet_cifar.py``) draws ``conv1`` with
        std ``sqrt(2 / (cout * 9)) * L^(-1/2)``, i.e. He ``fan_out`` rescaled, which this matches.
        """
        branch_scale = self.num_branches ** (-1.0 / (2 * LAYERS_PER_BRANCH - 2))
        for block in self.blocks:
            block.conv1.weight.mul_(branch_scale)
            nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = F.relu(self.bias1(out) if self.norm == "fixup" else self.norm1(out))
        out = self.blocks(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        if self.norm == "fixup":
            out = self.bias2(out)
        return self.fc(out)


def _register_resnets() -> None:
    for depth in (8, 20, 32):
        for norm in ("fixup", "gn", "bn"):

            def builder(
                in_channels: int = 3, num_outputs: int = 1, groups: int | None = None, _d: int = depth, _n: str = norm
            ) -> ResNet:
                return ResNet((_d - 2) // 6, in_channels=in_channels, num_outputs=num_outputs, norm=_n, groups=groups)

            builder.__doc__ = f"ResNet-{depth} ({norm}); see :class:`ResNet`."
            register_model(f"resnet{depth}_{norm}")(builder)


_register_resnets()
