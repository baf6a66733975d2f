"""FlowCut's vision-encoder time as a ratio of the unpruned encoder's, in one run (random weights).

    python benchmarks/flowcut_encoder.py --config llava-1.5-7b --keep 192,128,64 --repeats 5 \\
        --out benchmarks/results/cpu-amd-epyc-2c

Times the model's own ``get_image_features`` (the full-size vision tower + projector) on one image, unpruned and
under ``tokprune.apply(model, "flowcut", keep=k)``, alternating the cases round-robin in every repeat so that a
shared CPU's load hits all of them alike; reports medians of the process CPU time (what this process computed,
less sensitive than wall time to other work on a shared CPU) and of wall time, and the tokens each encoder layer
ran on (from the seam's cut history). ``--sharpen F`` scales every layer's q and k projections by F (attention
logits x F^2): a stand-in for a trained model's peaked attention, under which the entropy-adaptive counts drop
tokens early. The LLM is cut to one layer (it never runs here). Random
weights give near-uniform attention, so FlowCut's entropy-adaptive counts drop little before its forced cut at the
layer before the feature layer; a trained model drops earlier and gains more. Writes
``<out>/flowcut-encoder-<config>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokprune  # noqa: E402
from tokprune import configs  # noqa: E402
from tokprune.eval.proxy import reduce_depth  # noqa: E402
from tokprune.eval.speed import cpu_model  # noqa: E402


def encoder_flops(vc, text_hidden: int, layer_tokens: list[int], strip: int = 1) -> float:
    """Multiply-adds x 2 of the CLIP layers at these token counts plus the 2-layer projector on the last count
    (minus the [CLS] it never reads): 8 N d^2 (q, k, v, o) + 4 N d m (MLP) + 4 N^2 d (scores and mixing)."""
    d, m = vc.hidden_size, vc.intermediate_size
    layers = sum(8 * n * d * d + 4 * n * d * m + 4 * n * n * d for n in layer_tokens)
    p = layer_tokens[-2] - strip  # the feature layer's output feeds the projector
    return layers + 2 * p * (d * text_hidden + text_hidden * text_hidden)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-1.5-7b")
    p.add_argument("--keep", default="192,128,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sharpen", type=float, default=1.0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # peaked softmaxes (--sharpen) produce subnormal floats, slow on CPU
    config, _ = reduce_depth(configs.load(a.config), 1, None)
    torch.manual_seed(0)
    model = configs.build_model(config, "cpu", torch.float32).eval()
    for layer in model.model.vision_tower.vision_model.encoder.layers if hasattr(
            model.model.vision_tower, "vision_model") else model.model.vision_tower.encoder.layers:
        layer.self_attn.q_proj.weight.data *= a.sharpen
        layer.self_attn.k_proj.weight.data *= a.sharpen
    x = configs.example_inputs(model.config, n_text=8, batch=1, device=torch.device("cpu"), dtype=torch.float32)
    extra = {k: x[k] for k in ("image_sizes", "image_grid_thw") if k in x}
    keeps = [int(k) for k in a.keep.split(",")]
    cases = [None, *keeps]
    times: dict[str, list[float]] = {str(c): [] for c in cases}
    wall: dict[str, list[float]] = {str(c): [] for c in cases}
    tokens: dict[str, list[int]] = {}
    n_layers = model.config.vision_config.num_hidden_layers
    with torch.inference_mode():
        model.model.get_image_features(pixel_values=x["pixel_values"], **extra)  # warm-up
        for _ in range(a.repeats):
            for c in cases:
                if c is not None:
                    tokprune.apply(model, "flowcut", keep=c)
                t0, c0 = time.perf_counter(), time.process_time()
                model.model.get_image_features(pixel_values=x["pixel_values"], **extra)
                times[str(c)].append((time.process_time() - c0) * 1e3 / a.threads)
                wall[str(c)].append((time.perf_counter() - t0) * 1e3)
                if c is not None:
                    cut = model.tokprune._adapter.encoder_cut
                    hist = dict(cut.history)
                    cur, seen = cut.n_full, []
                    for i in range(n_layers):
                        seen.append(cur)
                        if i in hist:
                            cur = int(hist[i][0].numel())
                    tokens[str(c)] = seen
                    tokprune.remove(model)
    base = times["None"]
    rows = []
    vc, th = model.config.vision_config, model.config.get_text_config().hidden_size
    full = encoder_flops(vc, th, [tokens[str(keeps[0])][0]] * n_layers)
    for c in keeps:
        t = times[str(c)]
        rows.append({"keep": c, "encoder_ms": statistics.median(t),
                     "ratio_of_medians": statistics.median(t) / statistics.median(base),
                     "wall_ratio_of_medians": statistics.median(wall[str(c)]) / statistics.median(wall["None"]),
                     "flops_ratio": encoder_flops(vc, th, tokens[str(c)]) / full,
                     "layer_tokens": tokens[str(c)]})
    res = {"config": a.config, "cpu": cpu_model(), "threads": a.threads, "repeats": a.repeats, "sharpen": a.sharpen,
           "unpruned_encoder_ms": statistics.median(base), "cpu_ms_per_thread": times, "wall_ms": wall, "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.mkdir(parents=True, exist_ok=True)
    tag = a.config + ("" if a.sharpen == 1 else f"-sharpen{a.sharpen:g}")
    (a.out / f"flowcut-encoder-{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    sharp = "" if a.sharpen == 1 else f", q/k scaled x{a.sharpen:g} (`--sharpen`)"
    lines = [f"# FlowCut encoder time, {a.config} vision tower (full size, random weights{sharp})", "",
             f"{res['cpu']}, {a.threads} threads, fp32 (subnormals flushed), batch 1, "
             f"{a.repeats} round-robin repeats (medians), "
             f"{res['date']}; unpruned `get_image_features` {res['unpruned_encoder_ms']:.0f} ms of CPU time per "
             f"thread ({statistics.median(wall['None']):.0f} ms wall). `python benchmarks/flowcut_encoder.py`"
             f"{' --sharpen ' + format(a.sharpen, 'g') if a.sharpen != 1 else ''}.", "",
             "| keep | encoder CPU ms | encoder / unpruned (CPU time) | (wall time) | analytic FLOPs ratio "
             "| tokens per encoder layer |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lt = r["layer_tokens"]
        first = lt.count(lt[0])
        lines.append(f"| {r['keep']} | {r['encoder_ms']:.0f} | {r['ratio_of_medians']:.3f} | "
                     f"{r['wall_ratio_of_medians']:.3f} | {r['flops_ratio']:.3f} | "
                     f"{lt[0]} x {first}, then {', '.join(map(str, lt[first:]))} |")
    (a.out / f"flowcut-encoder-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
