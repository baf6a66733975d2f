"""``tokprune show``: one PNG (or SVG) of the tokens each method keeps on one image, methods x budgets.

    tokprune show                                            # llava-shapes on a Shapes-VQA test image, offline
    tokprune show --image cat.jpg --model llava-hf/llava-1.5-7b-hf --methods cls,fastv --keep 64,32 --out kept.png

``--model``: a shipped reference model (``llava-shapes``, ``qwen2vl-shapes``), ``tiny:<family>`` (a tiny random
model, for smoke tests), a local directory or a hub id. Without ``--image`` the picture uses a Shapes-VQA test image
and its question.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokprune.commands.args import method_option

DEFAULT_MODEL = "llava-shapes"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show", help="draw which visual tokens each method keeps on one image (methods x budgets)",
        description="Run each method at each budget once on one image and write one picture: a row per method, a "
                    "column per budget, kept cells outlined, pruned ones dimmed, each cell titled with the model's "
                    "answer. Offline by default (llava-shapes on a Shapes-VQA test image).")
    p.add_argument("--image", default=None, help="image file (default: a Shapes-VQA test image)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="reference model name, tiny:<family>, local directory or hub id (default: llava-shapes)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every registered method the model supports)")
    p.add_argument("--keep", default=None,
                   help="comma-separated budgets per image: token counts (64,32) or kept fractions (0.25); "
                        "default 0.25,0.125")
    p.add_argument("--option", type=method_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the method(s), KEY=VALUE, repeatable, typed as in Python (layer=3, "
                        "positions=original, layers=8,16,24, scaled=true); the same for every method listed")
    p.add_argument("--question", default=None, help="question asked with the image (default: the sample's)")
    p.add_argument("--sample", type=int, default=0, help="Shapes-VQA test sample used without --image")
    p.add_argument("--size", type=int, default=160, help="pixels per image panel (long side)")
    p.add_argument("--scores", action="store_true", help="overlay each method's token scores (heat-map)")
    p.add_argument("--out", default="kept.png", help="output file, .png or .svg (default: kept.png)")
    p.set_defaults(func=run)


def load_model(name: str) -> tuple[Any, Any, str | None]:
    """``(model, processor, reference family or None)`` for a ``--model`` value."""
    from pathlib import Path

    from tokprune.reference import NAMES, load, read_meta

    if name.startswith("tiny:"):
        from tokprune.testing import tiny_model

        return (*tiny_model(name[len("tiny:"):]), None)
    if name in NAMES or (Path(name) / "reference.json").exists():
        model, processor = load(name)
        return model, processor, read_meta(name)["family"]
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokprune import hub

    try:
        processor = hub.load(AutoProcessor.from_pretrained, name)
        model = hub.load(AutoModelForImageTextToText.from_pretrained, name).eval()
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"--model {name}: cannot load it ({first}); pass a reference model ({', '.join(NAMES)}), "
                      "tiny:<family>, a local directory or a hub id reachable from here") from err
    return model, processor, None


def default_methods(model: Any) -> list[str]:
    """Every registered method that applies to ``model`` (the others raise UnsupportedError at apply)."""
    import tokprune

    out = []
    for m in tokprune.methods():
        try:
            tokprune.apply(model, m, keep_ratio=0.5)
        except tokprune.UnsupportedError:
            continue
        finally:
            tokprune.remove(model)
        out.append(m)
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tokprune.commands.args import check_method_options, check_methods, check_writable, split_list
    from tokprune.data import ShapesVQA
    from tokprune.data.images import open_rgb
    from tokprune.reference.arch import image_size
    from tokprune.reference.text import prompt
    from tokprune.viz import budget_of, compare, save

    # every argument is checked before the model loads
    budgets = [budget_of(b) for b in split_list(args.keep or "0.25,0.125", "--keep")]
    if any(b.get("keep", 1) < 1 for b in budgets):
        raise ValueError(f"--keep {args.keep}: a token count must be >= 1 (or pass a kept fraction, e.g. 0.25)")
    if len({tuple(b.items()) for b in budgets}) < len(budgets):
        raise ValueError(f"--keep {args.keep}: a budget is listed twice; list each once")
    methods = split_list(args.methods, "--methods") if args.methods else None
    if methods:
        check_methods(methods, option="--methods")
    if args.option and not args.methods:
        raise ValueError("--option needs --methods: the default is every method, and each takes its own options")
    options = check_method_options(methods or [], args.option)
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    if Path(args.out).suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"--out {args.out}: the picture is written as .png or .svg; name the file so")
    check_writable(args.out, "--out")
    image = open_rgb(args.image, f"--image {args.image}") if args.image is not None else None  # before the model
    model, processor, ref_family = load_model(args.model)
    methods = methods or default_methods(model)
    if image is not None:
        question = args.question or "what is in the image ?"
    else:
        sample = ShapesVQA("test", n=args.sample + 1)[args.sample]
        size = image_size(ref_family) if ref_family else 256
        image, question = sample.image(size), args.question or sample.question
    text = prompt(ref_family, question) if ref_family else None
    budget_values = [b.get("keep", b.get("keep_ratio")) for b in budgets]
    pic = compare(model, processor, image, methods, budget_values, question=question, text=text, size=args.size,
                  scores=args.scores, **options)
    path = save(pic, args.out)
    print(f"wrote {path} ({pic.width}x{pic.height}): {', '.join(methods)} x "
          f"{', '.join(str(v) for v in budget_values)} on {args.model}")
    return 0
