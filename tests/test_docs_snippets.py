"""What a new user copies first, checked against the code so that the docs cannot drift:
README.md's Python blocks run as written (training loops shortened) and do what the text around
them says, the defaults the docs state are the constructors', every keyword argument the docs pass
to a gramnewton callable exists, every command line of the README parses (subcommands, flags,
packaged configs, ``--set`` keys, Makefile targets), and ``examples/poisson.py`` refuses bad
arguments before it runs."""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import math
import pkgutil
import re
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gramnewton
from gramnewton import GainRatioDamping, GramGaussNewton, HooksEngine, SecondMomentMetric

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# training loops of the blocks are cut to this many iterations: the checks are that the code
# runs as written and trains, not how far (the PINN block's 200 steps: 70 s on the 10,065-parameter
# network, 0.3 s for 40 on the test's small one; its first ten are rejected while alpha rises)
MAX_LOOP = 40


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python fenced blocks of a markdown file: ``(line of the fence, code)``."""
    text = path.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)
    ]


def shortened(code: str) -> str:
    """``code`` with every ``range(N)``, ``N > MAX_LOOP``, cut to ``range(MAX_LOOP)``, and a tenth
    of the collocation points a PINN block samples (so that a change routing the block to the
    reference engine, one backward pass per residual row, fails in seconds, not minutes)."""
    code = re.sub(r"\brange\((\d+)\)", lambda m: f"range({min(int(m.group(1)), MAX_LOOP)})", code)
    return re.sub(r"\b(sample_(?:interior|boundary))\((\d+)", lambda m: f"{m.group(1)}({int(m.group(2)) // 10}", code)


def given_names(code: str) -> dict[str, Any]:
    """What the text around a block defines in words and the block uses without defining: a model
    of the kind the block needs, its inputs, labels, and a PINN's source ``f`` and boundary ``g``.
    A block using another undefined name fails with ``NameError``: add it here."""
    if "pinn." in code:  # the box's dimension: [0] * d or [0, 0]
        lows = re.search(r"sample_interior\(\d+, (\[0\] \* (\d+)|\[[^\]]*\])", code)
        dim = int(lows.group(2)) if lows.group(2) else lows.group(1).count(",") + 1
        return {
            "model": nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 1)).double(),
            "f": lambda x: math.pi**2 * torch.cos(math.pi * x).sum(-1),  # -Laplace of g
            "g": lambda x: torch.cos(math.pi * x).sum(-1),
        }
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    x, labels = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    return {"model": model, "x": x, "labels": labels, "loader": [(x, labels)]}


def run_block(code: str) -> tuple[dict[str, Any], str, list[str]]:
    """Execute a (shortened) block in a fresh namespace: the namespace, its stdout, its warnings."""
    torch.manual_seed(0)
    namespace = {**given_names(code), "__name__": "readme_block"}
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        exec(compile(shortened(code), str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace, out.getvalue(), [str(w.message) for w in caught]


def check_usage_block(namespace: dict[str, Any], stdout: str, warned: list[str]) -> None:
    """The first example: one line ``epoch mse`` per epoch, the MSE falling."""
    lines = [line.split() for line in stdout.strip().splitlines()]
    assert [int(epoch) for epoch, _ in lines] == list(range(len(lines))) and len(lines) >= 2, stdout
    mses = [float(mse) for _, mse in lines]
    assert all(math.isfinite(m) for m in mses) and mses[-1] < 0.5 * mses[0], stdout
    assert isinstance(namespace["opt"].engine, HooksEngine)  # "picks the fastest engine"


def check_smoothing_block(namespace: dict[str, Any], stdout: str, warned: list[str]) -> None:
    """``smooth_targets``: the step's loss is ``F.cross_entropy(..., label_smoothing=eps)``, as the
    block's comment says, with ``eps`` the one the block passes."""
    eps = float(re.search(r"smooth_targets\(logits, labels, ([\d.]+)\)", README.read_text()).group(1))
    model, x, labels = namespace["model"], namespace["x"], namespace["labels"]
    with torch.no_grad():
        expected = F.cross_entropy(model(x), labels, label_smoothing=eps)
    loss = GramGaussNewton(model, loss="cross_entropy").step(namespace["closure"])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def check_pinn_block(namespace: dict[str, Any], stdout: str, warned: list[str]) -> None:
    """The forward-Laplacian PINN: the default engine is the hooks engine, with no routing warning
    ("computes the Gram matrix exactly and fast"), and the steps lower the loss."""
    opt, closure, model = namespace["opt"], namespace["closure"], namespace["model"]
    assert isinstance(opt.engine, HooksEngine), type(opt.engine).__name__
    assert not warned, warned
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)  # the model run_block gave the block, before its steps
    model.load_state_dict(given_names(BLOCK_CODE[check_pinn_block]).pop("model").state_dict())
    with torch.no_grad():
        before = float(closure().pow(2).mean())
        model.load_state_dict(trained)
        after = float(closure().pow(2).mean())
    assert after < 0.5 * before, (before, after)


# a README block is recognised by a marker in its code; one without a check must at least run
BLOCK_CHECKS: dict[str, Callable[[dict[str, Any], str, list[str]], None]] = {
    "for epoch in range": check_usage_block,
    "smooth_targets(": check_smoothing_block,
    "pinn.taylor_residual(": check_pinn_block,
}
README_BLOCKS = python_blocks(README)
BLOCK_CODE = {check: next((c for _, c in README_BLOCKS if m in c), "") for m, check in BLOCK_CHECKS.items()}


@pytest.mark.parametrize(("line", "code"), README_BLOCKS, ids=[f"README.md:{line}" for line, _ in README_BLOCKS])
def test_readme_python_block_runs_and_does_what_its_text_says(line: int, code: str) -> None:
    namespace, stdout, warned = run_block(code)
    for marker, check in BLOCK_CHECKS.items():
        if marker in code:
            check(namespace, stdout, warned)


def test_every_readme_block_check_still_has_its_block() -> None:
    """A check whose block was removed or rewritten would silently check nothing."""
    for marker in BLOCK_CHECKS:
        assert any(marker in code for _, code in README_BLOCKS), f"no README block contains {marker!r}"


def stated_defaults(text: str) -> dict[str, Any]:
    """``name=value`` pairs of a sentence, values as Python literals (``16`` -> 16)."""
    pairs = re.findall(r"\b(\w+)=(\"[^\"]*\"|'[^']*'|[-+\w.]+)", text)
    return {name: ast.literal_eval(value) for name, value in pairs}


# (file, pattern whose group 1 states defaults as name=value, the callable they are the defaults of)
DEFAULT_CLAIMS: list[tuple[str, str, Callable[..., Any]]] = [
    ("README.md", r"`GramGaussNewton\(model\)` defaults to `([^`]*)`", GramGaussNewton),
    ("README.md", r"opt = GramGaussNewton\(model\)  # ([^\n]*)", GramGaussNewton),
    (
        "docs/classification.md",
        r"GramGaussNewton\(model, loss=\"cross_entropy\"\)  # the defaults: ([^\n]*)",
        GramGaussNewton,
    ),
    ("README.md", r"half its batch's\s+loss \(`([^`]*)`\)", GainRatioDamping),
    ("docs/convergence.md", r"The defaults \(`(min_alpha=[^`]*)`\)", GainRatioDamping),
]


def symbol_table_defaults() -> dict[str, Any]:
    """The README's first table: its last column states ``GramGaussNewton``'s defaults."""
    rows = re.findall(r"^\|[^\n]*\| `(\w+=[^`]*)` \|$", README.read_text(), re.M)
    assert len(rows) >= 4, rows  # lam, alpha, weight_decay, lr
    return stated_defaults(" ".join(rows))


@pytest.mark.parametrize(
    ("doc", "pattern", "target"),
    [*DEFAULT_CLAIMS, ("README.md", "table", GramGaussNewton)],
    ids=lambda value: value.__name__ if callable(value) else value if value.endswith(".md") else "",
)
def test_defaults_the_docs_state_are_the_signatures(doc: str, pattern: str, target: Callable[..., Any]) -> None:
    if pattern == "table":
        stated = symbol_table_defaults()
    else:
        found = re.search(pattern, (ROOT / doc).read_text())
        assert found, f"{doc} no longer states {target.__name__}'s defaults as {pattern!r}: update this test"
        stated = stated_defaults(found.group(1))
    assert stated, f"no name=value pair in {doc}'s statement"
    parameters = inspect.signature(target).parameters
    actual = {name: parameters[name].default if name in parameters else "<no such parameter>" for name in stated}
    assert actual == stated, f"{doc} states {target.__name__} defaults {stated}, the signature has {actual}"


def test_the_default_rules_are_the_ones_the_readme_describes() -> None:
    """``adaptive_damping="auto"``: "the gain-ratio rule with step rejection, re-evaluating one step
    in four"; ``metric="auto"``: one weight per tensor with ``power=1`` (the README's
    ``{"name": "second_moment", "per_tensor": True, "power": 1}``)."""
    text = " ".join(README.read_text().split())
    assert "re-evaluating one step in four" in text
    assert 'It is the default since the fortieth session: `metric="auto"` takes it, with `power=1`' in text
    opt = GramGaussNewton(nn.Linear(3, 1))
    assert isinstance(opt.damping, GainRatioDamping) and opt.damping.check_every == 4
    assert opt.damping.reject_below == 0.0  # "with step rejection"
    assert opt.metric == SecondMomentMetric(per_tensor=True, power=1.0)


def public_callables() -> dict[str, Callable[..., Any]]:
    """Public gramnewton callables a doc may call by name (``Name(`` or ``module.Name(``)."""
    found: dict[str, Callable[..., Any]] = {}
    for module in ("gramnewton", "gramnewton.damping", "gramnewton.pinn", "gramnewton.losses", "gramnewton.metric"):
        for name, obj in vars(importlib.import_module(module)).items():
            if not name.startswith("_") and callable(obj) and getattr(obj, "__module__", "").startswith("gramnewton"):
                found.setdefault(name, obj)
    return found


def keyword_calls(text: str, names: dict[str, Callable[..., Any]]) -> list[tuple[int, str, list[str]]]:
    """``(line, name, keywords)`` of every call ``name(..., kw=...)`` in ``text`` (top-level
    keywords only: nested calls, lists and dicts are looked at on their own)."""
    calls = []
    for m in re.finditer(r"\b([A-Za-z_]\w*)\(", text):
        if m.group(1) not in names:
            continue
        depth, end = 1, m.end()
        while end < len(text) and depth and end - m.end() < 1000:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        args = text[m.end() : end - 1]
        for _ in range(5):  # innermost brackets first
            args = re.sub(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}", "", args)
        keywords = re.findall(r"(?:^|,)\s*([A-Za-z_]\w*)\s*=(?!=)", args)
        if keywords:
            calls.append((text[: m.start()].count("\n") + 1, m.group(1), keywords))
    return calls


def user_facing_code() -> list[tuple[str, str]]:
    """README.md and CONTRIBUTING.md whole (prose calls included), and the Python blocks of docs/
    (the session logs' prose keeps calls as they were at the time, e.g. options built on a branch)."""
    texts = [(README.name, README.read_text()), ("CONTRIBUTING.md", (ROOT / "CONTRIBUTING.md").read_text())]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        texts += [(f"docs/{doc.name}:{line}", code) for line, code in python_blocks(doc)]
    return texts


def test_every_keyword_the_docs_pass_exists() -> None:
    names = public_callables()
    calls = [(where, *call) for where, text in user_facing_code() for call in keyword_calls(text, names)]
    assert len(calls) > 10  # the scan finds the calls (GramGaussNewton(model, lam=1.0, ...) and others)
    unknown = []
    for where, line, name, keywords in calls:
        parameters = inspect.signature(names[name]).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown += [f"{where} (+{line}): {name}(..., {k}=...)" for k in keywords if k not in parameters]
    assert not unknown, "keywords the signatures do not have:\n" + "\n".join(unknown)


def readme_command_lines() -> list[str]:
    """The README's command lines: its indented code lines (a line that starts with ``[`` continues
    the previous command) and its inline `gramnewton ...` commands; comments dropped."""
    commands: list[str] = []
    for line in README.read_text().splitlines():
        if not line.startswith("    "):
            continue
        code = line.split("  #")[0].strip()
        if code.startswith("[") and commands:
            commands[-1] += " " + code
        elif re.match(r"(make|gramnewton|python|bash|torchrun) ", code):
            commands.append(code)
    inline = re.findall(r"`(gramnewton (?:demo|train|plot|reproduce|theory)\s[^`]+)`", README.read_text())
    return commands + inline


def argv_variants(command: str) -> list[list[str]]:
    """The argument lists a command line stands for: ``[--flag x]`` optional parts taken,
    ``a | b`` alternatives each, ``CONFIG`` a packaged config, ``...`` dropped; a word with ``=[``
    keeps its brackets (a TOML array: ``--grid 'key=[1, 2]'``)."""
    words = shlex.split(command.replace("CONFIG", "rotated_mnist_ggn_fixup"))
    words = [w if "=[" in w else w.replace("[", "").replace("]", "") for w in words]
    words = [w for w in words if w and w != "..."]
    if "|" in words:
        i = words.index("|")
        return [words[:i], words[: i - 1] + words[i + 1 :]]
    return [words]


def script_flags(path: Path) -> set[str]:
    """The ``--flags`` a script's argparse parsers define (read from its source, not run)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return flags


def test_every_readme_command_line_parses() -> None:
    from gramnewton.lab.cli import build_parser
    from gramnewton.lab.experiments.config import load_config
    from gramnewton.lab.experiments.sweep import parse_axes, sweep_points

    commands = readme_command_lines()
    assert any(c.startswith("gramnewton train") for c in commands) and any("benchmarks/" in c for c in commands)
    makefile = (ROOT / "Makefile").read_text()
    problems = []
    for command in commands:
        for argv in argv_variants(command):
            if argv[0] == "make":
                problems += [
                    f"{command}: no Makefile target {t}" for t in argv[1:] if not re.search(rf"^{t}:", makefile, re.M)
                ]
            elif argv[0] in ("python", "bash") and not argv[1].startswith("-"):
                script = ROOT / argv[1]
                if not script.is_file():
                    problems.append(f"{command}: no file {argv[1]}")
                elif script.suffix == ".py":
                    unknown = {w.split("=")[0] for w in argv[2:] if w.startswith("--")} - script_flags(script)
                    problems += [f"{command}: {argv[1]} has no {flag}" for flag in sorted(unknown)]
            else:  # gramnewton ..., or torchrun ... -m gramnewton ...
                cli = argv[argv.index("gramnewton") + 1 :]
                try:
                    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
                        args = build_parser().parse_args(cli)
                except SystemExit:
                    problems.append(f"{command}: {err.getvalue().strip()}")
                    continue
                if args.command in ("train", "sweep"):
                    try:
                        config = load_config(args.config, args.overrides)
                        if args.command == "sweep":  # every point resolves, its optimizer builds
                            sweep_points(config, parse_axes(args.axes))
                    except ValueError as error:
                        problems.append(f"{command}: {error}")
    assert not problems, "\n".join(problems)


def run_example(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """``python examples/poisson.py --seconds 1 ARGV``, expected to exit with argparse's status 2
    before any step (the last line of its stderr is returned)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    poisson = importlib.import_module("poisson")
    monkeypatch.setattr(sys, "argv", ["poisson.py", "--seconds", "1", *argv])
    with pytest.raises(SystemExit) as exit_:
        poisson.main()
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--widths", "0"], "--widths: must be an integer >= 1"),  # trained a constant, 1 parameter
        (["--points", "0", "10"], "--points: must be an integer >= 1"),  # a traceback
        (["--threads", "0"], "--threads: must be an integer >= 1"),  # a traceback
        (["--momentum", "1.5"], "Invalid momentum value: 1.5"),  # a traceback at the first step
        (["--seconds", "nan"], "--seconds: must be a finite number of seconds > 0"),  # ran no step, silently
    ],
)
def test_poisson_example_refuses_bad_arguments_before_it_runs(argv, message, monkeypatch, capsys) -> None:
    assert message in run_example(argv, monkeypatch, capsys)


def test_poisson_line_search_refuses_bad_settings_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LineSearchGGN`` refuses what its first step would (momentum, alpha), and what no step
    would notice (``halvings=0``: every step of length zero), before a run starts."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    from poisson import LineSearchGGN, make_model

    model = make_model(2, (4,), seed=0)
    for kwargs, message in [
        ({"momentum": 1.0}, "momentum"),
        ({"alpha": -1.0}, "alpha"),
        ({"halvings": 0}, "halvings"),
        ({"form": "autograd"}, "residual form"),
    ]:
        with pytest.raises(ValueError, match=message):
            LineSearchGGN(model, **kwargs)


def test_the_lab_names_the_readme_gives_exist() -> None:
    """Models, data sets and optimizers the README lists by name are registered."""
    from gramnewton.lab.data import list_datasets
    from gramnewton.lab.experiments.optimizers import build_optimizer
    from gramnewton.lab.models import list_models

    text = README.read_text()
    section = text[text.index("## Models and data") :]
    models = {f"resnet{d}_{n}" for d in (8, 20, 32) for n in ("fixup", "gn", "bn")} | {"two_layer", "mlp"}
    assert "`resnet{8,20,32}_{fixup,gn,bn}`" in section and models <= set(list_models())
    first_cells = re.findall(r"^\| (`[^|]*) \|", section, re.M)
    named = {name for cell in first_cells for name in re.findall(r"`([\w-]+)`", cell)}
    assert named and named <= set(list_datasets()), named - set(list_datasets())
    optimizers = re.search(r"builds `ggn`, `sgd`, `adam`, `kfac` or `lbfgs`", text)
    assert optimizers
    for name in ("ggn", "sgd", "adam", "kfac", "lbfgs"):
        build_optimizer({"name": name}, nn.Linear(2, 1))


def documented_arguments(doc: str) -> list[str] | None:
    """The names an ``Args:`` section of a docstring documents (``a, b: ...`` counts both), or
    ``None`` without such a section."""
    lines = doc.expandtabs().splitlines()
    heads = [i for i, line in enumerate(lines) if line.strip() == "Args:"]
    if not heads:
        return None
    names: list[str] = []
    for head in heads:
        indent = len(lines[head]) - len(lines[head].lstrip())
        entry = None  # the indentation of the section's entries
        for line in lines[head + 1 :]:
            if not line.strip():
                continue
            depth = len(line) - len(line.lstrip())
            if depth <= indent:
                break
            entry = depth if entry is None else entry
            named = re.match(r"\s*(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?\s*:", line)
            if depth == entry and named:
                names += [n.strip().lstrip("*") for n in named.group(1).split(",")]
    return names


def core_functions() -> list[tuple[str, Callable[..., Any]]]:
    """Every public function and method of the core package (``gramnewton``, not the lab)."""
    found = []
    for info in pkgutil.walk_packages(gramnewton.__path__, "gramnewton."):
        if info.name.startswith("gramnewton.lab") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                found.append((f"{module.__name__}.{name}", obj))
            elif inspect.isclass(obj):
                found.append((f"{module.__name__}.{name}", obj))  # its docstring's Args: are __init__'s
                found += [
                    (f"{module.__name__}.{name}.{method}", getattr(obj, method))
                    for method, member in vars(obj).items()
                    if (method == "__init__" or not method.startswith("_")) and inspect.isfunction(member)
                ]
    return found


def test_core_docstrings_document_exactly_their_arguments() -> None:
    """Where a docstring has an ``Args:`` section, it names every parameter of the signature and
    nothing else (``*args``/``**kwargs`` may be left out)."""
    checked, wrong = 0, []
    for name, obj in core_functions():
        documented = documented_arguments(inspect.getdoc(obj) or "") if obj.__doc__ else None
        if documented is None:
            continue
        parameters = inspect.signature(obj).parameters
        variadic = {p for p, v in parameters.items() if v.kind in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
        expected = [p for p in parameters if p not in ("self", "cls")]
        extra = [n for n in documented if n not in expected]
        missing = [p for p in expected if p not in documented and p not in variadic]
        checked += 1
        if extra or missing:
            wrong.append(f"{name}: documents {extra} that it has not, leaves out {missing}")
    assert checked > 15, checked  # the scan reads the sections
    assert not wrong, "\n".join(wrong)
