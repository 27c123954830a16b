"""``gramnewton`` command line: each sub-command lives in a module of :mod:`gramnewton.lab.commands`.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``run=callable(args) -> int`` as a default.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

COMMAND_MODULES = (
    "gramnewton.lab.commands.demo",
    "gramnewton.lab.commands.train",
    "gramnewton.lab.commands.plot",
    "gramnewton.lab.commands.reproduce",
    "gramnewton.lab.commands.theory",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gramnewton", description="Gram-Gauss-Newton training and experiments.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
