"""Before / after speed of the same cases in ONE run: two worker processes, each importing tokprune from its own
source tree (e.g. ``git archive main`` unpacked, and this checkout), each holding the same random-weight
depth-reduced proxy (same seed), timed in interleaved round-robin rounds (the workers alternate who goes first;
within a round every case of a worker runs once, the unpruned model included). Reports, per tree and case, the
median prefill, the speed-up over that tree's unpruned median (same rounds) and the analytic bound of *this*
checkout's FLOPs model (so both trees are compared with the same bound), plus that tree's own bound.

    python benchmarks/ab_speed.py --before /tmp/before --after . --config llava-1.5-7b --llm-layers 4 \\
        --cases pdrop:192,pdrop:64,transprune:192 --rounds 5 --out benchmarks/results/<dir>/ab-<name>.md

On a loaded machine absolute times are noise; the ratios within one round-robin run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r'''
import json, sys, time, torch
import tokprune
from tokprune import configs, flops
from tokprune.eval.proxy import reduce_depth
cfg = json.loads(sys.argv[1])
config, depth = reduce_depth(configs.load(cfg["config"]), cfg["llm_layers"], cfg["vision_layers"])
torch.manual_seed(0)
model = configs.build_model(config, "cpu", torch.float32)
inputs = configs.example_inputs(model.config, n_text=cfg["n_text"], dtype=torch.float32)
geometry = flops.geometry_from_inputs(inputs)

def prefill():
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(**inputs, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - t0) * 1e3

prefill()  # warm-up
print(json.dumps({"ready": tokprune.__file__, "depth": depth.label()}), flush=True)
for line in sys.stdin:
    method, keep = line.split()
    if method == "unpruned":
        print(json.dumps({"ms": prefill()}), flush=True)
        continue
    with tokprune.pruned(model, method, keep=int(keep)):
        ms = prefill()
        rec = tokprune.last_record(model)
    out = {"ms": ms, "stages": [[st.kind, st.layer, [[int(k.numel()) for k in row] for row in st.kept],
                                 None if getattr(st, "probe_rows", None) is None else
                                 [int(x) for x in st.probe_rows]] for st in rec.stages]}
    rep = flops.record_report(model.config, rec, logits_to_keep=1, **geometry)
    out["own_bound"] = rep.baseline.total / rep.total
    out["record"] = rec  # replaced below (not JSON)
    out.pop("record")
    print(json.dumps(out), flush=True)
'''


def start(tree: Path, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    cfg = {"config": args.config, "llm_layers": args.llm_layers, "vision_layers": args.vision_layers,
           "n_text": args.n_text}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(tree.resolve()))
    return proc


def ask(proc: subprocess.Popen, method: str, keep: int) -> dict:
    proc.stdin.write(f"{method} {keep}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker died while running {method} keep={keep}")
    return json.loads(line)


def bound_here(config_name: str, llm_layers: int, vision_layers: int | None, n_text: int, stages: list) -> float:
    """This checkout's analytic bound for a case's stages (what was kept where, and the probes' rows)."""
    import torch

    from tokprune import configs, flops
    from tokprune.eval.proxy import reduce_depth
    from tokprune.record import PruneRecord, Stage

    config, _ = reduce_depth(configs.load(config_name), llm_layers, vision_layers)
    n_vis = configs.example_inputs(config, n_text=n_text, device="meta")["input_ids"].shape[1] - n_text
    rec = PruneRecord(method="?", n_visual=[[n_vis]], seq_len=[n_vis + n_text])
    for kind, layer, kept, probe in stages:
        st = Stage(kind, layer, [[torch.arange(k) for k in row] for row in kept])
        st.probe_rows = None if probe is None else torch.tensor(probe)
        rec.stages.append(st)
    rep = flops.record_report(config, rec, logits_to_keep=1)
    return rep.baseline.total / rep.total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, type=Path)
    p.add_argument("--after", required=True, type=Path)
    p.add_argument("--config", default="llava-1.5-7b")
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int)
    p.add_argument("--n-text", type=int, default=95)
    p.add_argument("--cases", required=True, help="method:keep,...")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--note", default="")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    cases = [("unpruned", 0)] + [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    trees = {"before": args.before, "after": args.after}
    procs = {name: start(tree, args) for name, tree in trees.items()}
    ready = {name: json.loads(proc.stdout.readline()) for name, proc in procs.items()}
    print(f"[ab] workers ready: {ready}", file=sys.stderr, flush=True)
    ms: dict[tuple[str, str, int], list[float]] = {}
    info: dict[tuple[str, str, int], dict] = {}
    t0 = time.time()
    for r in range(args.rounds):
        order = list(procs) if r % 2 == 0 else list(procs)[::-1]
        for name in order:
            for method, keep in cases:
                res = ask(procs[name], method, keep)
                ms.setdefault((name, method, keep), []).append(res["ms"])
                info[(name, method, keep)] = res
        write(args, cases, trees, ready, ms, info, r + 1)
        print(f"[ab] round {r + 1}/{args.rounds} done at {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return 0


def write(args, cases, trees, ready, ms, info, done: int) -> None:
    """The table of the rounds done so far (rewritten after each round)."""
    rows = []
    for method, keep in cases:
        for name in trees:
            med = statistics.median(ms[(name, method, keep)])
            base = statistics.median(ms[(name, "unpruned", 0)])
            res = info[(name, method, keep)]
            # one bound per case, from the after tree's record (the before tree records no probe rows)
            after = info[("after", method, keep)]
            same = [s[:3] for s in res.get("stages", [])] == [s[:3] for s in after.get("stages", [])]
            bound = 1.0 if method == "unpruned" else bound_here(args.config, args.llm_layers, args.vision_layers,
                                                                args.n_text, after["stages"])
            per_round = statistics.median(u / c for u, c in zip(ms[(name, "unpruned", 0)], ms[(name, method, keep)]))
            rows.append({"tree": name, "method": method, "keep": keep, "median_ms": round(med, 1),
                         "round_speedup": per_round, "round_of_bound": per_round / bound,
                         "speedup": base / med, "bound": bound, "of_bound": base / med / bound,
                         "own_bound": res.get("own_bound", 1.0), "same_counts": same, "runs_ms": [round(x, 1) for x in
                                                                             ms[(name, method, keep)]]})
    from tokprune.eval.speed import cpu_model

    lines = [f"## before / after, one interleaved run: {args.config}, {ready['after']['depth']}", "",
             f"CPU {cpu_model()}, {os.cpu_count()} cores, fp32, batch 1, {args.n_text} text tokens; medians of "
             f"{done} round-robin rounds (before and after alternate who goes first); "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.note}", "",
             "*bound*: this checkout's analytic FLOPs bound for what the case ran in the after tree (it counts "
             "the probes of pdrop / transprune; both trees kept the same counts per stage unless a row says "
             "otherwise); *own bound*: the bound that tree's FLOPs model gave. speed-up: the tree's "
             "unpruned median / the case's median, same run; *per-round*: the median over rounds of the tree's "
             "unpruned prefill / the case's prefill in the same round (minutes apart, so less exposed to the "
             "load drifting over the run).", "",
             "| case | tree | prefill ms (median) | speed-up | bound | of bound | per-round speed-up "
             "| per-round of bound | own bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["method"] if r["method"] == "unpruned" else f"{r['method']} keep={r['keep']}"
        label += "" if r["same_counts"] else " (counts differ from after)"
        lines.append(f"| {label} | {r['tree']} | {r['median_ms']:.1f} | {r['speedup']:.2f}x | {r['bound']:.2f}x "
                     f"| {r['of_bound']:.1%} | {r['round_speedup']:.2f}x | {r['round_of_bound']:.1%} "
                     f"| {r['own_bound']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
