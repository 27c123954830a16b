"""Model surgery that makes a network usable with Gram-Gauss-Newton."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (at least 1).

    GroupNorm needs ``channels % groups == 0``; rounding to a divisor avoids both invalid
    counts and the silent ``GroupNorm(C, C)``-for-small-``C`` mistakes of a fixed rule.
    """
    if channels < 1 or groups < 1:
        raise ValueError(f"channels and groups must be positive, got channels={channels}, groups={groups}")
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


def convert_batchnorm(model: nn.Module, groups: int = 8) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d, SyncBatchNorm) in ``model`` by GroupNorm, in place.

    BatchNorm in training mode couples the samples of a batch, which the per-sample Gram matrix
    cannot express; GroupNorm normalises each sample on its own. Each replacement has
    :func:`group_count` ``(C, groups)`` groups, the same ``eps``, and the BatchNorm's affine
    parameters copied (so a pretrained scale and shift are kept, frozen ones frozen). A BatchNorm
    used in several places becomes one GroupNorm used there. Running statistics are dropped.
    A ``BatchNorm1d`` whose GroupNorm gets one channel per group is converted with a warning: on
    ``(b, C)`` inputs (features, not sequences) each group is then one number, and the layer's
    output is its bias alone, whatever the input (``nn.LayerNorm(C)`` is the per-sample norm there).

    Args:
        model: the network; a bare BatchNorm module is replaced and returned.
        groups: the wanted number of groups per layer (paper: 8).

    Returns:
        ``model`` itself, or the new GroupNorm when ``model`` was a BatchNorm.

    Raises:
        ValueError: ``groups`` is not a positive int, or a lazy BatchNorm has not run yet (its
            channel count is unknown); nothing is changed.
    """
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}; nothing was changed")
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(
                f"{name or 'model'} is a lazy BatchNorm whose channel count is not known yet: run one forward "
                "pass first; nothing was changed"
            )
    return _convert(model, groups)


def _convert(model: nn.Module, groups: int) -> nn.Module:
    """:func:`convert_batchnorm` once its arguments are checked. Every use of a BatchNorm is
    replaced (``named_children`` skips a module's second use in one parent), all uses of one
    BatchNorm by one GroupNorm, its parameters shared there as before."""
    if isinstance(model, _BatchNorm):
        return _group_norm_like(model, groups)
    replacements: dict[int, nn.GroupNorm] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, _BatchNorm):
            if id(module) not in replacements:
                replacements[id(module)] = _group_norm_like(module, groups)
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, replacements[id(module)])
    return model


def _group_norm_like(bn: _BatchNorm, groups: int) -> nn.GroupNorm:
    channels = bn.num_features
    count = group_count(channels, groups)
    if isinstance(bn, nn.BatchNorm1d) and count == channels:
        warnings.warn(
            f"convert_batchnorm: BatchNorm1d({channels}) becomes GroupNorm({count}, {channels}), one channel per "
            "group: on (b, C) inputs its output is its bias whatever the input; pass fewer groups, or use "
            f"nn.LayerNorm({channels}) for features",
            stacklevel=4,  # the caller of convert_batchnorm
        )
    gn = nn.GroupNorm(count, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        gn = gn.to(bn.weight)
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        # a frozen scale or shift stays frozen: the optimizer trains what requires grad
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    return gn
