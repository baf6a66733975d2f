"""Argument types and checks shared by the subcommands, so a bad value fails at parse time, before any model loads.

Each ``type=`` function raises :class:`argparse.ArgumentTypeError` with the expected form; argparse then prints
``tokprune <command>: error: argument --x: <message>`` on one line and exits with code 2. The ``check_*``
functions validate what needs more than one argument, or the registry, and raise :class:`ValueError` /
:class:`FileNotFoundError`, which ``tokprune.cli.main`` turns into the same one-line error.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    """An int >= 1 (``--repeats``, ``--keep``, ``--batch``...)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """An int >= 0 (``--warmup``, ``--n-text``, ``--decode-steps``...)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def kept_fraction(text: str) -> float:
    """A kept fraction in (0, 1] (``--keep-ratio``: the share of visual tokens KEPT, never the pruned share)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"is the fraction of visual tokens kept and must be in (0, 1], got {text!r}")
    return value


def comma_list(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """A type for comma-separated values, each parsed by ``item`` (e.g. ``--keep 192,128,64``)."""

    def parse(text: str) -> list:
        try:
            parts = split_list(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}: {e}") from None
        out = []
        for p in parts:
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{e} (in {text!r})" if len(parts) > 1 else str(e)) from None
        if len(set(out)) < len(out):
            raise argparse.ArgumentTypeError(f"{_repeated(out)} is listed twice in {text!r}; list each once")
        return out

    parse.__name__ = what  # argparse names the type in "invalid <name> value" messages
    return parse


def split_list(text: str, option: str = "") -> list[str]:
    """The items of a comma-separated list, stripped; an empty item (``cls,``, ``8,,4``) or a repeated one
    (``--keep 8,8``) is a :class:`ValueError` (prefixed with ``option``), never silently dropped or run twice."""
    where = f"{option} " if option else ""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or "" in parts:
        raise ValueError(f"{where}{text!r} has an empty item; separate the items with single commas, e.g. a,b")
    if len(set(parts)) < len(parts):
        raise ValueError(f"{where}{_repeated(parts)} is listed twice in {text!r}; list each once")
    return parts


def _repeated(items: Sequence[Any]) -> Any:
    return next(x for i, x in enumerate(items) if x in items[:i])


def image_size(text: str) -> tuple[int, int]:
    """``HxW`` in pixels, e.g. ``672x1008``."""
    h, sep, w = text.lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 672x1008, got {text!r}")
    return size


def stages(text: str) -> list[tuple[int, float | int]]:
    """``LAYER:KEPT,...``: before 0-indexed LLM layer LAYER keep KEPT tokens (a count, or a fraction with a dot)."""
    expected = "expected LAYER:KEPT[,LAYER:KEPT...], KEPT a count or a fraction, e.g. 2:0.5 or 8:288,16:144"
    out: list[tuple[int, float | int]] = []
    for item in text.split(","):
        layer, sep, kept = item.strip().partition(":")
        try:
            stage = (int(layer), float(kept) if "." in kept else int(kept))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{expected}; got {text!r}") from None
        if not sep or stage[0] < 0 or not stage[1] > 0 or (isinstance(stage[1], float) and stage[1] > 1):
            raise argparse.ArgumentTypeError(f"{expected}; got {text!r}")
        out.append(stage)
    return out


def method_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--option`` (repeatable): one keyword option of the method, typed as in Python, so the CLI
    passes what ``tokprune.apply(model, method, KEY=VALUE)`` would: ``3`` an int, ``0.5`` a float, ``true`` /
    ``false`` a bool, ``none`` None, ``8,16,24`` or ``(8, 16, 24)`` a tuple, anything else a string
    (``positions=original``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. layer=3 or positions=original, got {text!r}")
    return key, option_value(raw.strip())


def option_value(raw: str) -> Any:
    """A ``--option`` value as Python would read it (see :func:`method_option`); lists become tuples."""
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw  # a bare word: a string option such as positions=original
    return tuple(value) if isinstance(value, list) else value


def check_method_options(methods: Sequence[str], pairs: Sequence[tuple[str, Any]], option: str = "--option"
                         ) -> dict[str, Any]:
    """The ``--option`` pairs as a dict, checked before any model loads: no key twice, and every method in
    ``methods`` builds with them (each key a field of the method or an option of a model family, each value one
    the method accepts). Raises ValueError naming the method and its options."""
    from dataclasses import fields

    from tokprune.api import make_pruner
    from tokprune.pruners.compose import JOIN, Compose
    from tokprune.registry import MODELS, get_method

    options: dict[str, Any] = {}
    for key, value in pairs:
        if key in options:
            raise ValueError(f"{option} {key}=... is given twice; pass each option once")
        options[key] = value
    family = {name for adapter in MODELS.values() for name in adapter.options}
    for method in methods:
        own = {k: v for k, v in options.items() if k not in family}
        cls = Compose if JOIN in method else get_method(method)  # "vision+llm": the composition's own options
        known = sorted(f.name for f in fields(cls) if f.init)
        unknown = sorted(set(own) - set(known))
        if unknown:
            raise ValueError(f"{option}: method {method!r} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(known)} (model-family options: {', '.join(sorted(family))})")
        try:
            make_pruner(method, own)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{option}: {e}") from None
    return options


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def check_methods(names: Sequence[str], option: str = "--method", hint: str = "") -> None:
    """Every name is a registered method (``tokprune.methods()``), two joined by ``+`` (a vision method then an LLM
    method) or ``package.module:ClassName``, a Pruner class of the user's, imported now; the error lists the known
    ones, then ``hint``."""
    import tokprune
    from tokprune.pruners.compose import composed_names
    from tokprune.registry import get_method, is_import_path

    known = tokprune.methods()
    for name in names:
        if name not in known and is_import_path(name):
            try:
                get_method(name)
            except ValueError as e:
                raise ValueError(f"{option}: {e}") from None
    unknown = [n for n in names if n not in known and not is_import_path(n) and not composed_names(n, known)]
    if unknown:
        raise ValueError(f"{option}: unknown method {', '.join(map(repr, unknown))}; known: {', '.join(known)}{hint}")


def check_config(name: str, image_size: tuple[int, int] | None = None) -> Any:
    """The transformers config of ``name`` (a shipped config or a config file/directory; reads the JSON, loads no
    weights), checked to accept ``--image-size`` when one is given."""
    from tokprune import configs

    try:
        config = configs.load(name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--config: {e}") from None
    except ValueError as e:
        raise ValueError(f"--config: {e}") from None
    if image_size is not None and config.model_type == "llava":
        side = config.vision_config.image_size
        raise ValueError(f"--image-size: LLaVA-1.5 ({name}) resizes every image to {side}x{side}; drop --image-size "
                         "(it matters for LLaVA-NeXT and Qwen)")
    return config


def check_writable(path: str, option: str, *, make_folders: bool = False) -> None:
    """A file can be written at ``path`` (checked before any work is done): its folder exists and is writable, or
    with ``make_folders`` the nearest existing folder above it is (the command creates the rest)."""
    target = Path(path).expanduser()
    if target.is_dir() and not make_folders:
        raise ValueError(f"{option} {path}: is a directory; pass a file name, e.g. {target / 'out.json'}")
    folder = target.resolve().parent
    if make_folders:
        folder = target.resolve()
        while not folder.exists():
            folder = folder.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist; create it or pass another path"
        raise FileNotFoundError(f"{option} {path}: {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{option} {path}: folder {folder} is not writable; pass another path")
