"""``tokprune demo``: prune a small built-in model end to end, offline, in seconds.

By default it uses the trained reference model ``llava-shapes`` shipped with the package (docs/reference.md):
accuracy with and without pruning on Shapes-VQA, and a picture of which tokens the method kept. ``--family``
switches to a tiny randomly initialised model of any supported family (exactness checks only: random weights
answer nothing).

Arguments are checked before a model loads; the pruned pass runs before the unpruned one, so a method the model
cannot run or a budget larger than the image fails at once, not after a whole unpruned pass. Without
``--method`` the first of :data:`DEFAULT_METHODS` the model can run is used, and the output says why.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokprune.commands import args as types

#: tried in order when no --method is given: cls where the vision encoder has a [CLS] token, else fastv
DEFAULT_METHODS = ("cls", "fastv")
TINY_KEEP_RATIO = 0.5  # the tiny models have 4 (Qwen) to 24 (LLaVA-NeXT) visual tokens: keep half
REFERENCE_KEEP_RATIO = 0.125  # 8 of the reference models' 64 tokens
#: options of one kind of model only, with their defaults; given for the other kind they are an error
REFERENCE_OPTIONS = {"samples": 100, "show": 2}
TINY_OPTIONS = {"new_tokens": 8}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand to an argparse subparsers object."""
    p = sub.add_parser("demo", help="prune a built-in model with and without pruning (offline)",
                       description="Prune a built-in model and compare it with the unpruned one: a trained "
                                   "reference model (accuracy on Shapes-VQA) or, with --family, a tiny random-weight "
                                   "model of any supported family (exactness only).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="trained reference model: llava-shapes (default) or qwen2vl-shapes")
    src.add_argument("--family", default=None, help="use a tiny random-weight model of this family instead")
    p.add_argument("--method", default=None,
                   help=f"pruning method (default: the first of {', '.join(DEFAULT_METHODS)} the model can run)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=types.positive_int, default=None, help="visual tokens kept per image")
    budget.add_argument("--keep-ratio", type=types.kept_fraction, default=None,
                        help=f"fraction of visual tokens kept (default: {REFERENCE_KEEP_RATIO} on reference models, "
                             f"{TINY_KEEP_RATIO} on tiny ones)")
    p.add_argument("--samples", type=types.positive_int, default=None,
                   help=f"test samples scored (reference models; default {REFERENCE_OPTIONS['samples']})")
    p.add_argument("--show", type=types.nonneg_int, default=None,
                   help=f"samples whose kept tokens are drawn (reference models; default {REFERENCE_OPTIONS['show']})")
    p.add_argument("--save", default=None, help="also write the kept-token pictures, labelled, to this PNG file")
    p.add_argument("--new-tokens", type=types.positive_int, default=None,
                   help=f"tokens to generate (tiny models; default {TINY_OPTIONS['new_tokens']})")
    p.set_defaults(func=run)


def check(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads; raises ValueError / OSError naming the argument.
    Fills in the defaults of the options that apply to the chosen kind of model."""
    own, other = (TINY_OPTIONS, REFERENCE_OPTIONS) if args.family is not None else (REFERENCE_OPTIONS, TINY_OPTIONS)
    for name in other:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            kind = "the reference models (--model)" if args.family is not None else "the tiny models (--family)"
            raise ValueError(f"{flag} applies to {kind} only; drop it or switch model")
    for name, default in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.family is not None:
        from tokprune.testing import families

        if args.family not in families():
            raise ValueError(f"--family {args.family!r}: no tiny model of that family; known: {', '.join(families())}")
    else:
        from tokprune.reference import names

        if (args.model or "llava-shapes") not in names():
            raise ValueError(f"--model {args.model!r}: not a shipped reference model; known: {', '.join(names())}")
    if args.method is not None:
        types.check_methods([args.method])
    if args.save is not None:
        if not args.save.lower().endswith(".png"):
            raise ValueError(f"--save {args.save}: the pictures are written as PNG; pass a name ending in .png")
        if args.family is None and args.show == 0:
            raise ValueError("--save draws the samples of --show; pass --show 1 or more")
        types.check_writable(args.save, "--save")


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then run the reference or the tiny-model demo; exit code 1 when keep-all differs."""
    check(args)
    what = f"tiny {args.family} model" if args.family is not None else (args.model or "llava-shapes")
    say(f"tokprune demo: loading torch, transformers and {what}...")
    if args.family is not None:
        return run_tiny(args)
    return run_reference(args)


def choose_method(model: Any, requested: str | None) -> tuple[str, str]:
    """The method to demo and a note on why: ``requested``, else the first of :data:`DEFAULT_METHODS` that
    ``tokprune.apply`` accepts on ``model`` (a method raising ``UnsupportedError`` is skipped, and the note says
    why)."""
    import tokprune

    if requested is not None:
        return requested, ""
    skipped = []
    for method in DEFAULT_METHODS:
        try:
            tokprune.apply(model, method, keep_ratio=1.0)
        except tokprune.UnsupportedError as e:
            skipped.append(f"{method} cannot run here: {e}")
            continue
        finally:
            tokprune.remove(model)
        return method, "; ".join(["default", *skipped])
    raise ValueError("none of the default methods runs on this model (" + "; ".join(skipped) + "); pass --method")


def budget_of(args: argparse.Namespace, default_ratio: float) -> dict[str, Any]:
    """The ``keep`` / ``keep_ratio`` keyword arguments of the run."""
    if args.keep is None and args.keep_ratio is None:
        return {"keep_ratio": default_ratio}
    return {"keep": args.keep, "keep_ratio": args.keep_ratio}


def nothing_pruned_note(n_visual: int, n_kept: int) -> str | None:
    """A line warning that the budget keeps every token (the demo would compare the model with itself)."""
    if n_kept < n_visual:
        return None
    return (f"note       : this budget keeps all {n_visual} visual tokens, so nothing is pruned; pass a smaller "
            "--keep or --keep-ratio")


def labelled(picture: Any, lines: list[str]) -> Any:
    """``picture`` (PIL) with ``lines`` of text written in a white band above it."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(picture)
    line_h = max(draw.textbbox((0, 0), line)[3] for line in lines) + 4
    out = Image.new("RGB", (picture.width, picture.height + line_h * len(lines) + 4), (255, 255, 255))
    pen = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        pen.text((4, 4 + i * line_h), line, fill=(0, 0, 0))
    out.paste(picture, (0, line_h * len(lines) + 4))
    return out


def save_pictures(path: str, pictures: list[Any]) -> None:
    from tokprune.viz import side_by_side

    side_by_side(pictures).save(path)
    print(f"wrote {path} ({len(pictures)} labelled picture{'s' * (len(pictures) != 1)})")


def run_reference(args: argparse.Namespace) -> int:
    """Accuracy of the method (and of random, the floor) against the unpruned reference model on Shapes-VQA."""
    import torch
    from transformers.utils import logging as transformers_logging

    import tokprune
    from tokprune.data import ShapesVQA
    from tokprune.reference import load, read_meta
    from tokprune.reference.arch import GRID, image_size
    from tokprune.reference.evaluate import encode, family_of, predict
    from tokprune.viz import kept_picture, kept_text

    name = args.model or "llava-shapes"
    transformers_logging.disable_progress_bar()  # a 2 MB model loads in milliseconds: no "Loading weights" bar
    model, processor = load(name)
    family = family_of(model)
    method, why = choose_method(model, args.method)
    budget = budget_of(args, REFERENCE_KEEP_RATIO)
    meta = read_meta(name)
    samples = list(ShapesVQA("test", n=args.samples, types=tuple(meta["question_types"])))

    n_params = sum(p.numel() for p in model.parameters())
    say(f"tokprune {tokprune.__version__} demo: {name} (trained reference model, {n_params / 1e6:.2f}M "
        f"parameters), {args.samples} Shapes-VQA test samples")
    if why:
        say(f"method     : {method} ({why})")

    def score(answers: list[str]) -> float:
        return 100 * sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)

    runs = {}  # method -> (answers, kept indices per sample); the method first: a bad budget fails at once
    for label in [method] + (["random"] if method != "random" else []):  # each line as soon as it is known
        kept: list[torch.Tensor] = []
        with tokprune.pruned(model, label, **budget):
            runs[label] = (predict(model, processor, samples, kept=kept), kept)
        say(f"{label:<11}: accuracy {score(runs[label][0]):5.1f}% keeping {kept[0].numel()} of {GRID * GRID} "
            "visual tokens" + ("  (the floor: any method should beat it)" if label == "random" else ""))
    base = predict(model, processor, samples)
    say(f"unpruned   : accuracy {score(base):5.1f}%")
    answers, kept = runs[method]
    note = nothing_pruned_note(GRID * GRID, kept[0].numel())
    if note:
        print(note)

    pictures = []
    if args.show:
        print(f"kept tokens of {method} (# kept object, + kept background, o dropped object, . dropped background):")
    for s, k, a, b in zip(samples[: args.show], kept, answers, base):
        objects = s.scene.owners(GRID) > 0
        print(f"  {s.question} -> answer {s.answer}; unpruned {b}, {method} {a}")
        print("\n".join("    " + line for line in kept_text(k, GRID, objects).split("\n")))
        picture = kept_picture(s.image(image_size(family)), k, GRID)
        pictures.append(labelled(picture, [f"{name}: {method}, {k.numel()} of {GRID * GRID} kept", s.question,
                                           f"answer {s.answer}; unpruned {b}, {method} {a}"]))
    if args.save:
        save_pictures(args.save, pictures)

    with torch.no_grad():
        enc = encode(processor, family, samples[:8])
        ref = model(**enc).logits
        with tokprune.pruned(model, method, keep_ratio=1.0):
            full = model(**enc).logits
    agree = torch.equal(ref, full)
    print(f"keep-all   : keep_ratio=1.0, {GRID * GRID} -> {GRID * GRID}, logits "
          f"{'identical to' if agree else 'DIFFER from'} the unpruned model")
    return 0 if agree else 1


def say(line: str) -> None:
    """Print one line of the demo at once (flushed), so a slow machine shows each step as it is done."""
    print(line, flush=True)


def token_grid(model: Any, inputs: dict[str, Any], n_visual: int, family: str) -> tuple[int, int]:
    """(rows, cols) of the first image's LLM tokens, for drawing; ValueError where they are not one grid."""
    import math

    if "image_grid_thw" in inputs:  # Qwen: the patch grid after the spatial merger
        _, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        merge = model.config.vision_config.spatial_merge_size
        rows, cols = h // merge, w // merge
    else:
        rows = cols = math.isqrt(n_visual)
    if rows * cols != n_visual:
        raise ValueError(f"--save: the {n_visual} visual tokens of {family} are not one grid (anyres tiles), so "
                         "there is no picture to draw; use --save with another --family or a reference --model")
    return rows, cols


def run_tiny(args: argparse.Namespace) -> int:
    """Generate with and without pruning on a tiny random model; keep-all must reproduce the unpruned tokens."""
    import torch

    import tokprune
    from tokprune.testing import image_prompt, make_image, tiny_model
    from tokprune.viz import kept_picture

    model, proc = tiny_model(args.family)
    say(f"tokprune {tokprune.__version__} demo: tiny {args.family} ({sum(p.numel() for p in model.parameters())} "
        f"parameters, random weights), methods available: {', '.join(tokprune.methods())}")
    method, why = choose_method(model, args.method)
    budget = budget_of(args, TINY_KEEP_RATIO)
    image = make_image(seed=0)
    inputs = proc(images=image, text=image_prompt(proc), return_tensors="pt")
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with tokprune.pruned(model, method, **budget):  # first: a budget the image cannot meet fails at once
            out = model.generate(**inputs, **gen)[0, n_prompt:]
            rec = tokprune.last_record(model)
        n_vis, n_kept = rec.n_visual[0][0], rec.n_kept[0][0]
        grid = token_grid(model, inputs, n_vis, args.family) if args.save else None
        base = model.generate(**inputs, **gen)[0, n_prompt:]
        with tokprune.pruned(model, method, keep_ratio=1.0):
            full = model.generate(**inputs, **gen)[0, n_prompt:]
            n_all = tokprune.last_record(model).n_kept[0][0]
    agree = torch.equal(full, base)

    if why:
        print(f"method     : {method} ({why})")
    print(f"unpruned   : generated {base.tolist()}")
    stages = ", ".join(s.kind + ("" if s.layer is None else f"@{s.layer}") for s in rec.stages)
    print(f"{method:<11}: visual tokens {n_vis} -> {n_kept} (stages: {stages})")
    print(f"             kept indices {rec.kept[0][0].tolist()}")
    print(f"             generated {out.tolist()} ({'same as' if torch.equal(out, base) else 'differs from'} "
          "unpruned)")
    note = nothing_pruned_note(n_vis, n_kept)
    if note:
        print(note)
    print(f"keep-all   : keep_ratio=1.0, {n_vis} -> {n_all}, outputs {'identical to' if agree else 'DIFFER from'} "
          "the unpruned model")
    if grid is not None:
        picture = kept_picture(image, rec.kept[0][0], grid)
        save_pictures(args.save, [labelled(picture, [f"tiny {args.family}: {method}, {n_kept} of {n_vis} kept",
                                                     "random weights, random image"])])
    return 0 if agree else 1
