"""Subcommands of the ``tokprune`` CLI; each module exposes ``register(subparsers)``."""
