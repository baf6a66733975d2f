"""Benchmark tokprune.kernels (Triton) against the plain PyTorch chain over realistic pruning shapes.

For each shape (batch B, tokens N, hidden D, keep k) it times, per call:
  select  : kernel select_topk       vs  scores.topk(k).indices.sort()
  gather  : kernel gather_tokens     vs  torch.gather on the expanded index
  prune   : kernel prune (no merge)  vs  topk + sort + gather
  merge   : kernel merge_tokens      vs  index_add_ of w*x and w, then divide (k targets, every token assigned)
  nearest : kernel prune("nearest")  vs  the PyTorch reference of the same (tokprune.kernels.reference)
Times are medians over repeats measured with CUDA events after warm-up. Results go to JSON and markdown, with the
device name. Without CUDA the script says so and exits 0; ``--cpu`` instead times the PyTorch reference against the
chain at one small size (useful only to check that the script runs).

Usage: python benchmarks/kernel_speed.py [--out benchmarks/results] [--dtype bf16] [--repeats 50] [--warmup 10]
       [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokprune.kernels import reference  # noqa: E402

# (B, N, D, k, what it stands for)
SHAPES = [
    (1, 576, 1024, 64, "LLaVA-1.5 CLIP-L/336 features, keep 64"),
    (1, 576, 4096, 192, "LLaVA-1.5 projected tokens, keep 192"),
    (16, 576, 4096, 128, "LLaVA-1.5 batch 16, keep 128"),
    (1, 2880, 4096, 320, "LLaVA-NeXT 5 crops, keep 320"),
    (4, 2880, 4096, 640, "LLaVA-NeXT batch 4, keep 640"),
    (1, 4096, 3584, 1024, "Qwen2.5-VL-7B large image, keep 1024"),
    (16, 4096, 3584, 512, "Qwen2.5-VL-7B batch 16, keep 512"),
    (2, 8192, 3584, 1024, "Qwen2.5-VL-7B very large image, keep 1024"),
]
QUICK_SHAPES = SHAPES[:2]
CPU_SHAPE = (2, 576, 1024, 64, "CPU smoke size")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds per call, each call timed with its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median milliseconds per call with perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def chain_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def chain_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def chain_merge(x: torch.Tensor, assign: torch.Tensor, m: int) -> torch.Tensor:
    b, n, d = x.shape
    flat = (assign + m * torch.arange(b, device=x.device).unsqueeze(1)).reshape(-1)
    acc = torch.zeros((b * m, d), dtype=torch.float32, device=x.device)
    acc.index_add_(0, flat, x.reshape(b * n, d).float())
    cnt = torch.zeros(b * m, dtype=torch.float32, device=x.device)
    cnt.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    return (acc / cnt.clamp(min=1).unsqueeze(-1)).view(b, m, d).to(x.dtype)


def bench_shape(shape, dtype, device, use_kernels: bool, warmup: int, repeats: int) -> dict:
    """Time every op at one shape; ``use_kernels`` False times the PyTorch reference in place of the kernels."""
    import tokprune.kernels as K

    b, n, d, k, label = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, n, d, generator=g, device=device).to(dtype)
    scores = torch.randn(b, n, generator=g, device=device).to(dtype)
    assign = torch.randint(0, k, (b, n), generator=g, device=device)
    timer = time_cuda if device.type == "cuda" else time_cpu
    ops = K if use_kernels else reference
    idx = ops.select_topk(scores, k)
    if use_kernels and device.type == "cuda":  # the kernels must agree with the reference before they are timed
        assert torch.equal(idx, reference.select_topk(scores, k, check=False)), "select_topk differs from reference"
        assert torch.equal(K.gather_tokens(x, idx), reference.gather_tokens(x, idx)), "gather differs"

    def prune_ref(merge):
        i = reference.select_topk(scores, k)
        t = reference.gather_tokens(x, i)
        if merge is None:
            return t
        a = reference.nearest_assign(x, i)
        return reference.merge_tokens(x, a, num_targets=k)

    cases = {
        "select": (lambda: ops.select_topk(scores, k), lambda: chain_select(scores, k)),
        "gather": (lambda: ops.gather_tokens(x, idx), lambda: chain_gather(x, idx)),
        "prune": ((lambda: K.prune(x, scores, k)) if use_kernels else (lambda: prune_ref(None)),
                  lambda: chain_gather(x, chain_select(scores, k))),
        "merge": (lambda: ops.merge_tokens(x, assign, num_targets=k), lambda: chain_merge(x, assign, k)),
        "nearest": ((lambda: K.prune(x, scores, k, merge="nearest")) if use_kernels else (lambda: prune_ref("n")),
                    lambda: prune_ref("n")),
    }
    row = {"B": b, "N": n, "D": d, "k": k, "label": label, "ops": {}}
    for name, (ours, base) in cases.items():
        t_ours = timer(ours, warmup, repeats)
        t_base = timer(base, warmup, repeats)
        row["ops"][name] = {"ours_ms": t_ours, "torch_ms": t_base, "speedup": t_base / t_ours if t_ours else None}
        print(f"  {name:8s} ours {t_ours:8.4f} ms   torch {t_base:8.4f} ms   x{t_base / t_ours:6.2f}", flush=True)
    return row


#: issue #28: a Triton kernel stays only where it beats the PyTorch path by at least this factor on the GPU
KEEP_FACTOR = 2.0


def verdicts(meta: dict, rows: list[dict]) -> dict[str, dict]:
    """Per op: the smallest and median speed-up over the shapes and the verdict, ``keep`` (>= 2x at every shape),
    ``remove`` (below 2x somewhere), or ``n/a`` where no Triton kernel was timed (no GPU)."""
    out = {}
    for name in (list(rows[0]["ops"]) if rows else []):
        ups = [r["ops"][name]["speedup"] for r in rows if r["ops"][name]["speedup"] is not None]
        verdict = "n/a" if meta["backend"] != "triton" or not ups else (
            "keep" if min(ups) >= KEEP_FACTOR else "remove")
        out[name] = {"min_speedup": min(ups) if ups else None,
                     "median_speedup": statistics.median(ups) if ups else None, "verdict": verdict}
    return out


def verdict_lines(meta: dict, rows: list[dict]) -> list[str]:
    """One line per op for the console and the table: KEEP / REMOVE at the 2x rule."""
    if meta["backend"] != "triton":
        return [f"verdict: n/a (backend {meta['backend']}: no Triton kernel was timed; the >= {KEEP_FACTOR:g}x rule "
                "needs a CUDA GPU)"]
    lines = []
    for name, v in verdicts(meta, rows).items():
        lines.append(f"verdict {name:8s}: {v['verdict'].upper():6s} (Triton vs PyTorch: min x{v['min_speedup']:.2f}, "
                     f"median x{v['median_speedup']:.2f} over {len(rows)} shapes; keep needs >= {KEEP_FACTOR:g}x "
                     "at every shape)")
    return lines


def to_markdown(meta: dict, rows: list[dict]) -> str:
    names = list(rows[0]["ops"]) if rows else []
    lines = [
        f"# tokprune.kernels benchmark ({meta['device']})",
        "",
        f"backend: {meta['backend']}; dtype {meta['dtype']}; torch {meta['torch']}; triton {meta['triton']}; "
        f"median of {meta['repeats']} calls after {meta['warmup']} warm-up calls; times in ms per call; "
        "speedup = torch chain / ours.",
        "",
        "| B | N | D | k | " + " | ".join(f"{n} ours | {n} torch | {n} x" for n in names) + " |",
        "|---|---|---|---|" + "---|---|---|" * len(names),
    ]
    for r in rows:
        cells = []
        for n in names:
            o = r["ops"][n]
            cells += [f"{o['ours_ms']:.4f}", f"{o['torch_ms']:.4f}", f"{o['speedup']:.2f}"]
        lines.append(f"| {r['B']} | {r['N']} | {r['D']} | {r['k']} | " + " | ".join(cells) + " |")
    lines += ["", f"Kept only where >= {KEEP_FACTOR:g}x at every shape (issue #28):", ""]
    lines += [f"* {line}" for line in verdict_lines(meta, rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON + markdown")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="only the two smallest shapes")
    parser.add_argument("--cpu", action="store_true", help="no CUDA: time the PyTorch reference at one small size")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    if torch.cuda.is_available() and not args.cpu:
        device = torch.device("cuda")
        os.environ["TOKPRUNE_KERNELS"] = "triton"
        import tokprune.kernels as K

        if not K.triton_available():
            print("triton is not installed: pip install 'triton==3.7.1' numpy", file=sys.stderr)
            return 1
        backend, shapes, device_name = "triton", (QUICK_SHAPES if args.quick else SHAPES), torch.cuda.get_device_name()
    elif args.cpu:
        device, backend, shapes = torch.device("cpu"), "torch-reference", [CPU_SHAPE]
        device_name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        os.environ["TOKPRUNE_KERNELS"] = "torch"
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 1)
    else:
        print("CUDA is not available: the kernel benchmark needs a GPU (run with --cpu to time the PyTorch "
              "reference at a small size instead). Nothing was measured.")
        return 0

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {"device": device_name, "backend": backend, "dtype": args.dtype, "torch": torch.__version__,
            "triton": triton_version, "repeats": args.repeats, "warmup": args.warmup}
    print(f"device: {device_name}  backend: {backend}  dtype: {args.dtype}")
    rows = []
    for shape in shapes:
        print(f"B={shape[0]} N={shape[1]} D={shape[2]} k={shape[3]}  ({shape[4]})", flush=True)
        rows.append(bench_shape(shape, dtype, device, backend == "triton", args.warmup, args.repeats))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_" + ("cuda" if device.type == "cuda" else "cpu")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "verdicts": verdicts(meta, rows)},
                                                      indent=2))
    print("\n".join(verdict_lines(meta, rows)), flush=True)
    (args.out / f"{stem}.md").write_text(to_markdown(meta, rows))
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
