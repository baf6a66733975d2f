"""The ``tokprune`` command: each subcommand lives in ``tokprune/commands/<name>.py`` with a ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "flops", "bench", "eval", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokprune", description="Training-free visual-token pruning for MLLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tokprune.commands.{name}")
        except ModuleNotFoundError as err:  # a command whose optional module is absent
            if err.name != f"tokprune.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
