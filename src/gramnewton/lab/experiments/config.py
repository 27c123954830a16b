"""Experiment configurations: TOML files (stdlib ``tomllib``) with dotted ``key=value`` overrides.

A configuration is a nested dict. Sections and keys (defaults in :data:`DEFAULTS`)::

    name = "afad-ggn-fixup"          # label of the run (figure legends)
    seed = 0                         # model init, data split and data order
    [model]      name = "resnet32_fixup"; kwargs = {}            # gramnewton.lab.models.get_model
    [data]       name = "afad-lite"; root = ""; kwargs = {}      # gramnewton.lab.data.get_dataset
                 train_subset = 0; test_subset = 0               # first n of a seeded permutation (0: all)
                 image_size = 0                                  # resize inputs to n x n (0: as loaded)
                 validation_fraction = 0.0                       # share of the training set held out
                 validation_fold = 0             # which of round(1 / validation_fraction) folds is
                                                 # held out (0: the share above; cross-validation)
    [optimizer]  name = "ggn" | "sgd" | "adam" | "kfac"; other keys are its hyper-parameters
                 adaptive_damping = {name = "gain_ratio", check_every = 4, min_alpha = 1.0}
                                                 # ggn: a damping rule with its number arguments
    [train]      batch_size = 128; epochs = 1; weight_decay = 1e-4; eval_every = 1; threads = 2
                 label_smoothing = 0.0           # classification: targets (1 - eps) onehot + eps / k, in [0, 1)
                 shift = 0                       # image data: random translations by up to shift pixels
                 seconds = 0.0                   # stop after the first epoch ending past it (0: none)
                 checkpoint_seconds = 10.0       # write checkpoint.pt, metrics.csv, best.pt at most
                                                 # this often (wall clock; 0: every epoch); the
                                                 # last epoch and an interrupt are always written
                 early_stopping_patience = 0     # stop after n evaluations without a lower
                                                 # validation loss (0: never)
                 keep_best = false               # save the best-validation model in best.pt
                 deterministic = false           # torch.use_deterministic_algorithms(True) for the
                                                 # run: no per-layer path timed, a seeded run
                                                 # repeats bit for bit (same machine and threads)
    [warm_start] run = ""            # run folder whose final checkpoint initialises the model

Overrides are ``section.key=value`` strings; ``value`` is parsed as a TOML value (``0.1``,
``true``, ``[1, 2]``, ``"text"``) and taken as a bare string when it is not one.

A resolved config is validated (:func:`validate`): unknown sections and keys are refused with the
closest valid name; the keys of ``[optimizer]`` are those its constructor accepts
(:func:`~gramnewton.lab.experiments.optimizers.hyper_parameters`), and those of ``model.kwargs``
and ``data.kwargs`` those of the model's and data set's builder, each of the type its default or
annotation names (:func:`_expected_type`; numbers finite, integers for integers, a list of the
default's length for a tuple, ``"float32"``/``"float64"`` for a dtype); the values' ranges are
checked by the constructor.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from ...damping import DAMPING_RULES, damping_rule
from ...metric import metric_from
from ..data.registry import DATASETS
from ..models.registry import MODELS
from ..registry import Registry
from .optimizers import DTYPES, OPTIMIZERS, hyper_parameters, takes_weight_decay

DEFAULTS: dict[str, Any] = {
    "name": "",
    "seed": 0,
    "model": {"name": "", "kwargs": {}},
    "data": {
        "name": "",
        "root": "",
        "kwargs": {},
        "train_subset": 0,
        "test_subset": 0,
        "image_size": 0,
        "validation_fraction": 0.0,
        "validation_fold": 0,
    },
    "optimizer": {"name": ""},
    "train": {
        "batch_size": 128,
        "epochs": 1,
        "weight_decay": 1e-4,
        "eval_every": 1,
        "threads": 2,
        "label_smoothing": 0.0,
        "shift": 0,
        "seconds": 0.0,
        "checkpoint_seconds": 10.0,
        "early_stopping_patience": 0,
        "keep_best": False,
        "deterministic": False,
    },
    "warm_start": {"run": ""},
}
REQUIRED = ("model.name", "data.name", "optimizer.name")
# The data order's and augmentation's generators are seeded with (seed * 100_003 + epoch) *
# 1_000_003 + batch (training.augment_generator), which torch needs below 2**64.
SEED_LIMIT = 10**8
# key -> (type, smallest value); NUMBERS accept ints and floats, never booleans
NUMBERS = (int, float)
RANGES: dict[str, tuple[type | tuple[type, ...], float | None]] = {
    "seed": (int, 0),
    "data.train_subset": (int, 0),
    "data.test_subset": (int, 0),
    "data.image_size": (int, 0),
    "train.batch_size": (int, 1),
    "train.epochs": (int, 1),
    "train.eval_every": (int, 1),
    "train.threads": (int, 1),
    "train.weight_decay": (NUMBERS, 0),
    "train.label_smoothing": (NUMBERS, 0),
    "train.shift": (int, 0),
    "train.seconds": (NUMBERS, 0),
    "train.checkpoint_seconds": (NUMBERS, 0),
    "train.early_stopping_patience": (int, 0),
    "train.keep_best": (bool, None),
    "train.deterministic": (bool, None),
    "data.validation_fraction": (NUMBERS, 0),
    "data.validation_fold": (int, 0),
    "name": (str, None),
    "model.name": (str, None),
    "data.name": (str, None),
    "data.root": (str, None),
    "optimizer.name": (str, None),
    "warm_start.run": (str, None),
    "model.kwargs": (dict, None),
    "data.kwargs": (dict, None),
}
# keys whose values must also stay below a bound
BELOW: dict[str, float] = {"train.label_smoothing": 1.0, "data.validation_fraction": 1.0, "seed": SEED_LIMIT}
# [train] weight_decay is passed to every optimizer; the same key under [optimizer] would clash
NOT_IN_OPTIMIZER = ("weight_decay",)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a TOML config, fill in :data:`DEFAULTS`, apply ``overrides``, :func:`validate` it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not UTF-8 TOML, or the config is not valid (one-line message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    except UnicodeDecodeError as error:  # tomllib decodes the bytes first; its message names no file
        line = error.object[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} is not valid TOML: byte {error.object[error.start]:#04x} on line {line} is not UTF-8 "
            "(save the file as UTF-8)"
        ) from None
    return resolve(raw, overrides)


def resolve(raw: Mapping[str, Any], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``DEFAULTS`` updated by ``raw`` and then by ``overrides`` (see the module docstring), validated."""
    config = merge(DEFAULTS, raw)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(config, key, value)
    validate(config)
    return config


def validate(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` (one line, naming the key) for a missing required key, an unknown
    section or key, or a value of the wrong type or out of range."""
    _check_names(config, DEFAULTS, "")  # first: `optimizer = "ggn"` is no table, not a missing optimizer.name
    for key in REQUIRED:
        if not get_dotted(config, key):
            raise ValueError(f"config is missing {key} (set it in the file or with --set {key}=...)")
    for key, (kind, low) in RANGES.items():
        value = get_dotted(config, key)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"{key} must be {_describe(kind)}, got {value!r}")
        if low is not None and not (math.isfinite(value) and value >= low):
            raise ValueError(f"{key} must be {_describe(kind)} >= {low:g}, got {value!r}")
        if key in BELOW and not value < BELOW[key]:
            raise ValueError(f"{key} must be {_describe(kind)} in [{low:g}, {_number(BELOW[key])}), got {value!r}")
    _check_validation(config)
    _check_optimizer(config["optimizer"])
    _check_weight_decay(config)
    _check_kwargs("model", config["model"], MODELS)
    _check_kwargs("data", config["data"], DATASETS)


def _number(value: float) -> str:
    """``100000000`` for an integer (not ``1e+08``), ``0.5`` for a float."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _check_weight_decay(config: Mapping[str, Any]) -> None:
    """``train.weight_decay`` is the optimizer's own; one without (L-BFGS) takes only 0."""
    name, decay = config["optimizer"]["name"], config["train"]["weight_decay"]
    if decay and not takes_weight_decay(name):
        raise ValueError(
            f"train.weight_decay = {decay:g} but {name} has no weight decay: "
            "set train.weight_decay = 0 (--set train.weight_decay=0)"
        )


# keyword arguments the set-up passes itself (setup.load_data): a kwargs key of that name clashes
SET_BY_SETUP = {"data": {"root": "data.root", "split": "the split (the run loads both)"}}


def _check_kwargs(section: str, table: Mapping[str, Any], registry: Registry) -> None:
    """``{section}.kwargs``: keyword arguments of ``registry``'s builder of ``{section}.name``, each
    of the type its default or annotation names. An unknown name is left to the set-up, which
    lists the known."""
    if table["name"] not in registry.names():
        return
    parameters = inspect.signature(registry.get(table["name"])).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # a builder taking **kwargs: any key may be right
    fixed = SET_BY_SETUP.get(section, {})
    accepted = [k for k in parameters if not k.startswith("_") and k not in fixed]  # _d, _n: fixed by the name
    prefix = f"{section}.kwargs"
    for key, value in table["kwargs"].items():
        if key in fixed:
            raise ValueError(f"{prefix}.{key} is not allowed: it is set by {fixed[key]}")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
            raise ValueError(
                f"unknown config key {prefix}.{key} for {table['name']}{hint}; "
                f"{table['name']} accepts {', '.join(accepted)}"
            )
        _check_value(f"{prefix}.{key}", value, parameters[key])


def _check_validation(config: Mapping[str, Any]) -> None:
    """The options that need a validation split only with one."""
    train = config["train"]
    for key, used in (
        ("early_stopping_patience", train["early_stopping_patience"] > 0),
        ("keep_best", train["keep_best"]),
    ):
        if used and config["data"]["validation_fraction"] == 0:
            raise ValueError(f"train.{key} needs a validation split: set data.validation_fraction (e.g. 0.1)")
    fraction, fold = config["data"]["validation_fraction"], config["data"]["validation_fold"]
    if fold and fraction == 0:
        raise ValueError("data.validation_fold needs a validation split: set data.validation_fraction (e.g. 0.2)")
    if fraction and fold >= validation_folds(fraction):
        raise ValueError(
            f"data.validation_fold = {fold} is out of range: data.validation_fraction = {fraction:g} gives "
            f"{validation_folds(fraction)} folds (0 to {validation_folds(fraction) - 1})"
        )


def validation_folds(fraction: float) -> int:
    """How many folds a validation share ``fraction`` gives: ``round(1 / fraction)`` (at least 1).
    Fold 0 is the share held out without folds; the others split the rest evenly
    (:func:`~gramnewton.lab.experiments.setup.validation_split`)."""
    return max(1, round(1 / fraction))


def _check_names(config: Mapping[str, Any], valid: Mapping[str, Any], prefix: str) -> None:
    for key, value in config.items():
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid: {', '.join(valid)}"
            raise ValueError(f"unknown config key {prefix}{key}{hint}")
        if isinstance(valid[key], Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"{prefix}{key} must be a table [{prefix}{key}], got {value!r}")
            if key not in ("kwargs", "optimizer"):  # their keys are the builder's or constructor's
                _check_names(value, valid[key], f"{prefix}{key}.")


def _check_optimizer(section: Mapping[str, Any]) -> None:
    """Keys of ``[optimizer]``: its constructor's keyword arguments, each of the type its default
    and annotation name (:func:`_expected_type`)."""
    name = section["name"]
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, list(OPTIMIZERS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown optimizer.name {name!r}{hint}; expected one of {', '.join(OPTIMIZERS)}")
    accepted = [k for k in hyper_parameters(name) if k not in NOT_IN_OPTIMIZER]
    parameters = inspect.signature(OPTIMIZERS[name].cls).parameters
    for key, value in section.items():
        if key == "name":
            continue
        if key in NOT_IN_OPTIMIZER:
            raise ValueError(f"optimizer.{key} is not allowed: set train.{key} instead")
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean optimizer.{close[0]}?)" if close else f"; {name} accepts {', '.join(accepted)}"
            raise ValueError(f"unknown config key optimizer.{key} for {name}{hint}")
        if key == "adaptive_damping" and isinstance(value, Mapping):
            _check_damping_table(value)
            continue
        if key == "metric":  # "auto", a name or a table {name = "second_moment", power = 0.5}: built once to check it
            try:
                metric_from(None if value == "auto" else value)
            except ValueError as error:
                raise ValueError(f"optimizer.metric: {error}") from None
            continue
        if key in BOOL_OR_STRING_KEYS:
            if not isinstance(value, BOOL_OR_STRING) or (isinstance(value, str) and value not in DAMPING_NAMES):
                default = parameters[key].default
                raise ValueError(
                    f"optimizer.{key} must be {_describe(BOOL_OR_STRING)} (default {default!r}), got {value!r}"
                )
            continue
        _check_value(f"optimizer.{key}", value, parameters[key])
        choices = CHOICES.get((name, key))
        if choices and value not in choices:
            raise ValueError(f"optimizer.{key} for {name} must be one of {', '.join(choices)}, got {value!r}")


# string arguments whose constructor accepts any string but only these work
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {("lbfgs", "line_search_fn"): ("strong_wolfe",)}


@dataclasses.dataclass(frozen=True)
class ListOf:
    """A TOML list (a tuple default, a ``Sequence[int]`` annotation) of ``element`` items,
    ``length`` of them (any number when None)."""

    element: type | tuple[type, ...]
    length: int | None = None


DTYPE = "dtype"  # a dtype argument: a name of optimizers.DTYPES
UNSETTABLE = "unsettable"  # an argument no TOML value can give (a process group)
Expected = type | tuple[type, ...] | ListOf | str


def _check_value(key: str, value: Any, parameter: inspect.Parameter) -> None:
    """Raise ``ValueError`` (one line, naming ``key``) unless ``value`` is what :func:`_expected_type`
    says ``parameter`` takes; numbers must be finite."""
    kind = _expected_type(parameter)
    if kind is None:
        return
    if kind == UNSETTABLE:
        raise ValueError(f"{key} cannot be set in a config (it takes a {parameter.annotation})")
    if not _is_a(value, kind):
        default = parameter.default
        shown = "" if default is inspect.Parameter.empty else f" (default {default!r})"
        raise ValueError(f"{key} must be {_describe(kind)}{shown}, got {value!r}")


def _is_a(value: Any, kind: Expected) -> bool:
    """Whether ``value`` is of ``kind``: never a boolean for a number, a finite float."""
    if isinstance(kind, ListOf):
        return (
            isinstance(value, list)
            and (kind.length is None or len(value) == kind.length)
            and all(_is_a(item, kind.element) for item in value)
        )
    if kind == DTYPE:
        return isinstance(value, str) and value in DTYPES
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _expected_type(parameter: inspect.Parameter) -> Expected | None:
    """What a config value of a builder's or constructor's ``parameter`` must be, from its default
    and its annotation: true or false for a boolean, an integer for an integer (not a float), any
    number where a float is allowed (``lr: float = 1`` included), a list for a tuple default (of its
    length) or a ``Sequence``; for a ``None`` default what the annotation names (``foreach: bool |
    None``; ``solve_dtype: torch.dtype | None``: :data:`DTYPE`), else :data:`UNSETTABLE`;
    ``None``: not checked (no default and no simple annotation)."""
    default = parameter.default
    annotation = parameter.annotation
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    if text.startswith(SEQUENCES):
        return ListOf(_simple_type(text[text.index("[") + 1 : -1]) or object)
    if isinstance(default, tuple):
        return ListOf(NUMBERS if all(isinstance(x, NUMBERS) for x in default) else object, len(default))
    if isinstance(default, bool):
        return bool
    kind = _simple_type(text)
    if kind is not None:
        return kind
    if default is inspect.Parameter.empty:
        return None
    if default is None:
        return UNSETTABLE
    return int if isinstance(default, int) else NUMBERS if isinstance(default, float) else type(default)


SEQUENCES = ("Sequence[", "collections.abc.Sequence[", "list[")
# an annotation's simple types, the first named wins: "float | torch.Tensor" takes any number
SIMPLE_TYPES: tuple[tuple[str, Expected], ...] = (
    ("bool", bool),
    ("float", NUMBERS),
    ("int", int),
    ("str", str),
    ("torch.dtype", DTYPE),
)


def _simple_type(text: str) -> Expected | None:
    """The type a union annotation ``text`` (``"int | None"``) names first, ``None`` if none."""
    names = set() if "[" in text else {part.strip() for part in text.split("|")}
    return next((kind for name, kind in SIMPLE_TYPES if name in names), None)


# GramGaussNewton's adaptive_damping: true/false, a rule's name, or a table (_check_damping_table)
BOOL_OR_STRING: tuple[type, ...] = (bool, str)
BOOL_OR_STRING_KEYS = frozenset({"adaptive_damping"})
DAMPING_NAMES = ("auto", *DAMPING_RULES)


def _check_damping_table(table: Mapping[str, Any]) -> None:
    """``optimizer.adaptive_damping = {name = "gain_ratio", min_alpha = 1.0, ...}``: a rule of
    :data:`~gramnewton.damping.DAMPING_RULES` and its constructor's number arguments, which the
    optimizer passes to the rule (:func:`~gramnewton.damping.damping_rule`); their ranges are
    checked here by building the rule once."""
    prefix = "optimizer.adaptive_damping"
    name = table.get("name")
    if name not in DAMPING_RULES:
        raise ValueError(f"{prefix}.name must be one of {', '.join(DAMPING_RULES)}, got {name!r}")
    # a rule's number arguments (the others, e.g. cross_validated's span and curvature, are not
    # plain numbers), each of the type its annotation names
    kinds = {f.name: _simple_type(str(f.type)) for f in dataclasses.fields(DAMPING_RULES[name]) if f.init}
    settable = {key: kind for key, kind in kinds.items() if kind in (int, NUMBERS)}
    for key, value in table.items():
        if key == "name":
            continue
        if key not in settable:
            close = difflib.get_close_matches(key, list(settable), n=1)
            hint = f" (did you mean {prefix}.{close[0]}?)" if close else f"; {name} accepts {', '.join(settable)}"
            raise ValueError(f"unknown config key {prefix}.{key}{hint}")
        kind = settable[key]
        if not _is_a(value, kind):
            raise ValueError(f"{prefix}.{key} must be {_describe(kind)}, got {value!r}")
    try:
        damping_rule(table)
    except ValueError as error:
        raise ValueError(f"{prefix}: {error}") from None


LIST_ITEMS: dict[Any, str] = {int: "integers", NUMBERS: "numbers", str: "strings", bool: "booleans"}


def _describe(kind: Expected) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "a table", bool: "true or false"}
    if isinstance(kind, ListOf):
        count = "" if kind.length is None else f"{kind.length} "
        return f"a list of {count}{LIST_ITEMS.get(kind.element, 'items')}"
    if kind == DTYPE:
        return f"one of {', '.join(repr(name) for name in DTYPES)}"
    if kind == BOOL_OR_STRING:
        return f"true or false, one of {', '.join(DAMPING_NAMES)}, or a table {{name = ..., ...}}"
    return "a number" if kind == NUMBERS else names.get(kind, kind.__name__)  # type: ignore[arg-type]


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
    """TOML text of a config (``tomli-w``: strings with newlines or quotes are escaped)."""
    return tomli_w.dumps(config)
