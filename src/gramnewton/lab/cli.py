"""``gramnewton`` command line: each sub-command lives in a module of :mod:`gramnewton.lab.commands`.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``run=callable(args) -> int`` as a default. Every error is one line on stderr,
``error: <what and how to fix>``, with a non-zero exit status; ``--debug`` shows the traceback.
Warnings are one line too, ``warning: <message>`` (Python's own format adds the source line).
Ctrl-C that a command does not handle itself (during start-up, say) is one line, ``interrupted``,
with exit status 130 (a command changes no file before its set-up is done).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

COMMAND_MODULES = (
    "gramnewton.lab.commands.demo",
    "gramnewton.lab.commands.train",
    "gramnewton.lab.commands.sweep",
    "gramnewton.lab.commands.predict",
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


INTERRUPTED = 130  # the shell's status of a process ended by SIGINT


def one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    """``warnings.formatwarning`` for the command line: ``warning: <message>`` on one line, without
    the file and source line of the code that warned (a data set's ``skip_bad`` note, a cache entry
    rebuilt: written for the user, not the developer; ``--debug`` does not change it)."""
    return f"warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = one_line_warning  # the process is the command's
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed on one line
        return int(exit_.code or 0)
    except KeyboardInterrupt:  # while the commands' modules import (torch, matplotlib: seconds)
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
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
