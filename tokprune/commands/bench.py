"""``tokprune bench``: latency, throughput and memory of methods x budgets on a random-weight model.

Exit codes: 0 when every case ran, 1 when any requested case failed (its row says why), 2 for bad arguments
(checked before the model is built: config, methods, budgets, device, free memory, output path).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokprune.commands import args as types
from tokprune.flops import DEFAULT_N_TEXT

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "bench", help="latency / memory of methods x budgets (random weights)",
        description="Build a random-weight model from a config and measure prefill latency, time to first token, "
                    "decode throughput, peak memory, KV-cache size and selection time for each method x budget, "
                    "against the unpruned model in the same run. Prints a markdown table; --out writes JSON + "
                    "markdown. Exit code 1 when any case failed, 2 on bad arguments.",
    )
    p.add_argument("--config", required=True, help="shipped config name (e.g. llava-1.5-7b, tiny-llava) or a path")
    p.add_argument("--methods", type=types.comma_list(str, "method names"),
                   help="comma-separated methods (default: every registered method)")
    p.add_argument("--keep", type=types.comma_list(types.positive_int, "token counts"),
                   help="comma-separated visual tokens kept per image, e.g. 192,128,64")
    p.add_argument("--keep-ratio", type=types.comma_list(types.kept_fraction, "kept fractions"),
                   help="comma-separated kept fractions, e.g. 0.5,0.25")
    p.add_argument("--option", type=types.method_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword option of the method(s), KEY=VALUE, repeatable, typed as in Python (layer=3, "
                        "positions=original, layers=8,16,24, scaled=true); the same for every method listed")
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default: sdpa)")
    p.add_argument("--batch", type=types.positive_int, default=1)
    p.add_argument("--n-text", type=types.nonneg_int, default=DEFAULT_N_TEXT, help="non-image prompt tokens per sample")
    p.add_argument("--images", type=types.positive_int, default=1, help="images per sample")
    p.add_argument("--image-size", type=types.image_size,
                   help="HxW of the images (LLaVA-NeXT, Qwen); default per family")
    p.add_argument("--new-tokens", type=types.positive_int, default=16,
                   help="tokens generated for the decode measurement (>= 2)")
    p.add_argument("--warmup", type=types.nonneg_int, default=1)
    p.add_argument("--repeats", type=types.positive_int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llm-layers", type=int, help="depth-reduced proxy: build only the first N decoder layers "
                   "(real widths; the table says so and its TFLOPs are those of the reduced model)")
    p.add_argument("--vision-layers", type=int, help="depth-reduced proxy: only the first M vision-encoder layers")
    p.add_argument("--out", help="write bench.json + bench.md into this directory (or NAME.json + NAME.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def check(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """Validate everything before a weight is allocated, in the order a user fixes things (config first);
    returns the (config, depth, device, dtype) to build: the config depth-reduced when ``--llm-layers`` /
    ``--vision-layers`` ask for a proxy. Raises ValueError / OSError naming the argument."""
    import torch

    from tokprune import configs
    from tokprune.commands.memory import check_fits
    from tokprune.eval.proxy import reduce_depth

    config = types.check_config(args.config, args.image_size)
    try:
        config, depth = reduce_depth(config, args.llm_layers, args.vision_layers)
    except ValueError as e:
        raise ValueError(f"--llm-layers / --vision-layers: {e}") from None
    if not args.keep and not args.keep_ratio:
        raise ValueError("pass a budget: --keep N[,N...] and/or --keep-ratio R[,R...] (e.g. --keep 192,64)")
    if args.methods:
        types.check_methods(args.methods, "--methods")
    if args.option and not args.methods:
        raise ValueError("--option needs --methods: the default is every method, and each takes its own options")
    args.options = types.check_method_options(args.methods or [], args.option)
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 to measure decoding (the first is TTFT), got {args.new_tokens}")
    device = _device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.out:
        types.check_writable(args.out, "--out", make_folders=True)
    # the prompt's geometry (text tokens around the images, image size) must suit the config: build one on the CPU
    try:
        configs.example_inputs(config, n_text=args.n_text, n_images=args.images, batch=1, image_size=args.image_size)
    except ValueError as e:
        raise ValueError(f"the prompt (--n-text, --images, --image-size) does not suit {args.config}: {e}") from None
    check_fits(config, args.config, device, dtype)  # the model that will be built (the proxy, if reduced)
    return config, depth, device, dtype


def _device(text: str | None) -> Any:
    """The torch device of ``--device`` (default: cuda when available), refused when this machine lacks it."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: expected cpu, cuda or cuda:INDEX") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "has no CUDA" if not torch.version.cuda else "sees no CUDA device"
            raise ValueError(f"--device {text}: this torch ({torch.__version__}) {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
    elif device.type != "cpu":
        raise ValueError(f"--device {text!r}: tokprune bench runs on cpu or cuda")
    return device


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit code 1 when any requested case failed (bad arguments raise before any work)."""
    import tokprune
    from tokprune import configs
    from tokprune.eval import bench

    config, depth, device, dtype = check(args)
    methods = args.methods or list(tokprune.methods())
    prompt = bench.Prompt(args.n_text, args.images, args.batch, args.image_size)
    model = configs.build_model(config, device, dtype, attn_implementation=args.attn, seed=args.seed)
    report = bench.run(model, bench.grid(methods, args.keep or [], args.keep_ratio or [], args.options), prompt,
                       new_tokens=args.new_tokens, warmup=args.warmup, repeats=args.repeats,
                       progress=not args.no_progress,
                       meta={"model": str(args.config), "seed": args.seed, "depth": depth.as_dict()})
    print(report.to_markdown())
    if args.out:
        for path in report.write(args.out):
            print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in report.results if r.error]
    for r in failed:
        print(f"tokprune bench: case {r.label!r} failed: {r.error}", file=sys.stderr)
    if failed:
        print(f"tokprune bench: {len(failed)} of {len(report.results)} cases failed (exit code 1)", file=sys.stderr)
    return 1 if failed else 0
