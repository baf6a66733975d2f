"""``tokprune report DIR``: re-render results.md and the Pareto plot of a ``tokprune eval`` run from its JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("report", help="re-render the table and plot of a tokprune eval run",
                              description="Read DIR/results.json (and DIR/samples/) and rewrite results.md, "
                                          "pareto.png and pareto.svg.")
    p.add_argument("dir", help="the --out directory of a tokprune eval run")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Exit 2 when DIR holds no eval results."""
    from tokprune.eval import report

    try:
        paths = report.render(args.dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"tokprune report: error: {e}", file=sys.stderr)
        return 2
    print(open(paths[1], encoding="utf-8").read())
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return 0
