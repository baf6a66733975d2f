"""Mixed batches after a cut: the batch's width and prefill time with re-packing against the previous rule, in one run.

A batch mixes a small image, a large one and (second batch) a text-only row, left-padded as a processor pads it.
Before re-packing (issue #29 item 6) the pruned sequence kept every padding slot, so the width only dropped by the
smallest row's cut and a text-only row kept the full width; now the width is the longest pruned row. Each method is
timed three ways, round-robin in one run: unpruned, pruned under the previous rule (``padding_kept``: the old slot
rule restored around the two re-packing functions, nothing else changes) and pruned as shipped. The two pruned arms
must give the same last-token logits (the rule only moves padding); the script checks it.

    python benchmarks/mixed_batch.py --config qwen2.5-vl-3b --llm-layers 4 --vision-layers 4 \\
        --methods divprune,fastv --keep-ratio 0.25 --out benchmarks/results/cpu-xeon-2c-loaded

writes ``<out>/mixed-batch-<config>.{json,md}``. Qwen configs (the images' token counts follow their size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokprune  # noqa: E402
from tokprune import configs  # noqa: E402
from tokprune.eval.proxy import depth_of, reduce_depth  # noqa: E402
from tokprune.patches import llm_stage, prefill, sequence  # noqa: E402

#: the batches: per row an image size (H, W) or None for a text-only row
BATCHES = {"56 px + 448 px": [(56, 56), (448, 448)],
           "56 px + 448 px + text only": [(56, 56), (448, 448), None]}


@contextmanager
def padding_kept() -> Iterator[None]:
    """The rule before re-packing: every padding slot stays in the pruned sequence (pre-LLM: the kept tokens and all
    padding, right-aligned; in the LLM: padding counted as surviving, shorter rows filled with dead slots)."""
    pre, llm = prefill.repack, llm_stage.repack_slots
    prefill.repack = lambda keep, pad, right=False: sequence.repack(keep | pad, torch.zeros_like(pad), right)
    llm_stage.repack_slots = lambda keep, pad: sequence.repack_slots(keep, torch.zeros_like(pad))
    try:
        yield
    finally:
        prefill.repack, llm_stage.repack_slots = pre, llm


def mixed_inputs(config: Any, rows: list[tuple[int, int] | None], n_text: int) -> dict[str, torch.Tensor]:
    """One left-padded batch: each row ``n_text`` text tokens around its image (none for a text-only row)."""
    if not config.model_type.startswith("qwen"):
        raise SystemExit(f"mixed_batch.py builds Qwen batches (image sizes set the token counts); got "
                         f"{config.model_type}: pass a qwen config (python -c 'import tokprune.configs as c; "
                         "print(c.names())')")
    one = [configs.example_inputs(config, n_text=n_text, n_images=int(size is not None), image_size=size, seed=r)
           for r, size in enumerate(rows)]
    width = max(x["input_ids"].shape[1] for x in one)
    pad_id = config.get_text_config().pad_token_id or 0

    def left(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([t.new_full((1, width - t.shape[1]), fill), t], 1)

    out = {"input_ids": torch.cat([left(x["input_ids"], pad_id) for x in one]),
           "attention_mask": torch.cat([left(x["attention_mask"], 0) for x in one]),
           "mm_token_type_ids": torch.cat([left(x["mm_token_type_ids"], 0) for x in one])}
    images = [x for x, size in zip(one, rows) if size is not None]
    out["pixel_values"] = torch.cat([x["pixel_values"] for x in images])
    out["image_grid_thw"] = torch.cat([x["image_grid_thw"] for x in images])
    return out


class LastWidth:
    """The sequence length the last decoder layer computes, per forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.width = 0
        self.handle = model.model.language_model.layers[-1].register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, out: Any) -> None:
        self.width = (out[0] if isinstance(out, tuple) else out).shape[1]


def timed(model: torch.nn.Module, x: dict) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(**x, use_cache=True, logits_to_keep=1).logits[:, -1]
        return time.perf_counter() - t0, logits


def measure(model: torch.nn.Module, x: dict, method: str, keep_ratio: float, repeats: int) -> dict[str, Any]:
    """Unpruned, previous rule and re-packed, round-robin; medians of ``repeats`` after one warm-up each."""
    probe = LastWidth(model)
    arms = {"unpruned": None, "padding kept": True, "re-packed": False}
    times: dict[str, list[float]] = {a: [] for a in arms}
    widths, logits = {}, {}
    try:
        for r in range(repeats + 1):
            for arm, old in arms.items():
                with tokprune.pruned(model, method, keep_ratio=keep_ratio) if old is not None else _nothing(), \
                        padding_kept() if old else _nothing():
                    t, out = timed(model, x)
                if r:
                    times[arm].append(t)
                widths[arm], logits[arm] = probe.width, out
    finally:
        probe.handle.remove()
    med = {a: statistics.median(v) for a, v in times.items()}
    diff = (logits["padding kept"] - logits["re-packed"]).abs().max().item()
    if diff > 1e-3 * max(1.0, logits["re-packed"].abs().max().item()):
        raise SystemExit(f"{method}: the two pruned arms disagree (max |diff| {diff:.3g}); the rule must only move "
                         "padding")
    return {"method": method, "keep_ratio": keep_ratio, "width": widths, "ms": {a: 1000 * m for a, m in med.items()},
            "saved_vs_padding_kept": 1 - med["re-packed"] / med["padding kept"],
            "speedup_vs_padding_kept": med["padding kept"] / med["re-packed"],
            "speedup_vs_unpruned": med["unpruned"] / med["re-packed"], "logit_diff": diff}


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def to_markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"## Mixed batches after a cut: {m['model']} ({m['depth']})", "",
             f"{m['device']}, {m['dtype']}, {m['threads']} threads; {m['load']}. Each row: medians of {m['repeats']} "
             "prefills per arm, round-robin in one run (ratios carry over, milliseconds do not). Width: the "
             "sequence length of the last decoder layer.", "",
             "| batch (real tokens per row) | method | width unpruned | width, padding kept | width re-packed "
             "| ms unpruned | ms padding kept | ms re-packed | time saved by re-packing | vs unpruned |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in report["batches"]:
        for r in b["rows"]:
            w, ms = r["width"], r["ms"]
            saved = f"{100 * r['saved_vs_padding_kept']:.0f} % ({r['speedup_vs_padding_kept']:.2f}x)"
            lines.append(f"| {b['name']} ({', '.join(map(str, b['real']))}) | {r['method']} {r['keep_ratio']} "
                         f"| {w['unpruned']} | {w['padding kept']} | {w['re-packed']} | {ms['unpruned']:.0f} "
                         f"| {ms['padding kept']:.0f} | {ms['re-packed']:.0f} | {saved} "
                         f"| {r['speedup_vs_unpruned']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen2.5-vl-3b")
    p.add_argument("--llm-layers", type=int, help="decoder layers of the proxy (default: 4, or all if fewer)")
    p.add_argument("--vision-layers", type=int, help="vision blocks of the proxy (default: 4, or all if fewer)")
    p.add_argument("--methods", default="divprune,fastv")
    p.add_argument("--keep-ratio", type=float, default=0.25)
    p.add_argument("--n-text", type=int, default=95)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    full = configs.load(args.config)
    real = depth_of(full)
    config, depth = reduce_depth(full, args.llm_layers or min(4, real.llm[1]),
                                 args.vision_layers or min(4, real.vision[1]))
    model = configs.build_model(config, "cpu", torch.float32)
    load = os.getloadavg()
    report: dict[str, Any] = {"meta": {"model": args.config, "depth": depth.label(), "device": "CPU",
                                       "dtype": "float32", "threads": torch.get_num_threads(),
                                       "repeats": args.repeats}, "batches": []}
    for name, rows in BATCHES.items():
        x = mixed_inputs(model.config, rows, args.n_text)
        entry = {"name": name, "real": x["attention_mask"].sum(1).tolist(), "rows": []}
        for method in [m for m in args.methods.split(",") if m]:
            print(f"[mixed_batch] {name}: {method}", file=sys.stderr, flush=True)
            entry["rows"].append(measure(model, x, method, args.keep_ratio, args.repeats))
        report["batches"].append(entry)
    end = os.getloadavg()
    report["meta"]["load"] = (f"load average {load[0]:.1f} at the start, {end[0]:.1f} at the end "
                              f"({os.cpu_count()} CPUs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"mixed-batch-{args.config if args.config in configs.names() else Path(args.config).stem}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md = to_markdown(report)
    (out / f"{stem}.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
