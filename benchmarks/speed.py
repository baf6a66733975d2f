"""Prefill speed-up of every method x budget against the unpruned model, in one run, with the analytic bound, the
method's scoring + selection cost and the vision encoder's time (``tokprune.eval.speed``), optionally on a
depth-reduced real-width proxy (``--llm-layers``/``--vision-layers``), plus one profiled prefill per method kind.

    python benchmarks/speed.py --config llava-1.5-7b --llm-layers 4 --keep 192,128,64 --n-text 95 \\
        --budget-s 330 --profile --out benchmarks/results/cpu-<name>

writes ``<out>/speed-<config>.{json,md}`` and, with ``--profile``, ``<out>/profile-<config>.md`` and gzipped
Chrome traces ``<out>/trace-<config>-<method>.json.gz`` (one pruned prefill of the first vision-stage method and of
the first LLM-stage method, at the smallest budget). ``benchmarks/cpu.sh`` and ``benchmarks/gpu.sh`` call it.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokprune  # noqa: E402
from tokprune import configs  # noqa: E402
from tokprune.eval import bench, speed  # noqa: E402
from tokprune.eval.profile import profile_prefill  # noqa: E402
from tokprune.eval.proxy import reduce_depth  # noqa: E402


def _list(text: str | None, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    h, w = text.lower().split("x")
    return int(h), int(w)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--llm-layers", type=int)
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--methods", help="comma-separated (default: every registered method but --icl-methods)")
    p.add_argument("--icl-methods", default="catp",
                   help="methods built for few-shot prompts, timed on their own --icl-images-image prompt (written "
                        "as speed-<tag>-icl; '' for none)")
    p.add_argument("--icl-images", type=int, default=5, help="images of the few-shot prompt (5 = 4 shots + query)")
    p.add_argument("--keep", help="visual tokens kept per image, comma-separated")
    p.add_argument("--keep-ratio", help="kept fractions, comma-separated")
    p.add_argument("--n-text", type=int, default=95, help="non-image prompt tokens (95 = LLaVA's 35 + 60)")
    p.add_argument("--image-size", help="HxW (Qwen, LLaVA-NeXT)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, help="stop adding rounds (past --min-repeats) at this many seconds")
    p.add_argument("--icl-budget-s", type=float, help="--budget-s of the few-shot run")
    p.add_argument("--warmup", type=int, default=1, help="untimed unpruned prefills first")
    p.add_argument("--profile", action="store_true", help="also profile one pruned prefill per method kind")
    p.add_argument("--tag", help="name of the output files (default: the config name, + -b<batch> when > 1)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if not args.keep and not args.keep_ratio:
        p.error("pass --keep and/or --keep-ratio")
    return args


def method_lists(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(methods of the single-image run, few-shot methods run on their own prompt): by default every registered
    method (``tokprune.methods()``, so a new method is timed without edits here or in cpu.sh / gpu.sh)."""
    icl = [m for m in _list(args.icl_methods, str) if m in tokprune.methods()]
    return _list(args.methods, str) or [m for m in tokprune.methods() if m not in icl], icl


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    full = configs.load(args.config)
    config, depth = reduce_depth(full, args.llm_layers, args.vision_layers)
    name = args.config if args.config in configs.names() else Path(args.config).stem
    tag = args.tag or (name + (f"-b{args.batch}" if args.batch > 1 else ""))
    out = Path(args.out)
    print(f"[speed] {args.config}: {depth.label()}, {dtype}, {device}; building the random-weight model",
          file=sys.stderr, flush=True)
    model = configs.build_model(config, device, dtype)
    methods, icl = method_lists(args)
    cases = bench.grid(methods, _list(args.keep, int), _list(args.keep_ratio, float))
    prompt = bench.Prompt(args.n_text, 1, args.batch, _size(args.image_size))
    report = speed.run(model, cases, prompt, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                       budget_s=args.budget_s, warmup=args.warmup, full_config=full, depth=depth,
                       meta={"model": name, "peak_rss_gib": None})
    if icl and not args.methods and args.icl_images > 1:
        _icl_run(model, args, icl, full, depth, name, out, tag)
    if args.profile:
        report.meta["profiles"] = _profiles(model, report, prompt, out, tag)
    report.meta["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if device.type == "cuda":
        report.meta["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for path in report.write(out, f"speed-{tag}"):
        print(f"[speed] wrote {path}", file=sys.stderr)
    print(report.to_markdown())
    return 1 if report.rows[0].error else 0


def _icl_run(model: torch.nn.Module, args: argparse.Namespace, icl: list[str], full: object, depth: object,
             name: str, out: Path, tag: str) -> None:
    """The few-shot methods (CATP) on their own prompt: ``--icl-images`` images per sample, same budgets, next to
    the unpruned model on that prompt (round-robin, same rounds and budget rules)."""
    cases = bench.grid(icl, _list(args.keep, int), _list(args.keep_ratio, float))
    prompt = bench.Prompt(args.n_text, args.icl_images, args.batch, _size(args.image_size))
    report = speed.run(model, cases, prompt, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                       budget_s=args.icl_budget_s, warmup=0, full_config=full, depth=depth,
                       meta={"model": f"{name}, {args.icl_images}-image few-shot prompt"})
    for path in report.write(out, f"speed-{tag}-icl"):
        print(f"[speed] wrote {path}", file=sys.stderr)
    print(report.to_markdown())


def _profiles(model: torch.nn.Module, report: speed.SpeedReport, prompt: bench.Prompt, out: Path,
              tag: str) -> list[dict[str, str]]:
    """Profile the first method of each kind (vision, llm) at its smallest budget; write one markdown file."""
    chosen: dict[str, speed.SpeedRow] = {}
    for row in report.rows[1:]:
        if row.error or row.kind is None:
            continue
        best = chosen.get(row.kind)
        size = row.visual_tokens or 0
        if best is None or (best.method == row.method and size < (best.visual_tokens or 0)):
            chosen[row.kind] = row
    param = next(model.parameters())
    inputs = configs.example_inputs(model.config, n_text=prompt.n_text, batch=prompt.batch,
                                    image_size=prompt.image_size, device=param.device, dtype=param.dtype)
    parts = [f"## where the time goes: {report.meta['model']}", "",
             f"{(report.meta.get('depth') or {}).get('label', '')}; one pruned prefill per method kind, at the "
             "smallest budget, after one warm-up prefill.", ""]
    for kind, row in sorted(chosen.items()):
        print(f"[speed] profiling {row.label} ({kind} stage)", file=sys.stderr, flush=True)
        summary = profile_prefill(model, inputs, row.method, keep=row.keep, keep_ratio=row.keep_ratio,
                                  trace=out / f"trace-{tag}-{row.method}.json")
        parts.append(f"{kind} stage:\n\n" + summary.to_markdown())
    path = out / f"profile-{tag}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    print(f"[speed] wrote {path}", file=sys.stderr)
    return [{"kind": k, "case": r.label} for k, r in sorted(chosen.items())]


if __name__ == "__main__":
    raise SystemExit(main())
