"""The ops of one pruned prefill that the unpruned prefill does not run (torch.profiler, record_shapes): the
method's non-layer work (gathers, masks, rotary, taps, observers) next to its layer work on the shorter sequence.

    python benchmarks/prefill_op_diff.py --methods fastv,transprune --keep 64

One profiled prefill per case in one process (LLaVA-1.5-7B proxy by default); ops are keyed by name and input
shapes, so the layers that run on fewer tokens appear too (their shapes changed) and are easy to tell apart.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import tokprune
from tokprune import configs
from tokprune.eval.proxy import reduce_depth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llava-1.5-7b")
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=None)
    ap.add_argument("--n-text", type=int, default=95)
    ap.add_argument("--methods", default="fastv,transprune")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    config, _ = reduce_depth(configs.load(args.config), args.llm_layers, args.vision_layers)
    torch.manual_seed(0)
    model = configs.build_model(config, "cpu", torch.float32)
    inputs = configs.example_inputs(model.config, n_text=args.n_text, dtype=torch.float32)

    def forward() -> None:
        with torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)

    def ops(method: str | None) -> tuple[float, dict]:
        if method:
            tokprune.apply(model, method=method, keep=args.keep)
        try:
            forward()  # warm-up under the same patch
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
                t0 = time.perf_counter()
                forward()
                ms = (time.perf_counter() - t0) * 1e3
        finally:
            if method:
                tokprune.remove(model)
        return ms, {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total / 1e3)
                    for e in p.key_averages(group_by_input_shape=True)}

    base_ms, base = ops(None)
    print(f"unpruned: {base_ms:.0f} ms (profiled)")
    for m in [x for x in args.methods.split(",") if x]:
        ms, ev = ops(m)
        extra = sorted(((v[1], v[0], k) for k, v in ev.items() if k not in base), reverse=True)
        print(f"\n{m} keep {args.keep}: {ms:.0f} ms (profiled); ops the unpruned prefill lacks: "
              f"{sum(x[0] for x in extra):.1f} ms self CPU")
        for self_ms, n, (name, shapes) in extra[:args.top]:
            print(f"  {self_ms:9.2f} ms x{n:<4d} {name:45s} {shapes[:110]}")


if __name__ == "__main__":
    main()
