"""A plain multilayer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .registry import check_sizes, register_model

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (``tanh``, ``relu``, ``gelu``, ``softplus``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; available: {sorted(ACTIVATIONS)}") from None


@register_model("mlp")
def mlp(in_channels: int, num_outputs: int = 1, hidden: Sequence[int] = (256, 256), act: str = "tanh") -> nn.Module:
    """MLP ``in_channels -> hidden... -> num_outputs``; inputs of any shape are flattened to ``(b, in_channels)``.

    Raises ``ValueError`` for a size that is not a positive integer.
    """
    check_sizes(in_channels=in_channels, num_outputs=num_outputs, **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels
    for h in hidden:
        layers += [nn.Linear(width, h), activation(act)]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)
