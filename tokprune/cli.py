"""The ``tokprune`` command: each subcommand lives in ``tokprune/commands/<name>.py`` with a ``register``.

Errors a user can fix (a :class:`ValueError` such as ``UnsupportedError``, a missing or unwritable file, a
transformers release outside the tested window) print one line, ``tokprune <command>: error: <what to do>``, and
exit with code 2, like argparse's own errors; ``--debug`` shows the traceback instead. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

import tokprune
from tokprune.errors import UntestedTransformersError
from tokprune.transformers_window import installed, is_tested

COMMANDS = ("demo", "flops", "bench", "show", "eval", "report", "tune")
#: exceptions that describe bad input, not a bug: shown as one line, exit code 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, NotImplementedError, UntestedTransformersError)
#: commands that prune a model: they check the transformers release before any work (one line if untested)
PRUNING_COMMANDS = ("demo", "bench", "show", "eval", "tune")
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the argument, and where ``-h`` helps."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}  (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``tokprune`` parser with every subcommand registered (subparsers inherit :class:`Parser`)."""
    parser = Parser(prog="tokprune", description="Training-free visual-token pruning for MLLMs.")
    parser.add_argument("--version", action="version", version=f"tokprune {tokprune.__version__}")
    debug_help = "show the full traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tokprune.commands.{name}")
        except ModuleNotFoundError as err:  # a command whose optional module is absent
            if err.name != f"tokprune.commands.{name}":
                raise
            continue
        module.register(sub)
    for command in sub.choices.values():  # --debug is accepted after the subcommand too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tokprune`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        loaded = "tokprune.patches.compat" in sys.modules  # then its own view of the version is free to ask
        if args.command in PRUNING_COMMANDS and (loaded or not is_tested(installed())):
            from tokprune.patches.compat import check_transformers  # imports transformers: only when needed

            check_transformers()  # before a model loads or a grid records every cell as failed
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = str(e).strip().replace("\n", " ") or type(e).__name__
        print(f"tokprune {args.command}: error: {message}  (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tokprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
