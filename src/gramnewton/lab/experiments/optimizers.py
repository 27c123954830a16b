"""The one optimizer factory: ``{"name": "ggn" | "sgd" | "adam" | "kfac" | "lbfgs", **hyper}`` -> optimizer.

Hyper-parameters are passed through to the optimizer's constructor, so a new
``GramGaussNewton`` argument needs no change here; :func:`hyper_parameters` lists the accepted
names from the constructor's signature (the config layer uses it to refuse unknown keys). Only
what TOML cannot spell is converted: a list where the constructor's default is a tuple (Adam's
``betas``) becomes a tuple, a dtype name (``solve_dtype = "float64"``) the torch dtype.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ...optim import GramGaussNewton
from ..baselines import KFAC


@dataclass(frozen=True)
class OptimizerKind:
    """How to build one kind: its class, whether it takes the model (else ``model.parameters()``)
    as first argument, and defaults that differ from the class's own."""

    cls: type[Optimizer]
    takes_model: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerKind] = {
    "ggn": OptimizerKind(GramGaussNewton, takes_model=True),
    # the paper's SGD baseline uses momentum 0.9
    "sgd": OptimizerKind(torch.optim.SGD, takes_model=False, defaults={"momentum": 0.9}),
    "adam": OptimizerKind(torch.optim.Adam, takes_model=False),
    "kfac": OptimizerKind(KFAC, takes_model=True),
    # full-batch L-BFGS as users run it: a strong-Wolfe line search makes the learning rate moot
    "lbfgs": OptimizerKind(torch.optim.LBFGS, takes_model=False, defaults={"line_search_fn": "strong_wolfe"}),
}


# dtype names a config may give for a dtype argument (GGN's solve_dtype)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def hyper_parameters(name: str) -> list[str]:
    """The keyword arguments the optimizer ``name`` accepts (its constructor's, less the first)."""
    kind = _kind(name)
    return list(inspect.signature(kind.cls).parameters)[1:]


def takes_weight_decay(name: str) -> bool:
    """Whether the optimizer ``name`` has a ``weight_decay`` argument (L-BFGS has none)."""
    return "weight_decay" in hyper_parameters(name)


def build_optimizer(spec: Mapping[str, Any], model: nn.Module) -> Optimizer:
    """``spec["name"]``'s optimizer for ``model`` with the other keys of ``spec`` as keyword
    arguments (over :attr:`OptimizerKind.defaults`, TOML values converted as the module docstring
    says); the constructor validates their values.

    Raises:
        ValueError: an unknown ``name``, or a key the constructor does not take (one line, with
            the closest name: ``{"name": "ggn", "lamb": 8}`` asks "did you mean 'lam'?").
    """
    name = spec.get("name", "")
    kind = _kind(name)
    parameters = inspect.signature(kind.cls).parameters
    accepted = hyper_parameters(name)
    for key in spec:
        if key != "name" and key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; {name} takes {', '.join(accepted)}"
            raise ValueError(f"unknown {name} hyper-parameter {key!r}{hint}")
    hyper = {**kind.defaults, **{k: _from_toml(v, parameters.get(k)) for k, v in spec.items() if k != "name"}}
    return kind.cls(model if kind.takes_model else model.parameters(), **hyper)


def _from_toml(value: Any, parameter: inspect.Parameter | None) -> Any:
    """``value`` as the constructor ``parameter`` takes it: a tuple for a tuple default, a torch
    dtype for a dtype name given to a dtype argument; anything else unchanged."""
    if parameter is None:
        return value
    if isinstance(value, list) and isinstance(parameter.default, tuple):
        return tuple(value)
    if isinstance(value, str) and value in DTYPES and "dtype" in str(parameter.annotation):
        return DTYPES[value]
    return value


def _kind(name: str) -> OptimizerKind:
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
