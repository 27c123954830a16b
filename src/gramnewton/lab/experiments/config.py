"""Experiment configurations: TOML files (stdlib ``tomllib``) with dotted ``key=value`` overrides.

A configuration is a nested dict. Sections and keys (defaults in :data:`DEFAULTS`)::

    name = "afad-ggn-fixup"          # label of the run (figure legends)
    seed = 0                         # model init, data split and data order
    [model]      name = "resnet32_fixup"; kwargs = {}            # gramnewton.lab.models.get_model
    [data]       name = "afad-lite"; root = ""; kwargs = {}      # gramnewton.lab.data.get_dataset
                 train_subset = 0; test_subset = 0               # first n of a seeded permutation (0: all)
                 image_size = 0                                  # resize inputs to n x n (0: as loaded)
    [optimizer]  name = "ggn" | "sgd" | "adam" | "kfac"; other keys are its hyper-parameters
    [train]      batch_size = 128; epochs = 100; weight_decay = 1e-4; eval_every = 1; threads = 2
    [warm_start] run = ""            # run folder whose final checkpoint initialises the model

Overrides are ``section.key=value`` strings; ``value`` is parsed as a TOML value (``0.1``,
``true``, ``[1, 2]``, ``"text"``) and taken as a bare string when it is not one.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "name": "",
    "seed": 0,
    "model": {"name": "", "kwargs": {}},
    "data": {"name": "", "root": "", "kwargs": {}, "train_subset": 0, "test_subset": 0, "image_size": 0},
    "optimizer": {"name": ""},
    "train": {"batch_size": 128, "epochs": 1, "weight_decay": 1e-4, "eval_every": 1, "threads": 2},
    "warm_start": {"run": ""},
}
REQUIRED = ("model.name", "data.name", "optimizer.name")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a TOML config, fill in :data:`DEFAULTS`, apply ``overrides``; raise on missing keys."""
    with Path(path).open("rb") as f:
        raw = tomllib.load(f)
    return resolve(raw, overrides)


def resolve(raw: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``raw`` and then by ``overrides`` (see the module docstring)."""
    config = merge(DEFAULTS, raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(config, key, value)
    for key in REQUIRED:
        if not get_dotted(config, key):
            raise ValueError(f"config is missing {key}")
    return config


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of ``base`` with ``update`` merged in, tables recursively."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "kwargs":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"optimizer.alpha=0.1"`` -> ``("optimizer.alpha", 0.1)``."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.strip(), value


def get_dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key}: {part} is not a table")
    node[leaf] = value


def dumps(config: Mapping[str, Any]) -> str:
    """TOML text of a config: top-level scalars, then one table per section (inline sub-tables)."""
    scalars = [f"{k} = {_value(v)}" for k, v in config.items() if not isinstance(v, Mapping)]
    tables = [
        f"\n[{k}]\n" + "".join(f"{kk} = {_value(vv)}\n" for kk, vv in v.items())
        for k, v in config.items()
        if isinstance(v, Mapping)
    ]
    return "\n".join(scalars) + "\n" + "".join(tables)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
