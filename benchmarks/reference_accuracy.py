"""Accuracy of every tokprune method on the trained reference models (Shapes-VQA test split, CPU, offline).

    python benchmarks/reference_accuracy.py            # writes benchmarks/reference_accuracy.{md,json}
    python benchmarks/reference_accuracy.py --n 200 --models llava-shapes --out /tmp/ref
    python benchmarks/reference_accuracy.py --methods vflowopt --flops-matched   # add / replace only these rows

For each shipped model: unpruned accuracy per question type, then every method of ``tokprune.methods()`` (with
its default options) at keep ratios 50 / 25 / 12.5 %. ``random`` is the floor: its subset depends only on its
seed (every image keeps the same positions), so it is averaged over ``--random-seeds`` seeds. A diagnostic row,
``cls_lowest``, keeps the *lowest*-[CLS]-attention tokens: far below random means [CLS] attention really points at
the objects. "target recall" is the fraction of the answer objects' tokens a method kept, i.e. whether it kept the
right tokens regardless of what the LLM then did. A method that cannot run on a family is marked n/a with the
reason ``tokprune.apply`` gave.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tokprune
from tokprune.data import ShapesVQA
from tokprune.pruners.cls_attention import CLSAttention
from tokprune.reference import load, read_meta
from tokprune.reference.evaluate import accuracy, target_recall
from tokprune.registry import METHODS, register_method

RATIOS = (0.5, 0.25, 0.125)
DIAGNOSTIC = "cls_lowest"
#: non-default settings worth a row of their own: FastV's default K=2 is half of these 4-layer LLMs
VARIANTS: dict[str, list[dict[str, Any]]] = {"fastv": [{"layer": 1}]}


@dataclass
class LowestCLS(CLSAttention):
    """Diagnostic: keep the tokens [CLS] attends to *least* (the negated ``cls`` scores)."""

    summary = "lowest head-mean [CLS] attention (diagnostic)"

    def vision_scores(self, signals: Any) -> list[torch.Tensor]:
        return [-s for s in super().vision_scores(signals)]


#: a row whose column ratio is the method's ``flops_ratio`` (fraction of the unpruned LLM FLOPs), not a keep ratio
FLOPS_ROW = "flops_ratio=column"


def run_one(model: Any, processor: Any, samples: list, method: str, ratio: float, **options: Any) -> dict[str, Any]:
    flops_row = options.pop(FLOPS_ROW, False)
    budget = {"flops_ratio": ratio} if flops_row else {"keep_ratio": ratio}
    try:
        tokprune.apply(model, method, **budget, **options)
    except (tokprune.UnsupportedError, NotImplementedError) as e:
        return {"n/a": str(e)}
    except ValueError as e:  # a FLOPs fraction this small model's token counts cannot meet within 1%
        if not flops_row:
            raise
        return {"n/a": str(e)}
    try:
        kept: list[torch.Tensor] = []
        acc = accuracy(model, processor, samples, kept=kept)
        return {"accuracy": acc.as_dict(), "target_recall": target_recall(samples, kept),
                "kept": int(kept[0].numel())}
    finally:
        tokprune.remove(model)


def mean_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = runs[0]["accuracy"]
    acc = {k: statistics.mean(r["accuracy"][k] for r in runs) for k in keys}
    alls = [r["accuracy"]["all"] for r in runs]
    return {"accuracy": acc, "target_recall": statistics.mean(r["target_recall"] for r in runs),
            "kept": runs[0]["kept"], "seeds": len(runs), "all_min": min(alls), "all_max": max(alls)}


def bench_model(name: str, n: int, ratios: tuple[float, ...], random_seeds: int, only: list[str] | None = None,
                flops_matched: bool = False) -> dict[str, Any]:
    model, processor = load(name)
    meta = read_meta(name)
    samples = list(ShapesVQA("test", n=n, types=tuple(meta["question_types"])))
    t0 = time.time()
    result: dict[str, Any] = {"question_types": meta["question_types"], "n": n,
                              "unpruned": accuracy(model, processor, samples).as_dict(), "methods": {}}
    runs = [(m, {}) for m in tokprune.methods() if m != DIAGNOSTIC]
    runs += [(m, o) for m, _ in list(runs) for o in VARIANTS.get(m, [])] + [(DIAGNOSTIC, {})]
    if flops_matched:  # methods with a flops_ratio budget: one more row, the column ratio as the FLOPs fraction
        runs += [(m, {FLOPS_ROW: True}) for m, o in list(runs) if not o and m in METHODS
                 and "flops_ratio" in getattr(METHODS[m], "__dataclass_fields__", {})]
    if only is not None:
        runs = [(m, o) for m, o in runs if m in only]
    for method, options in runs:
        rows = {}
        for r in ratios:
            if method == "random":
                seeds = [run_one(model, processor, samples, method, r, seed=s) for s in range(random_seeds)]
                rows[str(r)] = seeds[0] if "n/a" in seeds[0] else mean_runs(seeds)
            else:
                rows[str(r)] = run_one(model, processor, samples, method, r, **dict(options))
        if method == DIAGNOSTIC and all("n/a" in v for v in rows.values()):
            continue  # no [CLS]: the diagnostic says nothing the cls row does not
        label = method + "".join(f" {k}" if k == FLOPS_ROW else f" {k}={v}" for k, v in options.items())
        result["methods"][label] = rows
        print(f"{name} {label}: " + ", ".join(
            f"{r}: {v['accuracy']['all']:.3f}" if "accuracy" in v else f"{r}: n/a" for r, v in rows.items()),
            flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def to_markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [
        "# Accuracy of each method on the trained reference models",
        "",
        f"Shapes-VQA test split, first {res['n']} samples (balanced over question types and answers), argmax of "
        "the answer token. Models: `tokprune.reference.load(name)`, trained on this CPU "
        "(see [docs/reference.md](../docs/reference.md)). Regenerate with "
        "`python benchmarks/reference_accuracy.py`.",
        "",
        f"Device: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"threads: {env['threads']}; {env['date']}.",
        "",
        "## Unpruned",
        "",
    ]
    models = res["models"]
    types = sorted({t for m in models.values() for t in m["unpruned"] if t != "all"})
    lines += ["| model | all | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
    for name, m in models.items():
        u = m["unpruned"]
        lines.append(f"| {name} | {pct(u['all'])} | " + " | ".join(pct(u[t]) if t in u else "-" for t in types)
                     + " |")
    for name, m in models.items():
        ratios = list(next(iter(m["methods"].values())))
        lines += ["", f"## {name}: accuracy % (target recall %) by kept ratio", "",
                  "Target recall: share of the answer objects' tokens that the method kept. "
                  f"Unpruned accuracy {pct(m['unpruned']['all'])}.", "",
                  "| method | " + " | ".join(f"keep {float(r) * 100:g}%" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        notes = []
        for method, rows in m["methods"].items():
            cells = []
            for r in ratios:
                v = rows[r]
                if "n/a" in v:
                    cells.append("n/a")
                    notes.append((method, v["n/a"]))
                else:
                    cell = f"{pct(v['accuracy']['all'])} ({pct(v['target_recall'])})"
                    if "seeds" in v:
                        cell += f" [{pct(v['all_min'])}-{pct(v['all_max'])}]"
                    cells.append(cell)
            label = f"`{method}`" + (" (diagnostic: lowest [CLS])" if method == DIAGNOSTIC else "")
            if method == "catp":  # single-image prompts: only its stage 1 runs, which keeps 1 - R/2 of the tokens
                kept = " / ".join(f"{(1 - (1 - float(r)) / 2) * 100:g}%" for r in ratios)
                label += (f" (one image: stage 1 only, keeps 1 - R/2 = {kept}; "
                          "few-shot: [icl_accuracy.md](icl_accuracy.md))")
            label = label.replace(f" {FLOPS_ROW}`", "` (FLOPs-matched: the column's ratio is `flops_ratio`)")
            label += f" (mean of {rows[ratios[0]]['seeds']} seeds, [min-max])" if "seeds" in rows[ratios[0]] else ""
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if notes:
            lines.append("")
        for method, reason in dict(notes).items():
            lines.append(f"* n/a `{method}`: {reason}")
        low = ratios[-1]
        lines += ["", f"Per question type at keep {float(low) * 100:g}%:", "",
                  "| method | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
        for method, rows in m["methods"].items():
            v = rows[low]
            if "accuracy" in v:
                lines.append(f"| `{method}` | " + " | ".join(pct(v["accuracy"].get(t, float("nan"))) for t in types)
                             + " |")
    return "\n".join(lines) + "\n"


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the method rows of ``new`` added or replaced (same samples required), rows in table order:
    the methods by name, then variants and FLOPs-matched rows, the diagnostic last."""
    if old["n"] != new["n"]:
        raise SystemExit(f"--n {new['n']} differs from the {old['n']} samples of the existing table; "
                         f"pass --n {old['n']}")
    for name, m in new["models"].items():
        if name not in old["models"]:
            raise SystemExit(f"{name} is not in the existing table: run it with every method first")
        if old["models"][name]["unpruned"] != m["unpruned"]:
            raise SystemExit(f"{name}: the unpruned accuracy differs from the stored run; re-run every method")
        rows = {**old["models"][name]["methods"], **m["methods"]}
        base = sorted(k for k in rows if " " not in k and k != DIAGNOSTIC)
        rest = [k for k in rows if k not in base and k != DIAGNOSTIC] + [k for k in rows if k == DIAGNOSTIC]
        old["models"][name]["methods"] = {k: rows[k] for k in base + rest}
    return old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llava-shapes,qwen2vl-shapes")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reference_accuracy")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to run; their rows replace / join those already in --out.json")
    p.add_argument("--flops-matched", action="store_true",
                   help="also a row per method that takes flops_ratio, the column ratio as its FLOPs fraction")
    a = p.parse_args()
    only = a.methods.split(",") if a.methods else None
    torch.set_num_threads(a.threads)
    import transformers

    register_method(DIAGNOSTIC)(LowestCLS)
    try:
        res: dict[str, Any] = {
            "n": a.n,
            "environment": {"device": f"CPU ({platform.processor() or platform.machine()})", "threads": a.threads,
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "date": time.strftime("%Y-%m-%d")},
            "models": {},
        }
        for name in a.models.split(","):
            res["models"][name] = bench_model(name, a.n, tuple(float(r) for r in a.ratios.split(",")),
                                              a.random_seeds, only, a.flops_matched)
    finally:
        METHODS.pop(DIAGNOSTIC, None)
    if only is not None and a.out.with_suffix(".json").exists():  # merge: the other rows stay as they were
        res = merge(json.loads(a.out.with_suffix(".json").read_text()), res)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(to_markdown(res))
    print(f"wrote {a.out.with_suffix('.md')} and {a.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
