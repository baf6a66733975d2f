"""``tokprune eval``: accuracy against FLOPs for methods x budgets on offline or lmms-eval tasks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokprune.commands.args import method_option
from tokprune.commands.bench import DTYPES


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="accuracy vs FLOPs of methods x budgets on offline or lmms-eval tasks",
        description="Run a grid of pruning methods x budgets (plus the unpruned model and the random and downsample "
                    "baselines) on tasks, and write results.json, results.md (the papers' table) and the Pareto "
                    "plot pareto.png/.svg into --out. Tasks: shapes, shapes_<type>, a local data set path "
                    "(save_to_disk, parquet, folder with data.jsonl) or lmms-eval task names (pip install "
                    "'tokprune[eval]' and lmms-eval). Exit code 0: every cell ran; 1: some cell failed (recorded "
                    "in the results); 2: bad arguments.",
    )
    p.add_argument("--model", required=True,
                   help="llava-shapes, qwen2vl-shapes (shipped reference models), a hub id or a local directory")
    p.add_argument("--tasks", required=True, help="comma-separated tasks")
    p.add_argument("--methods", default="", help="comma-separated methods (random and downsample always run)")
    p.add_argument("--keep", help="comma-separated visual tokens kept per image, e.g. 192,128,64")
    p.add_argument("--keep-ratio", help="comma-separated kept fractions, e.g. 0.5,0.25,0.125")
    p.add_argument("--flops-ratio", help="comma-separated FLOPs targets, for methods that take flops_ratio")
    p.add_argument("--option", type=method_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the listed methods (not of the baselines), KEY=VALUE, repeatable, typed "
                        "as in Python (layer=3, positions=original); it joins each cell's key")
    p.add_argument("--no-baselines", action="store_true", help="leave out the random and downsample baselines")
    p.add_argument("--out", required=True, help="run directory (results.json, results.md, pareto.png/.svg)")
    p.add_argument("--limit", type=int, help="first N samples of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default: sdpa)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", help="prompt with {question} and <image>, for processors without a chat template")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default: 1 for reference models, else 16)")
    p.add_argument("--include-path", help="folder of extra lmms-eval task YAMLs (lmms-eval's --include_path)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: finished cells are not re-run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _list(text: str | None, kind: type, flag: str) -> list[Any]:
    """The items of a comma-separated option; an empty or a repeated item is an error (``--keep 8,8``,
    ``--methods cls,``)."""
    from tokprune.commands.args import split_list

    if not text:
        return []
    try:
        items = [kind(x) for x in split_list(text, flag)]
    except ValueError as e:
        raise ValueError(f"{flag}: {e}" if not str(e).startswith(flag) else str(e)) from e
    if len(set(items)) < len(items):  # 0.5 and .5 are one budget
        raise ValueError(f"{flag} {text!r}: a value is listed twice; list each once")
    return items


def spec_from_args(args: argparse.Namespace) -> Any:
    lists = dict(tasks=_list(args.tasks, str, "--tasks"), methods=_list(args.methods, str, "--methods"),
                 keeps=_list(args.keep, int, "--keep"), keep_ratios=_list(args.keep_ratio, float, "--keep-ratio"),
                 flops_ratios=_list(args.flops_ratio, float, "--flops-ratio"))  # checked before torch is imported
    import torch

    from tokprune.eval.grid import GridSpec

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GridSpec(
        model=args.model, **lists, baselines=not args.no_baselines,
        limit=args.limit, batch_size=args.batch_size, device=device,
        dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), attn=args.attn,
        seed=args.seed, template=args.template, max_new_tokens=args.max_new_tokens, include_path=args.include_path,
        options=_options(args))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from tokprune.commands.args import check_method_options
    from tokprune.registry import get_method, is_import_path

    methods = _list(args.methods, str, "--methods")
    for m in methods:
        if is_import_path(m) and m not in _registered():
            get_method(m)  # a user's Pruner class: imported (and registered) now, so its options are known
    if args.option and not methods:
        raise ValueError("--option sets options of the --methods; pass --methods too")
    return check_method_options([m for m in methods if m in _registered()], args.option)


def _registered() -> list[str]:
    import tokprune

    return tokprune.methods()


def run(args: argparse.Namespace) -> int:
    """Run the grid; exit 2 on bad arguments (before any model loads), 1 when a cell failed, else 0."""
    try:
        spec = spec_from_args(args)  # list errors first, before torch and the grid's modules are imported
        from tokprune.eval import runner

        result = runner.run(spec, args.out, resume=args.resume, progress=not args.no_progress)
    except ValueError as e:  # EvalArgumentError included
        print(f"tokprune eval: error: {e}", file=sys.stderr)
        return 2
    print(open(f"{args.out}/results.md", encoding="utf-8").read())
    print(f"tokprune eval: {len(result.ran)} cell(s) run, {len(result.skipped)} already done; results in {args.out}",
          file=sys.stderr)
    if result.failed:
        print(f"tokprune eval: {len(result.failed)} cell(s) failed: {', '.join(result.failed)}", file=sys.stderr)
        return 1
    return 0
