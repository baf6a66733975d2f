"""``tokprune bench``: latency, throughput and memory of methods x budgets on a random-weight model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokprune.flops import DEFAULT_N_TEXT

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="latency / memory of methods x budgets (random weights)",
        description="Build a random-weight model from a config and measure prefill latency, time to first token, "
                    "decode throughput, peak memory, KV-cache size and selection time for each method x budget, "
                    "against the unpruned model in the same run. Prints a markdown table; --out writes JSON + "
                    "markdown.",
    )
    p.add_argument("--config", required=True, help="shipped config name (e.g. llava-1.5-7b, tiny-llava) or a path")
    p.add_argument("--methods", help="comma-separated methods (default: every registered method)")
    p.add_argument("--keep", help="comma-separated visual tokens kept per image, e.g. 192,128,64")
    p.add_argument("--keep-ratio", help="comma-separated kept fractions, e.g. 0.5,0.25")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default: sdpa)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-text", type=int, default=DEFAULT_N_TEXT, help="non-image prompt tokens per sample")
    p.add_argument("--images", type=int, default=1, help="images per sample")
    p.add_argument("--image-size", help="HxW of the images (LLaVA-NeXT, Qwen); default per family")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated for the decode measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-layers", type=int, help="depth-reduced proxy: build only the first N decoder layers "
                   "(real widths; the table says so and its TFLOPs are those of the reduced model)")
    p.add_argument("--vision-layers", type=int, help="depth-reduced proxy: only the first M vision-encoder layers")
    p.add_argument("--out", help="write bench.json + bench.md into this directory (or NAME.json + NAME.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _list(text: str | None, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit code 2 on bad arguments, 1 when the unpruned model itself fails."""
    import torch

    import tokprune
    from tokprune import configs
    from tokprune.commands.flops import parse_size
    from tokprune.eval import bench
    from tokprune.eval.proxy import reduce_depth

    try:
        keeps, ratios = _list(args.keep, int), _list(args.keep_ratio, float)
        if not keeps and not ratios:
            raise ValueError("pass --keep and/or --keep-ratio")
        methods = _list(args.methods, str) or list(tokprune.methods())
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        config, depth = reduce_depth(configs.load(args.config), args.llm_layers, args.vision_layers)
        model = configs.build_model(config, device, dtype, attn_implementation=args.attn, seed=args.seed)
        prompt = bench.Prompt(args.n_text, args.images, args.batch, parse_size(args.image_size))
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as e:
        print(f"tokprune bench: error: {e}", file=sys.stderr)
        return 2
    report = bench.run(model, bench.grid(methods, keeps, ratios), prompt, new_tokens=args.new_tokens,
                       warmup=args.warmup, repeats=args.repeats, progress=not args.no_progress,
                       meta={"model": str(args.config), "seed": args.seed, "depth": depth.as_dict()})
    print(report.to_markdown())
    if args.out:
        for path in report.write(args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if report.results[0].error else 0
