"""Encoder time (vision tower + projector, the model's ``get_image_features``) unpatched vs patched by each method,
in ONE process, interleaved: every round times, per method, the unpatched encoder and the patched one next to each
other (the order alternates between rounds), so each method gets a per-round paired ratio that a loaded machine's
drift mostly cancels out of. A method without encoder taps (pdrop) gives the noise floor.

    python benchmarks/encoder_taps_ab.py --config llava-1.5-7b --methods hiprune,visionzip,pdrop --rounds 7
    python benchmarks/encoder_taps_ab.py ... --profile hiprune   # op table of one encoder call, patched vs not

Reports per method: median unpatched ms, median patched ms, median of the per-round ratios patched / unpatched
(> 1: the taps cost), and the min / max ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokprune
from tokprune import configs
from tokprune.eval.proxy import reduce_depth

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def encode(model: torch.nn.Module, inputs: dict) -> float:
    """ms of one ``get_image_features`` call with the example's pixel kwargs (``clock``: wall or process CPU
    time; the CPU time of this process is less disturbed by other processes on a loaded machine)."""
    base = getattr(model, "model", model)
    kw = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    with torch.inference_mode():
        t0 = clock()
        base.get_image_features(**kw)
        return (clock() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llava-1.5-7b")
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vision-layers", type=int, default=None)
    ap.add_argument("--methods", default="hiprune,visionzip,vtc_cls,cls,vispruner,pdrop")
    ap.add_argument("--keep", type=float, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: per method, the ops of one encoder call that the unpatched call lacks")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    config, depth = reduce_depth(configs.load(args.config), args.llm_layers, args.vision_layers)
    torch.manual_seed(0)
    model = configs.build_model(config, "cpu", torch.float32)
    inputs = configs.example_inputs(model.config, n_text=16, dtype=torch.float32)
    keep = int(args.keep) if args.keep >= 1 else args.keep
    methods = [m for m in args.methods.split(",") if m]
    encode(model, inputs)  # warm-up
    for m in methods:
        with tokprune.pruned(model, m, keep=keep):
            encode(model, inputs)
    if args.profile:
        profile(model, inputs, methods, keep)
        return
    un: dict[str, list[float]] = {m: [] for m in methods}
    pa: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            for first in ((False, True) if r % 2 else (True, False)):
                if first:
                    with tokprune.pruned(model, m, keep=keep):
                        pa[m].append(encode(model, inputs))
                else:
                    un[m].append(encode(model, inputs))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n{args.config} · {depth.label()} · keep {keep} · {args.rounds} rounds · {args.threads} threads · fp32 · "
          f"{args.clock} clock\n")
    print("| method | unpatched ms (median) | patched ms (median) | paired ratio (median) | min | max |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        ratios = [p / u for p, u in zip(pa[m], un[m])]
        print(f"| {m} | {statistics.median(un[m]):.1f} | {statistics.median(pa[m]):.1f} | "
              f"{statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")


def profile(model: torch.nn.Module, inputs: dict, methods: list[str], keep: float) -> None:
    """Per method: the self CPU ms of one encoder call's ops, and those (name + input shapes) the unpatched call
    does not run, i.e. the taps' own work and anything else the patch adds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    def ops(method: str | None) -> dict[tuple[str, str], tuple[int, float]]:
        with prof(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            if method:
                with tokprune.pruned(model, method, keep=keep):
                    encode(model, inputs)
            else:
                encode(model, inputs)
        return {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total / 1e3)
                for e in p.key_averages(group_by_input_shape=True)}

    base = ops(None)
    print(f"unpatched: {sum(v[1] for v in base.values()):.1f} ms self CPU, {len(base)} (op, shapes) kinds")
    for m in methods:
        ev = ops(m)
        extra = sorted(((v[1], v[0], k) for k, v in ev.items() if k not in base), reverse=True)
        total = sum(v[1] for v in ev.values())
        print(f"\n{m}: {total:.1f} ms self CPU; ops the unpatched call lacks: "
              f"{sum(x[0] for x in extra):.1f} ms")
        for ms, n, (name, shapes) in extra[:12]:
            print(f"  {ms:8.2f} ms x{n:<3d} {name} {shapes[:100]}")
        # a patch that changed the model's own path (another attention kernel, copies) shows up here
        changed = [(k, base[k][0], ev.get(k, (0, 0.0))[0]) for k in base
                   if ev.get(k, (0, 0.0))[0] != base[k][0] and not k[0].startswith("aten::empty")]
        print(f"  (op, shapes) of the unpatched call run a different number of times: {len(changed)}")
        for (name, shapes), a, b in changed[:12]:
            print(f"    {name} {shapes[:80]}: {a} -> {b}")


if __name__ == "__main__":
    main()
