"""``tokprune flops``: analytic FLOPs of a model at a pruning budget, part by part, against the unpruned model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tokprune.api import schedule
from tokprune.configs import load
from tokprune.flops import CONVENTIONS, DEFAULT_N_TEXT, FlopsReport, for_budget

_UNITS = {"full": "FLOPs, whole model, all tokens", "3ndm": "paper convention, MACs, visual tokens only",
          "2ndm": "FastV convention, MACs, visual tokens only"}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``flops`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "flops", help="analytic FLOPs of a model at a pruning budget",
        description="Print the analytic FLOPs (TFLOPs) of each part of a model at a visual-token budget and the "
                    "ratio to the unpruned model. No weights are needed.",
    )
    p.add_argument("--config", required=True, help="shipped config name (e.g. llava-1.5-7b) or a local path")
    p.add_argument("--method", help="a registered method (its schedule decides where tokens are dropped; "
                                    "see `tokprune.methods()`); none: one cut before --layer")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens kept per image")
    budget.add_argument("--keep-ratio", type=float, help="fraction of visual tokens kept, in (0, 1]")
    p.add_argument("--layer", type=int, help="without --method: 0-indexed LLM layer before which tokens are "
                                            "dropped (default 0); with one: the method's own `layer` option")
    p.add_argument("--stages", help="explicit schedule 'layer:kept,...'; kept is a count or a fraction like 0.5")
    p.add_argument("--convention", choices=CONVENTIONS, default="full", help="what to count (default: full)")
    p.add_argument("--n-text", type=int, default=DEFAULT_N_TEXT, help="non-image prompt tokens (default: 64)")
    p.add_argument("--images", type=int, default=1, help="images per prompt")
    p.add_argument("--image-size", help="HxW of the images (LLaVA-NeXT, Qwen); default per family")
    p.add_argument("--decode-steps", type=int, default=0, help="add this many decode steps (full convention)")
    p.add_argument("--json", help="also write the result as JSON to this path")
    p.set_defaults(func=run)
    return p


def _stages(text: str) -> list[tuple[int, float | int]]:
    out: list[tuple[int, float | int]] = []
    for item in text.split(","):
        layer, _, kept = item.partition(":")
        out.append((int(layer), float(kept) if "." in kept else int(kept)))
    return out


def parse_size(text: str | None) -> tuple[int, int] | None:
    """"HxW" -> (H, W); None or "" -> None."""
    if not text:
        return None
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def format_report(report: FlopsReport, title: str) -> str:
    """A plain-text table of a report's parts, with its baseline and the ratio when attached."""
    base = report.baseline
    lines = [title, f"{'part':<14}{'unpruned':>12}{'pruned':>12}{'ratio':>9}   (T, {_UNITS[report.convention]})"]
    for part, value in report.parts().items():
        if (report.convention != "full" and part != "total") or (part == "decode" and not report.decode_steps):
            continue
        b = base.parts()[part] if base is not None else value
        ratio = f"{value / b:.1%}" if b else "-"
        lines.append(f"{part:<14}{b / 1e12:>12.3f}{value / 1e12:>12.3f}{ratio:>9}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Compute and print; exit code 2 on a bad argument."""
    try:
        stages = _stages(args.stages) if args.stages else None
        config = load(args.config)
        size = parse_size(args.image_size)
        budget: dict[str, Any] = dict(keep=args.keep, keep_ratio=args.keep_ratio, layer=args.layer or 0)
        if args.method is not None:
            if stages is not None:
                raise ValueError("pass either --method or --stages: a method's schedule decides its stages")
            if args.keep is None and args.keep_ratio is None:
                raise ValueError(f"pass --keep or --keep-ratio for method {args.method!r}")
            options = {"layer": args.layer} if args.layer is not None else {}
            budget = dict(schedule=schedule(config, args.method, keep=args.keep, keep_ratio=args.keep_ratio,
                                            image_size=size, **options))
        elif stages is not None:
            budget = dict(stages=stages)
        report = for_budget(config, **budget, n_text=args.n_text, n_images=args.images, image_size=size,
                            convention=args.convention, decode_steps=args.decode_steps)
    except (ValueError, FileNotFoundError, NotImplementedError, TypeError) as e:
        print(f"tokprune flops: error: {e}", file=sys.stderr)
        return 2
    if args.stages:
        budget = f"stages={args.stages}"
    elif args.keep is not None or args.keep_ratio is not None:
        budget = f"keep={args.keep}" if args.keep is not None else f"keep_ratio={args.keep_ratio}"
    else:
        budget = "preset schedule"
    title = f"{args.config}  method={args.method or '-'}  {budget}  convention={args.convention}"
    print(format_report(report, title))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": args.config, "method": args.method, "keep": args.keep, "keep_ratio": args.keep_ratio,
                       "layer": args.layer, "stages": args.stages, "n_text": args.n_text, "images": args.images,
                       "pruned": report.as_dict(), "unpruned": report.baseline.as_dict()}, f, indent=2)
    return 0
