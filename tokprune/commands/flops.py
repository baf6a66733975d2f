"""``tokprune flops``: analytic FLOPs of a model at a pruning budget, part by part, against the unpruned model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tokprune.commands import args as types
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
    p.add_argument("--method", help="an implemented method (tokprune.methods(): decides where tokens are dropped); "
                                    "a planned method's schedule is counted with --stages")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=types.positive_int, help="visual tokens kept per image")
    budget.add_argument("--keep-ratio", type=types.kept_fraction, help="fraction of visual tokens kept, in (0, 1]")
    p.add_argument("--layer", type=types.nonneg_int,
                   help="with --method: the method's own `layer` option (fastv: K, default 2); without: the 0-indexed "
                        "LLM layer before which the budget is cut (default 0)")
    p.add_argument("--option", type=types.method_option, action="append", default=[], metavar="KEY=VALUE",
                   help="with --method: one of its keyword options, KEY=VALUE, repeatable, typed as in Python "
                        "(layer=3, layers=8,16,24, flops_ratio=0.5)")
    p.add_argument("--stages", type=types.stages,
                   help="explicit schedule LAYER:KEPT,... (KEPT a count or a fraction like 0.5), e.g. PyramidDrop's "
                        "8:0.5,16:0.25,24:0.125")
    p.add_argument("--convention", choices=CONVENTIONS, default="full", help="what to count (default: full)")
    p.add_argument("--n-text", type=types.nonneg_int, default=DEFAULT_N_TEXT,
                   help="non-image prompt tokens (default: 64)")
    p.add_argument("--images", type=types.positive_int, default=1, help="images per prompt")
    p.add_argument("--image-size", type=types.image_size,
                   help="HxW of the images (LLaVA-NeXT, Qwen); default per family")
    p.add_argument("--decode-steps", type=types.nonneg_int, default=0,
                   help="add this many decode steps (full convention)")
    p.add_argument("--json", help="also write the result as JSON to this path")
    p.set_defaults(func=run)
    return p


def check(args: argparse.Namespace) -> None:
    """Everything argparse cannot check alone, before any counting: the config exists, the method is implemented,
    a budget or schedule is given, and the ``--json`` file can be written."""
    types.check_config(args.config, args.image_size)
    if args.method is not None:
        types.check_methods([args.method], "--method", hint=" (planned ones are listed in docs/methods.md; count any "
                            "schedule with --stages, e.g. --stages 8:0.5,16:0.25,24:0.125)")
    if args.option and args.method is None:
        raise ValueError("--option sets an option of --method; pass --method too")
    args.options = types.check_method_options([args.method] if args.method else [], args.option)
    if args.layer is not None and args.method is not None:
        if "layer" in args.options:
            raise ValueError("--layer and --option layer=... say the same thing; pass one")
        args.options["layer"] = args.layer
    has_budget = args.keep is not None or args.keep_ratio is not None or "flops_ratio" in args.options
    if args.stages is not None and (has_budget or args.method is not None or args.layer is not None):
        raise ValueError("--stages is the whole schedule: pass it without --method, --keep, --keep-ratio and --layer")
    needs_budget = args.method is None or default_budget(args.method, args.options) is None
    if args.stages is None and not has_budget and needs_budget:
        own = "" if args.method is None else f" (--method {args.method} has no default budget)"
        raise ValueError(f"pass a budget{own}: --method M with --keep N or --keep-ratio R (e.g. --method fastv --keep "
                         "192), or an explicit schedule --stages LAYER:KEPT,...")
    if args.decode_steps and args.convention != "full":
        raise ValueError(f"--decode-steps is counted by --convention full only ({args.convention} counts the prefill "
                         "of visual tokens); drop one of them")
    if args.json:
        types.check_writable(args.json, "--json")


def default_budget(method: str, options: dict[str, Any] | None = None) -> float | None:
    """The kept fraction ``method`` (with its ``options``; family options aside) runs without a budget
    (``tokprune.apply`` does the same: PyramidDrop's, TransPrune's and VFlowOpt's papers give a schedule, CATP's
    ``prune_ratio`` is one), or None when it needs one."""
    import dataclasses

    from tokprune.api import make_pruner
    from tokprune.registry import get_method

    own = {f.name for f in dataclasses.fields(get_method(method))}
    pruner = make_pruner(method, {k: v for k, v in (options or {}).items() if k in own})
    return getattr(pruner, "default_keep_ratio", lambda: None)()


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
    """Check the arguments, then compute and print; a bad argument raises (``tokprune.cli`` makes it one line)."""
    from tokprune.api import schedule  # torch and transformers: only once the arguments are checked
    from tokprune.configs import load

    check(args)
    config = load(args.config)
    if args.stages is not None:
        budget: dict[str, Any] = dict(stages=args.stages)
    elif args.method is not None:  # the method's own schedule: what tokprune.apply runs
        budget = dict(schedule=schedule(config, args.method, keep=args.keep, keep_ratio=args.keep_ratio,
                                        image_size=args.image_size, **args.options))
    else:
        budget = dict(keep=args.keep, keep_ratio=args.keep_ratio, layer=args.layer or 0)
    report = for_budget(config, **budget, n_text=args.n_text, n_images=args.images, image_size=args.image_size,
                        convention=args.convention, decode_steps=args.decode_steps)
    if args.stages:
        budget = "stages=" + ",".join(f"{lay}:{kept}" for lay, kept in args.stages)
    elif args.keep is not None or args.keep_ratio is not None:
        budget = f"keep={args.keep}" if args.keep is not None else f"keep_ratio={args.keep_ratio}"
    else:
        budget = "no budget: the method's default schedule (as tokprune.apply runs it)"
    if args.option:
        budget += "  " + " ".join(f"{k}={v}" for k, v in args.option)
    title = f"{args.config}  method={args.method or '-'}  {budget}  convention={args.convention}"
    print(format_report(report, title))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            stages = None if args.stages is None else [list(s) for s in args.stages]
            json.dump({"config": args.config, "method": args.method, "keep": args.keep, "keep_ratio": args.keep_ratio,
                       "layer": args.layer, "options": dict(args.option), "stages": stages, "n_text": args.n_text,
                       "images": args.images,
                       "pruned": report.as_dict(), "unpruned": report.baseline.as_dict()}, f, indent=2)
    return 0
