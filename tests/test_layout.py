"""The package's layout: a torch-only core, the lab behind an extra, a wheel that works on its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from gramnewton import cli

ROOT = Path(__file__).resolve().parent.parent
LAB_ONLY = ("gramnewton.lab", "matplotlib", "sklearn", "mlxtend", "PIL", "tqdm")


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH, so a child imports only what its interpreter installs."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_import_gramnewton_loads_no_lab_module():
    code = (
        "import sys, torch; before = set(sys.modules); import gramnewton; "
        f"print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {LAB_ONLY!r} "
        "or m.startswith('gramnewton.lab')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("hidden", ["tqdm", "matplotlib"])
def test_cli_without_the_lab_extra_prints_one_line(monkeypatch, capsys, hidden):
    # sys.modules[name] = None makes importlib.util.find_spec(name) answer None: "not installed"
    monkeypatch.setitem(sys.modules, hidden, None)
    assert cli.main(["train", "--help"]) == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "gramnewton[lab]" in lines[0] and hidden in lines[0], lines


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(source)],
        check=True,
        capture_output=True,
        env=_clean_env(),
    )
    (built,) = work.glob("gramnewton-*.whl")
    return built


def test_wheel_requires_torch_only_and_ships_the_configs(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in unconditional] == ["torch"], unconditional
    assert any(r.startswith("tqdm") and 'extra == "lab"' in r for r in requires)
    configs = {Path(n).name for n in names if n.startswith("gramnewton/lab/configs/") and n.endswith(".toml")}
    assert {"afad_ggn_fixup.toml", "rsna_ggn_fixup.toml"} <= configs


@pytest.mark.slow  # 43 s with the machine's load at 20 on 2 cores: three interpreters import torch
def test_installed_wheel_runs_the_cli_from_another_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        env=_clean_env(),
    )
    # The existing environment's packages (torch, the lab extra) as a plain path entry: .pth files
    # there (the editable gramnewton among them) are not processed, and the wheel's copy comes first.
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args: str) -> str:
        out = subprocess.run(
            [str(python), *args], cwd=elsewhere, capture_output=True, text=True, env=_clean_env(), check=False
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    # the wheel's copy is what gets imported, and `gramnewton train afad_ggn_fixup` finds the packaged config in it
    located, config = run(
        "-c",
        "import gramnewton; from gramnewton.lab.commands.train import config_path; "
        "p = config_path('afad_ggn_fixup'); print(gramnewton.__file__); print(p.resolve() if p.is_file() else 'missing')",
    ).split()
    assert Path(located).is_relative_to(site), located
    assert config != "missing" and Path(config).is_relative_to(site), config
    assert "fig1" in run("-m", "gramnewton", "reproduce", "--help")
    assert "--resume" in run("-m", "gramnewton", "train", "--help")


def test_the_readmes_first_example_runs_and_trains(capsys):
    """The README's usage example, as a user pastes it: it runs, and the MSE it prints falls each
    epoch (the example used to fit random targets, whose printed MSE went up and down)."""
    text = (ROOT / "README.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example, "README.md", "exec"), {})
    losses = [float(line.split()[1]) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
