"""``gramnewton`` command line: each sub-command lives in a module of :mod:`gramnewton.lab.commands`.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``run=callable(args) -> int`` as a default. Every error is one line on stderr,
``error: <what and how to fix>``, with a non-zero exit status; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "gramnewton.lab.commands.demo",
    "gramnewton.lab.commands.train",
    "gramnewton.lab.commands.plot",
    "gramnewton.lab.commands.reproduce",
    "gramnewton.lab.commands.theory",
)


DEBUG_HELP = "show the full traceback of an error"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (not usage text and a message)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gramnewton", description="Gram-Gauss-Newton training and experiments.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    for command in subparsers.choices.values():  # also after the command; SUPPRESS keeps the main default
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return int(exit_.code or 0)
    try:
        return int(args.run(args) or 0)
    except Exception as error:
        if args.debug:
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return 1


# Errors whose message is written for the user; any other type is named (it may be a bug).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def describe_error(error: BaseException) -> str:
    """One line: the message of a user error, else the error's type and message and a pointer to --debug."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    text = " ".join(text.split())
    if not isinstance(error, USER_ERRORS):
        text = f"{type(error).__name__}: {text} (rerun with --debug for the traceback)"
    return text


if __name__ == "__main__":
    raise SystemExit(main())
